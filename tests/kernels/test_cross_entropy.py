"""flexc::linear_cross_entropy: loss and input gradient equal autograd on the eager fp32-logits formula."""
import pytest
import torch

from flexc.kernels.cross_entropy import linear_cross_entropy_ref  # importing registers the op


def _case(dtype, T=37, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::5] = -100
    return x, w, labels


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_reference_fp32(chunk):
    """Summed loss and d(loss)/dx through the op equal autograd on the reference, for any chunk size."""
    x, w, labels = _case(torch.float32)
    xr = x.clone().requires_grad_(True)
    ref = linear_cross_entropy_ref(xr, w, labels)
    ref.backward(torch.tensor(0.25))
    xo = x.clone().requires_grad_(True)
    loss, dx = torch.ops.flexc.linear_cross_entropy(xo, w, labels, chunk)
    (loss * 0.25).backward()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(xo.grad, xr.grad, rtol=1e-5, atol=1e-7)
    assert not dx.requires_grad


def test_bf16_close_and_opcheck():
    """bf16 inputs: fp32 loss close to the reference; the op passes torch.library.opcheck."""
    x, w, labels = _case(torch.bfloat16)
    loss, _ = torch.ops.flexc.linear_cross_entropy(x, w, labels, 16)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, linear_cross_entropy_ref(x, w, labels), rtol=1e-3)
    x32, w32, _ = _case(torch.float32)
    torch.library.opcheck(torch.ops.flexc.linear_cross_entropy.default, (x32.requires_grad_(True), w32, labels, 8))
