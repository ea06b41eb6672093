"""Which backend runs a flexc kernel, and the Triton plumbing the kernel modules share.

Triton is optional: without it every op runs its torch reference. The backend is
chosen per call from the tensors (:func:`use_triton`), in this one place:

* ``FLEXC_KERNELS=auto`` (default): Triton for CUDA tensors of fp16/bf16/fp32, an
  op's fast CPU path for CPU tensors where it has one, the torch reference otherwise;
* ``FLEXC_KERNELS=torch``: always the reference (debugging, benchmarks);
* ``FLEXC_KERNELS=triton``: Triton on every device; on the CPU this needs
  ``TRITON_INTERPRET=1`` (tests run the kernels that way).

Kernel bodies are plain functions in their modules, wrapped in :class:`Kernel`,
which applies ``triton.jit`` at the first launch.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional dependency
    triton = None
    tl = None

__all__ = ["triton_importable", "interpret_enabled", "use_triton", "kernel_backend", "Kernel", "make_tile_map", "dot_precision",
           "next_pow2"]

_ENV = "FLEXC_KERNELS"
_MODES = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_importable() -> bool:
    """Whether ``import triton`` succeeded."""
    return triton is not None


def interpret_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: Tensor) -> bool:
    """The dispatch rule: should an op whose main input is ``t`` run its Triton kernel?"""
    mode = os.environ.get(_ENV, "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"{_ENV}={mode!r}: expected one of {_MODES}")
    if mode == "torch" or triton is None or t.dtype not in _TRITON_DTYPES:
        return False
    if mode == "triton":
        if t.device.type == "cpu" and not interpret_enabled():
            raise ValueError(f"{_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.device.type == "cuda"


def kernel_backend(t: Tensor) -> str:
    """Which implementation an op whose main input is ``t`` runs: ``triton`` (see :func:`use_triton`),
    ``cpu`` (the fast CPU path of the ops that have one) or ``torch`` (the references: ``FLEXC_KERNELS=torch``,
    or any other device without Triton)."""
    if use_triton(t):
        return "triton"
    if t.device.type == "cpu" and os.environ.get(_ENV, "auto").lower() != "torch":
        return "cpu"
    return "torch"


class Kernel:
    """A Triton kernel body, jitted at its first launch: ``Kernel(body)[grid](*args)``.

    Jitting late means importing flexc never compiles anything, and a process that sets
    ``TRITON_INTERPRET=1`` before it first imports triton runs the kernels in the CPU interpreter
    (the test suite does so in ``tests/conftest.py`` when there is no GPU).
    """

    def __init__(self, body: Callable) -> None:
        self.body = body
        self._jitted: Any = None

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        if self._jitted is None:
            if triton is None:
                raise RuntimeError("triton is not installed; the torch reference should have been used")
            self._jitted = triton.jit(self.body)
        return self._jitted[grid]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's ``allow_tf32`` switch, like torch matmul."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def make_tile_map(cu: Tensor, block: int, num_rows: int) -> tuple[Tensor, Tensor, int]:
    """Split ragged segments into tiles of ``block`` rows, without a host sync.

    cu: int32 [S+1] segment starts (cu[-1] == num_rows) -> tile_seg int32 [max_tiles],
    tile_cu int32 [S+1], max_tiles. Tile ``i`` belongs to segment ``tile_seg[i]`` and
    covers its rows from ``(i - tile_cu[seg]) * block``; ``tile_seg[i] == S`` marks a
    spare program (``max_tiles`` is the bound ``ceil(num_rows / block) + S``).
    """
    num_segs = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).to(torch.int32)
    tiles = torch.div(lens + (block - 1), block, rounding_mode="floor")
    tile_cu = torch.zeros(num_segs + 1, dtype=torch.int32, device=cu.device)
    torch.cumsum(tiles, 0, out=tile_cu[1:])
    max_tiles = max(1, -(-num_rows // block) + num_segs)
    ids = torch.arange(max_tiles, dtype=torch.int32, device=cu.device)
    tile_seg = (torch.searchsorted(tile_cu, ids, right=True) - 1).to(torch.int32)
    # a spare id lands at or past tile_cu[S]: mark it with S
    tile_seg = torch.where(ids >= tile_cu[-1], num_segs, tile_seg).to(torch.int32)
    return tile_seg, tile_cu, max_tiles


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
