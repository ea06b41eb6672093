"""RegionProgram: binds weights and inputs by reference, checks inputs by name, and equals autograd on the region."""
import pytest
import torch

from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS, LayerRegion, causal_lm_parts
from tests.utils import rel_err


def _setup(tiny_llama, layer=1):
    region = tiny_llama.cm.regions["layer.0"]
    prog = RegionProgram(region.fw, region.bw, TOKEN_INPUTS["layer"])
    module = LayerRegion(causal_lm_parts(tiny_llama.model).model.layers[layer])
    return prog, module


def _inputs(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 64, generator=g), torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g),
            torch.tensor([0, 5, n], dtype=torch.int32))


def test_bind_takes_parameters_by_fqn_and_inputs_by_index(tiny_llama):
    """Each parameter placeholder gets the module's own tensor (no copy), user inputs the argument at their index,
    and an override replaces exactly the parameter it names."""
    prog, module = _setup(tiny_llama)
    args = _inputs()
    vals = prog.bind(module, args)
    params = dict(module.named_parameters())
    refs = prog.fw_inputs
    assert {r.target for r in refs if r.kind == "param"} == set(params)      # 7 base + 14 LoRA + 2 norms
    assert len(params) == 23
    for r, v in zip(refs, vals):
        assert v is (params[r.target] if r.kind == "param" else args[r.index])
    name = "layer.self_attn.q_proj.lora_B.default.weight"
    other = torch.zeros_like(params[name])
    swapped = prog.bind(module, args, overrides={name: other})
    assert [v is other for v in swapped] == [r.kind == "param" and r.target == name for r in refs]


def test_forward_and_backward_equal_autograd(tiny_llama):
    """Outputs equal the eager region's; backward gives the LoRA gradients keyed by FQN and the input gradient as
    'input0', equal to torch.autograd.grad on the eager region (fp32, 1e-5), and nothing for frozen weights."""
    prog, module = _setup(tiny_llama)
    h, cos, sin, cu = _inputs()
    (out,), saved = prog.forward(module, (h, cos, sin, cu))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = prog.backward(saved, [dout], module)

    lora = {n: p for n, p in module.named_parameters() if p.requires_grad}
    h_ref = h.clone().requires_grad_(True)
    ref_out = module(h_ref, cos, sin, cu)
    ref = torch.autograd.grad(ref_out, [h_ref, *lora.values()], dout)
    assert rel_err(out, ref_out) < 1e-6
    assert set(grads) == {"input0", *lora} and len(lora) == 14
    assert rel_err(grads["input0"], ref[0]) < 1e-5
    for (name, _), g in zip(lora.items(), ref[1:]):
        assert rel_err(grads[name], g) < 1e-5, name


def test_override_runs_another_adapter(tiny_llama):
    """Binding zero lora_B tensors through overrides gives the output of the same layer with PEFT's adapter
    disabled (the runtime's way of running one template with another adapter's weights)."""
    prog, module = _setup(tiny_llama, layer=2)
    args = _inputs(9, seed=2)
    zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters() if ".lora_B." in n}
    (out,), _ = prog.forward(module, args, overrides=zeros)
    (with_adapter,), _ = prog.forward(module, args)
    with torch.no_grad(), tiny_llama.model.disable_adapter():
        ref = module(*args)
    assert rel_err(out, ref) < 1e-6
    assert rel_err(with_adapter, ref) > 1e-3                   # the adapter does change the layer


@pytest.mark.parametrize("change,needle", [
    (lambda a: (a[0][:7], *a[1:]), r"token count: \[7, 11\]"),
    (lambda a: (a[0][:, :32], *a[1:]), "region input 0: dim 1 must be 64, got 32"),
    (lambda a: (a[0].double(), *a[1:]), "region input 0: expected torch.float32 with 2 dims"),
    (lambda a: (*a[:3], a[3].long()), "region input 3: expected torch.int32"),
    (lambda a: (a[0], a[1][..., None], *a[2:]), "region input 1: expected torch.float32 with 2 dims"),
])
def test_shape_checks_name_the_input(tiny_llama, change, needle):
    """Inputs the graph cannot run (token counts that disagree, a wrong static size, dtype or rank) are a ValueError
    naming the input."""
    prog, module = _setup(tiny_llama)
    with pytest.raises(ValueError, match=needle):
        prog.forward(module, change(_inputs()))
