"""Which backend runs a flexc kernel, and the Triton plumbing the kernel modules share.

Triton is optional: without it every op runs its torch reference. The backend is
chosen per call from the tensors (:func:`use_triton`), in this one place:

* ``FLEXC_KERNELS=auto`` (default): Triton for CUDA tensors of fp16/bf16/fp32,
  the torch reference for everything else (CPU, fp64);
* ``FLEXC_KERNELS=torch``: always the reference (debugging, benchmarks);
* ``FLEXC_KERNELS=triton``: Triton on every device; on the CPU this needs
  ``TRITON_INTERPRET=1`` (tests run the kernels that way).

Kernel bodies are plain functions in their modules; :func:`jit` applies
``triton.jit`` at first launch, so ``TRITON_INTERPRET`` is honoured whenever it is
set before the first launch, even if triton (or flexc) was imported earlier.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional dependency
    triton = None
    tl = None

__all__ = ["triton_importable", "interpret_enabled", "use_triton", "jit", "make_tile_map", "dot_precision",
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


_JITTED: dict[tuple[Callable, bool], Any] = {}


def jit(fn: Callable) -> Any:
    """``triton.jit(fn)``, built on first use and cached per interpreter mode; launch as ``jit(fn)[grid](...)``."""
    interpret = interpret_enabled()
    key = (fn, interpret)
    if key not in _JITTED:
        if triton is None:
            raise RuntimeError("triton is not installed; the torch reference should have been used")
        _JITTED[key] = _Interpreted(triton.jit(fn)) if interpret else triton.jit(fn)
    return _JITTED[key]


class _Interpreted:
    """An interpreted kernel that leaves triton as it found it, and that also runs when
    triton was imported before ``TRITON_INTERPRET=1`` was set (torch._dynamo imports
    triton, so a test session usually does).

    triton picks interpreted-or-compiled when ``@jit`` runs, so its own jitted helpers
    (``tl.zeros``, ``tl.sum``, ...) are then compiled-mode objects the interpreter cannot
    call: each launch swaps in interpreted twins. The interpreter also patches
    ``triton.language`` while it runs and, for nested helper calls, never undoes it; every
    launch restores those namespaces afterwards, so compiled-mode triton keeps working.
    """

    _twins: dict[int, Any] = {}   # id(compiled-mode helper) -> interpreted twin

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
            modules = [sys.modules[m] for m in sorted(sys.modules)
                       if m == "triton.language" or m.startswith("triton.language.")]
            saved = [(ns, dict(vars(ns))) for ns in modules + [tl.tensor, tl.core.tensor_descriptor_base]]
            for module in modules:
                for attr, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):
                        setattr(module, attr, self._twins.setdefault(id(value), InterpretedFunction(value.fn)))
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                # (names the interpreter added, e.g. its globals for rewritten helpers, stay)
                for ns, attrs in saved:
                    for attr, value in attrs.items():
                        if vars(ns).get(attr) is not value:
                            setattr(ns, attr, value)
        return launch


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
