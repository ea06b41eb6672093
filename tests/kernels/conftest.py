"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU.

``TRITON_INTERPRET=1`` is set per test (flexc jits its kernels at first launch,
so this works even when triton was imported earlier); the interpreter computes
bf16 wrongly, so the Triton tests use fp32 and fp16 only.
"""
import pytest
import torch

from flexc.kernels._triton import triton_importable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _triton_interpreter_without_gpu(monkeypatch):
    """Interpret Triton kernels on the CPU; leave a GPU run native."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
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
