"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU.

``TRITON_INTERPRET=1`` is set for the whole session by ``tests/conftest.py`` when
there is no GPU (before triton is first imported); the interpreter computes bf16
wrongly, so the Triton tests use fp32 and fp16 only.
"""
import pytest
import torch

from flexc.kernels._triton import triton_importable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _default_dispatch(monkeypatch):
    """Every test starts from the default dispatch rule."""
    monkeypatch.delenv("FLEXC_KERNELS", raising=False)


@pytest.fixture
def force_triton(monkeypatch):
    """Make the ops dispatch to Triton on every device (skips when triton is missing)."""
    if not triton_importable():
        pytest.skip("triton is not importable")
    monkeypatch.setenv("FLEXC_KERNELS", "triton")


@pytest.fixture
def device() -> torch.device:
    """Where the tests put their tensors: the GPU when there is one, else the CPU."""
    return DEVICE
