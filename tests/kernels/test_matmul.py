"""flexc::skinny_mm against x @ w.T: every row count around its threshold, fp32 (its own path) and bf16 (torch's)."""
import pytest
import torch

from flexc.kernels.matmul import SKINNY_ROWS, skinny_mm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_mm_equals_the_product(dtype):
    """0 to 2 * SKINNY_ROWS rows of x (one a strided view) against a wide weight: x @ w.T to fp32 rounding,
    contiguous, and the fake kernel's shape."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 96, generator=g).to(dtype)
    for n in range(2 * SKINNY_ROWS + 1):
        x = torch.randn(n, 96, generator=g).to(dtype)
        ref = x.double() @ w.double().t()
        out = skinny_mm(x, w)
        assert out.shape == (n, 3000) and out.dtype == dtype and out.is_contiguous()
        tol = 1e-5 if dtype is torch.float32 else 2e-2
        assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item() if n else tol), n
    xt = torch.randn(96, 3, generator=g).to(dtype).t()             # rows with stride 1
    assert torch.allclose(skinny_mm(xt, w).double(), xt.double() @ w.double().t(), rtol=1e-2, atol=1e-2)
    with torch._subclasses.FakeTensorMode():
        fake = torch.ops.flexc.skinny_mm(torch.empty(5, 96, dtype=dtype), torch.empty(3000, 96, dtype=dtype))
    assert fake.shape == (5, 3000)
