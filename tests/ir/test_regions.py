"""The region modules: run eagerly one after another they are the HF model; layer signatures see baked constants."""
import copy

import pytest
import torch
from torch import nn

from flexc.ir.regions import EmbedRegion, HeadRegion, LayerRegion, LogitsRegion, causal_lm_parts, layer_signature
from tests.utils import eager_peft_loss_grads, packed_batch, rel_err


def test_regions_reproduce_hf_logits_loss_and_grads(tiny_llama):
    """embed -> layers -> logits/head over one packed batch of three sequences give the logits (1e-5), the summed
    loss and the LoRA gradients (1e-4) of HF+PEFT with its own SDPA attention run one sequence at a time."""
    model = tiny_llama.model
    lm = causal_lm_parts(model)
    ids, pos, cu, labels, seqs = packed_batch([6, 9, 4], vocab=256, seed=5)
    model.zero_grad(set_to_none=True)
    h, cos, sin = EmbedRegion(lm)(ids, pos)
    for layer in lm.model.layers:
        h = LayerRegion(layer)(h, cos, sin, cu)
    logits = LogitsRegion(lm)(h)
    loss_sum = HeadRegion(lm)(h, labels)
    n = int((labels != -100).sum())
    (loss_sum / n).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    try:
        model.get_base_model().set_attn_implementation("sdpa")    # independent reference: HF's own attention
        ref_logits, ref_grads, ref_loss = eager_peft_loss_grads(model, seqs)
    finally:
        model.get_base_model().set_attn_implementation("flexc")
    assert logits.dtype == torch.float32 and logits.shape == (19, 256)
    assert rel_err(logits, torch.cat(ref_logits)) < 1e-5
    assert torch.allclose(loss_sum, ref_loss, rtol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 3 * 7 * 2
    assert max(rel_err(grads[k], g) for k, g in ref_grads.items()) < 1e-4


@pytest.fixture()
def layers(tiny_llama):
    return causal_lm_parts(tiny_llama.model).model.layers


def test_identical_layers_have_equal_signatures(layers):
    """Layers that differ only in their index and weight values share a signature (one template runs them)."""
    a, b = layers[0], layers[1]
    assert a.self_attn.layer_idx != b.self_attn.layer_idx
    assert not torch.equal(a.mlp.down_proj.base_layer.weight, b.mlp.down_proj.base_layer.weight)
    assert layer_signature(a) == layer_signature(b)


@pytest.mark.parametrize("change", [
    lambda layer: layer.self_attn.q_proj.scaling.__setitem__("default", 4.0),
    lambda layer: setattr(layer.input_layernorm, "variance_epsilon", 1e-5),
    lambda layer: setattr(layer.self_attn, "scaling", 0.5),
    lambda layer: setattr(layer.self_attn, "sliding_window", 8),
    lambda layer: layer.mlp.down_proj.lora_A["default"].weight.requires_grad_(False),
    lambda layer: layer.train(),
], ids=["lora-scaling", "norm-eps", "attention-scaling", "sliding-window", "frozen-adapter", "training-flag"])
def test_baked_constant_changes_signature(layers, change):
    """Changing one constant the capture bakes into the graph gives the layer its own signature."""
    layer = copy.deepcopy(layers[1])
    change(layer)
    assert layer_signature(layer) != layer_signature(layers[0])


def test_causal_lm_parts_names_the_wrong_layout():
    """A module without the *ForCausalLM layout is a ValueError naming its class."""
    with pytest.raises(ValueError, match="Linear does not have the \\*ForCausalLM layout"):
        causal_lm_parts(nn.Linear(2, 2))


def test_head_refuses_a_trainable_lm_head(tiny_llama):
    """The fused head keeps no logits for the backward, so a trainable lm_head is refused, not silently frozen."""
    lm = copy.deepcopy(causal_lm_parts(tiny_llama.model))
    lm.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen lm_head"):
        HeadRegion(lm)(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long))
