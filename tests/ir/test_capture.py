"""Capture: symbolic token count, one attention node, templates shared only by identical layers."""
import pytest
import sympy
import torch

import flexc
from flexc.ir.vocab import TOKEN_SYMBOL
from flexc.ir.graph import NODE_INFO, Role
from flexc.ir.regions import causal_lm_parts, layer_signature
from flexc.ir.capture import fake_mode
from flexc.ir.spec import LoraSpec
from flexc.models import build_fake_model, resolve_model
from tests.utils import write_config


@pytest.fixture()
def compiled(tiny_llama):
    return tiny_llama.cm                   # the session's tiny Llama: LoRA r=4 alpha=8, seq_len 16


def _ops(gm, needle):
    return [n for n in gm.graph.nodes if n.op == "call_function" and needle in str(n.target)]


def test_identical_layers_share_one_template(compiled):
    """All decoder layers of a homogeneous model run through a single captured template."""
    assert compiled.graph.layer_regions == ["layer.0"] * 3
    assert set(compiled.regions) == {"embed", "layer.0", "head", "logits"}


def test_attention_is_one_opaque_node(compiled):
    """The layer's forward graph has exactly one flexc.attention node and its backward one attention_backward."""
    layer = compiled.regions["layer.0"]
    assert len(_ops(layer.fw, "flexc.attention")) == 1
    assert len(_ops(layer.bw, "flexc.attention_backward")) == 1
    assert not _ops(layer.fw, "aten.bmm") and not _ops(layer.fw, "softmax")


def test_token_dimension_is_symbolic(compiled):
    """Shapes of the layer graph are expressions in T, not the example size the capture saw."""
    layer = compiled.regions["layer.0"]
    shapes = [n.meta[NODE_INFO].shape for n in layer.fw.graph.nodes if n.meta[NODE_INFO].shape]
    assert any(s and s[0] == TOKEN_SYMBOL for s in shapes)
    assert not any(s and s[0] == 16 for s in shapes if len(s) == 2)
    flops = layer.total_flops("forward")
    assert TOKEN_SYMBOL in flops.free_symbols


def test_roles_cover_lora_and_base(compiled):
    """Annotation finds base linears, both LoRA factors of all 7 projections, norms, rotary and attention."""
    roles = {}
    for n in compiled.regions["layer.0"].nodes("forward"):
        info = n.meta[NODE_INFO]
        roles.setdefault(info.role, set()).add(info.module)
    adapters = {m.split(".")[-3] for m in roles[Role.ADAPTER_A] if "lora_A" in m}
    assert adapters == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for r in (Role.BASE_LINEAR, Role.ADAPTER_B, Role.NORM, Role.ROTARY, Role.ATTENTION, Role.ACTIVATION):
        assert r in roles, r
    head_roles = {n.meta[NODE_INFO].role for n in compiled.regions["head"].nodes("forward")}
    assert Role.LM_HEAD in head_roles and Role.LOSS in head_roles


def test_lora_flops_are_symbolic_matmuls(compiled):
    """The q_proj lora_A matmul costs 2*T*r*hidden FLOPs."""
    for n in compiled.regions["layer.0"].nodes("forward"):
        info = n.meta[NODE_INFO]
        if info.role == Role.ADAPTER_A and info.module.endswith("q_proj.lora_A.default") and info.flops != 0:
            assert sympy.simplify(info.flops - 2 * TOKEN_SYMBOL * 4 * 64) == 0
            return
    pytest.fail("no lora_A matmul found")


def test_layer_signature_sees_baked_constants(tmp_path):
    """A layer whose LoRA scaling differs gets a different signature (so it would get its own template)."""
    src = resolve_model(write_config(tmp_path, "llama"))
    model = build_fake_model(src, LoraSpec(r=4, alpha=8), "fp32", fake_mode())
    layers = causal_lm_parts(model).model.layers
    assert layer_signature(layers[0]) == layer_signature(layers[1])
    layers[1].self_attn.q_proj.scaling["default"] = 4.0
    assert layer_signature(layers[0]) != layer_signature(layers[1])


def test_heterogeneous_layers_get_own_templates(tmp_path):
    """Mistral-style sliding window on some Qwen2 layers splits the layers into two templates."""
    path = write_config(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                        layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    cm = flexc.compile(path, lora=LoraSpec(r=2, targets=("down_proj",)), seq_len=8)
    assert cm.graph.layer_regions == ["layer.0", "layer.1", "layer.1"]
