"""flexc::lora: the torch reference against a per-token gather and autograd, the Triton kernels against the reference.

Sizes are tiny on purpose: the Triton kernels run in the CPU interpreter here.
"""
import pytest
import torch

from flexc.kernels import lora as lora_mod
from flexc.kernels import lora_ref as ref
from flexc.kernels import lora_triton as tri
from flexc.kernels._triton import triton_importable

requires_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

H_IN, H_OUT, NUM_ADAPTERS = 48, 40, 4
# segments: a prefill chunk, an empty segment, tokens without adapter, decode tokens, adapter 1 used
# twice, adapter 3 used by no segment
SEG_LENS = [7, 0, 17, 1, 1, 9, 3, 1]
SEG_ADAPTERS = [0, 1, -1, 2, 0, 1, -1, 1]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _segments(lens, adapters, device):
    starts = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return starts, torch.tensor(adapters, dtype=torch.int32, device=device)


def _batch(rank, dtype, device, lens=SEG_LENS, adapters=SEG_ADAPTERS, seed=0):
    """Arguments of flexc::lora; x is a transposed view (row stride 1) to exercise strides."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    T = sum(lens)
    x = rnd(H_IN, T).to(dtype).to(device).t()
    base_out = rnd(T, H_OUT).to(dtype).to(device)
    A_stack = (rnd(NUM_ADAPTERS, rank, H_IN) / H_IN ** 0.5).to(dtype).to(device)
    B_stack = (rnd(NUM_ADAPTERS, H_OUT, rank) / rank ** 0.5).to(dtype).to(device)
    scaling = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float32, device=device)
    seg_starts, seg_adapter = _segments(lens, adapters, device)
    return x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling


def _token_adapters(seg_starts, seg_adapter):
    lens = (seg_starts[1:] - seg_starts[:-1]).long()
    return torch.repeat_interleave(seg_adapter.long(), lens)


def _plain_lora(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling):
    """Independent differentiable reference: gather each token's adapter, then two batched products."""
    ta = _token_adapters(seg_starts, seg_adapter)
    has = (ta >= 0)[:, None]
    idx = ta.clamp(min=0)
    u = torch.einsum("ti,tri->tr", x, A_stack[idx])
    delta = torch.einsum("tr,tor->to", u, B_stack[idx]) * scaling[idx].to(x.dtype)[:, None]
    return torch.where(has, base_out + delta, base_out)


# ----------------------------------------------------------------- the reference
def test_ref_matches_per_token_gather():
    """lora_ref equals the per-token gather computation; rows without adapter are base_out exactly."""
    args = _batch(6, torch.float64, "cpu")
    out = ref.lora_ref(*args)
    torch.testing.assert_close(out, _plain_lora(*args), **TOL[torch.float64])
    none = _token_adapters(args[4], args[5]) < 0
    assert torch.equal(out[none], args[1][none])


def test_backward_ref_matches_autograd():
    """lora_backward_ref equals autograd through the per-token gather (dx, dA_stack, dB_stack)."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(6, torch.float64, "cpu")
    x, A_stack, B_stack = (t.detach().requires_grad_() for t in (x, A_stack, B_stack))
    out = _plain_lora(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    dout = torch.randn_like(out)
    want = torch.autograd.grad((out * dout).sum(), (x, A_stack, B_stack))
    got = ref.lora_backward_ref(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    assert torch.count_nonzero(got[1][3]) == 0 and torch.count_nonzero(got[2][3]) == 0   # unused adapter


def test_lora_op_gradcheck_fp64():
    """torch.autograd.gradcheck passes on flexc::lora in fp64 (x, base_out, A_stack, B_stack)."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(
        2, torch.float64, "cpu", lens=[2, 0, 1, 2], adapters=[1, 0, -1, 1])
    inputs = tuple(t.detach().contiguous().requires_grad_() for t in (x, base_out, A_stack, B_stack))
    assert torch.autograd.gradcheck(
        lambda x, b, A, B: torch.ops.flexc.lora(x, b, A, B, seg_starts, seg_adapter, scaling), inputs)


def test_opcheck_lora_reference():
    """torch.library.opcheck passes on flexc::lora and flexc::lora_backward with the torch reference."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(4, torch.float32, "cpu")
    args = (x.detach().requires_grad_(), base_out, A_stack.requires_grad_(), B_stack.requires_grad_(),
            seg_starts, seg_adapter, scaling)
    torch.library.opcheck(torch.ops.flexc.lora.default, args)
    bwd_args = (torch.randn_like(base_out), x, A_stack.detach(), B_stack.detach(), seg_starts, seg_adapter, scaling)
    torch.library.opcheck(torch.ops.flexc.lora_backward.default, bwd_args)


def test_make_segments_groups_consecutive_tokens():
    """make_segments turns per-token adapter ids into runs (and an empty batch into no segments)."""
    starts, adapters = ref.make_segments(torch.tensor([2, 2, -1, 0, 0, 0, 2]))
    assert starts.tolist() == [0, 2, 3, 6, 7] and adapters.tolist() == [2, -1, 0, 2]
    assert starts.dtype == adapters.dtype == torch.int32
    starts, adapters = ref.make_segments(torch.tensor([], dtype=torch.long))
    assert starts.tolist() == [0] and adapters.tolist() == []


@pytest.mark.parametrize("change, match", [
    (dict(seg_adapter=[0, 1, -1, 2, 0, 1, -1, 7]), "seg_adapter values"),
    (dict(seg_lens=[7, 0, 17, 1, 1, 9, 3, 0]), "seg_starts must rise"),
])
def test_bad_segments_raise_value_error(change, match):
    """Segment tables that do not tile the batch, or name a missing adapter, raise ValueError naming them."""
    x, base_out, A_stack, B_stack, _, _, scaling = _batch(4, torch.float32, "cpu")
    lens, adapters = change.get("seg_lens", SEG_LENS), change.get("seg_adapter", SEG_ADAPTERS)
    seg_starts, seg_adapter = _segments(lens, adapters, "cpu")
    with pytest.raises(ValueError, match=match):
        ref.lora_ref(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)


def test_bad_shapes_raise_value_error():
    """A_stack whose input size differs from x's raises ValueError naming both shapes."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="A_stack must be"):
        torch.ops.flexc.lora(x, base_out, A_stack[:, :, :-1], B_stack, seg_starts, seg_adapter, scaling)


def test_dispatch_picks_reference_on_cpu_and_triton_when_forced(monkeypatch):
    """CPU tensors dispatch to the reference; FLEXC_KERNELS=triton forces Triton; fp64 always uses the reference."""
    x = torch.zeros(2, 8)
    assert lora_mod._backend_for(x) is lora_mod._TORCH
    if triton_importable():
        monkeypatch.setenv("FLEXC_KERNELS", "triton")
        assert lora_mod._backend_for(x) is lora_mod._TRITON
        assert lora_mod._backend_for(x.double()) is lora_mod._TORCH


# ----------------------------------------------------------------- Triton kernels
@requires_triton
@pytest.mark.parametrize("rank", [6, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shrink_expand_triton_match_ref(dtype, rank, device):
    """Triton shrink (x·A) and expand (base + s·u·Bᵀ) each equal the reference; rows without adapter untouched."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(rank, dtype, device)
    u = tri.lora_shrink_triton(x, A_stack, seg_starts, seg_adapter)
    want_u = ref.lora_shrink_ref(x, A_stack, seg_starts, seg_adapter)
    torch.testing.assert_close(u, want_u, **TOL[dtype])
    out = tri.lora_expand_triton(base_out, want_u, B_stack, seg_starts, seg_adapter, scaling)
    torch.testing.assert_close(out, ref.lora_expand_ref(base_out, want_u, B_stack, seg_starts, seg_adapter,
                                                             scaling), **TOL[dtype])
    none = _token_adapters(seg_starts, seg_adapter) < 0
    assert torch.equal(out[none], base_out[none]) and torch.count_nonzero(u[none]) == 0


@requires_triton
@pytest.mark.parametrize("rank", [6, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_backward_triton_matches_ref(dtype, rank, device):
    """The Triton backward (dx, per-adapter dA and dB summed over segments) equals the reference."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(rank, dtype, device, seed=1)
    dout = torch.randn_like(base_out)
    got = tri.lora_backward_triton(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    want = ref.lora_backward_ref(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@requires_triton
def test_decode_batch_gathers_per_token(device):
    """A decode batch (one-token segments, mixed adapters) through Triton equals the reference, fp32 adapters."""
    adapters = [3, 0, -1, 2, 2, 1, 0, -1, 3]
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(
        16, torch.float32, device, lens=[1] * len(adapters), adapters=adapters)
    out = tri.lora_triton(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    torch.testing.assert_close(out, ref.lora_ref(x, base_out, A_stack, B_stack, seg_starts, seg_adapter,
                                                      scaling), **TOL[torch.float32])


@requires_triton
def test_op_with_triton_matches_reference_through_autograd(force_triton, device):
    """With Triton forced, flexc::lora and its autograd give the reference's outputs and gradients."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(6, torch.float32, device, seed=2)
    leaves = [t.detach().requires_grad_() for t in (x, base_out, A_stack, B_stack)]
    out = torch.ops.flexc.lora(*leaves, seg_starts, seg_adapter, scaling)
    got = torch.autograd.grad(out.square().sum(), leaves)
    want_out = _plain_lora(*leaves, seg_starts, seg_adapter, scaling)
    want = torch.autograd.grad(want_out.square().sum(), leaves)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@requires_triton
def test_opcheck_lora_triton(force_triton, device):
    """torch.library.opcheck passes on flexc::lora when it dispatches to Triton."""
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = _batch(4, torch.float32, device)
    args = (x.detach().requires_grad_(), base_out, A_stack.requires_grad_(), B_stack.requires_grad_(),
            seg_starts, seg_adapter, scaling)
    torch.library.opcheck(torch.ops.flexc.lora.default, args)
