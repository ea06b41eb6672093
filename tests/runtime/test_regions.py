"""The compiled region graphs, run with real weights, reproduce the eager HF+PEFT model."""
import copy

import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.regions import RegionRunner
from tests.utils import eager_peft_loss_grads, packed_batch, randomize_lora, rel_err, write_config

LENS = [5, 11, 3]


def _parity(cm, model, lens, vocab):
    runner = RegionRunner(cm, model)
    ids, pos, cu, labels, seqs = packed_batch(lens, vocab)
    logits = runner.forward_logits(ids, pos, cu)
    step = runner.train_step(ids, pos, cu, labels)
    model.get_base_model().set_attn_implementation("sdpa")     # independent reference: HF's own attention
    ref_logits, ref_grads, ref_loss = eager_peft_loss_grads(model, seqs)
    return logits, torch.cat(ref_logits), step, ref_grads, ref_loss


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {}),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
], ids=["llama", "qwen2", "mistral", "qwen2-sliding"])
def test_tiny_models_match_peft(tmp_path, arch, overrides):
    """Logits within 1e-5 and every LoRA gradient within 1e-4 (relative, fp32) of PEFT's loss.backward()."""
    src = resolve_model(write_config(tmp_path, arch, **overrides))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=3)
    randomize_lora(model)
    logits, ref_logits, step, ref_grads, ref_loss = _parity(cm, model, LENS, src.config.vocab_size)
    assert rel_err(logits, ref_logits) < 1e-5
    assert torch.allclose(step.loss_sum, ref_loss, rtol=1e-5)
    assert set(step.grads) == set(ref_grads) and len(ref_grads) == 3 * 7 * 2
    for name, g in ref_grads.items():
        assert rel_err(step.grads[name], g) < 1e-4, name


def test_wrong_layer_gradients_differ(tmp_path):
    """Negative control: gradients of layer 0 compared with PEFT's layer 1 gradients are far apart."""
    src = resolve_model(write_config(tmp_path, "llama"))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=3)
    randomize_lora(model)
    _, _, step, ref, _ = _parity(cm, model, LENS, src.config.vocab_size)
    k0 = next(k for k in ref if ".layers.0." in k and "lora_A" in k)
    assert rel_err(step.grads[k0], ref[k0.replace(".layers.0.", ".layers.1.")]) > 0.1


def test_token_count_differs_from_capture(tmp_path):
    """A graph captured at seq_len 16 runs a 40-token batch of 4 sequences without recapture."""
    src = resolve_model(write_config(tmp_path, "llama"))
    spec = LoraSpec(r=2, targets=("down_proj", "q_proj"))
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=1)
    randomize_lora(model)
    logits, ref_logits, step, ref_grads, _ = _parity(cm, model, [17, 1, 9, 13], src.config.vocab_size)
    assert logits.shape[0] == 40 and rel_err(logits, ref_logits) < 1e-5
    assert max(rel_err(step.grads[k], g) for k, g in ref_grads.items()) < 1e-4


def test_smollm2_matches_peft(smollm2_lora):
    """The embedded SmolLM2-135M with real weights: logits match PEFT (1e-5); the LoRA gradients match PEFT's
    (5e-5 over all of them together), and each one is as close to the exact (fp64) gradient as PEFT's own fp32
    gradient is (30 layers of fp32 rounding put single small gradients ~1e-4 apart in any two fp32 orders)."""
    cm = smollm2_lora.compiled
    model = copy.deepcopy(smollm2_lora.model)
    randomize_lora(model, std=0.01)
    logits, ref_logits, step, ref_grads, _ = _parity(cm, model, [9, 6], cm.source.config.vocab_size)
    assert rel_err(logits, ref_logits) < 1e-5
    assert len(ref_grads) == 30 * 7 * 2
    names = list(ref_grads)
    flat = lambda gs: torch.cat([gs[k].flatten() for k in names])          # noqa: E731
    assert rel_err(flat(step.grads), flat(ref_grads)) < 5e-5
    _, _, seqs = packed_batch([9, 6], cm.source.config.vocab_size)[2:]
    _, exact, _ = eager_peft_loss_grads(model.double(), seqs)              # the same model, in fp64
    model.float()
    for k in names:
        assert rel_err(step.grads[k], exact[k]) <= 2 * rel_err(ref_grads[k], exact[k]) + 1e-6, k


def test_runtime_checks_shapes(tmp_path):
    """The graphs carry no shape checks, so the program rejects inputs that disagree on T or hidden size."""
    src = resolve_model(write_config(tmp_path, "llama"))
    cm = flexc.compile(src, lora=LoraSpec(r=2), seq_len=8)
    model = load_model(src, cm.lora, "fp32")
    runner = RegionRunner(cm, model)
    prog = runner.layer_program(0)
    h = torch.zeros(5, 64)
    cos = sin = torch.zeros(4, 16)
    with pytest.raises(ValueError, match="token count"):
        prog.forward(runner.layer_modules[0], (h, cos, sin, torch.tensor([0, 5], dtype=torch.int32)))
    with pytest.raises(ValueError, match="dim 1 must be 64"):
        prog.forward(runner.layer_modules[0], (torch.zeros(4, 32), cos, sin, torch.tensor([0, 4], dtype=torch.int32)))
