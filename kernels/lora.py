"""Multi-LoRA over one flat ragged batch as the torch custom op ``flexc::lora``.

A mixed batch holds tokens of many requests, each with its own adapter or none.
The runtime sorts them into *segments* (runs of tokens that use the same adapter)
and one launch applies every adapter (segment-gather matmul; a decode batch is
one-token segments, i.e. a gather per token). The serving executor's inference
graphs call it once per adapted linear for the whole batch (the ``serve`` pass puts
it in place of each captured LoRA branch, ``passes/multi_lora.py``):

    flexc::lora(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling) -> out
      x:           [T, H_in]                 input of the adapted linear
      base_out:    [T, H_out]                output of the frozen base linear
      A_stack:     [num_adapters, r, H_in]   lora_A weights, stacked
      B_stack:     [num_adapters, H_out, r]  lora_B weights, stacked
      seg_starts:  int32 [S+1]  segment bounds; seg_starts[0] == 0, seg_starts[-1] == T,
                   non-decreasing (empty segments allowed): the segments tile the batch
      seg_adapter: int32 [S]    adapter index of each segment, -1 = no adapter
      scaling:     fp32 [num_adapters]  alpha / r of each adapter
      out:         [T, H_out]   base_out + scaling[a] * (x A[a]^T) B[a]^T on rows of
                                segments with adapter a; base_out elsewhere

It is the composition of a shrink (u = x A^T, [T, r]) and an expand
(base_out + scaling u B^T). The adapter weights are used in the
activation dtype (x's for the shrink, u's for the expand), accumulating in fp32,
and u is rounded to x's dtype in between, as PEFT does. The backward
(``flexc::lora_backward``) recomputes u and returns the LoRA part of dX plus
dA_stack and dB_stack; rows of ``base_out`` pass their gradient straight through.

The torch references (:mod:`flexc.kernels.lora_ref`, a loop over segments) and the
Triton kernels (:mod:`flexc.kernels.lora_triton`) take the same arguments; the ops
pick one by device in ``_backend_for`` (CUDA: Triton).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from flexc.kernels._triton import use_triton
from flexc.kernels.lora_ref import check_shapes, lora_backward_ref, lora_ref
from flexc.kernels.lora_triton import lora_backward_triton, lora_triton

__all__ = ["lora", "lora_backward"]


# ----------------------------------------------------------------- dispatch
@dataclasses.dataclass(frozen=True)
class _Backend:
    """One implementation of every piece (torch reference or Triton)."""

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


_TORCH = _Backend(forward=lora_ref, backward=lora_backward_ref)
_TRITON = _Backend(forward=lora_triton, backward=lora_backward_triton)


def _backend_for(x: Tensor) -> _Backend:
    """The device dispatch of this module: Triton for CUDA tensors, the reference otherwise.

    The rule (and the ``FLEXC_KERNELS`` override tests use) lives in ``_triton.use_triton``.
    """
    return _TRITON if use_triton(x) else _TORCH


# ----------------------------------------------------------------- custom ops
@torch.library.custom_op("flexc::lora", mutates_args=())
def lora(x: Tensor, base_out: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
         seg_adapter: Tensor, scaling: Tensor) -> Tensor:
    """base_out plus every segment's adapter applied to x; see the module docstring for shapes."""
    return _backend_for(x).forward(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)


@lora.register_fake
def _lora_fake(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling):
    check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    return torch.empty_like(base_out)


@torch.library.custom_op("flexc::lora_backward", mutates_args=())
def lora_backward(dout: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
                  seg_adapter: Tensor, scaling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``flexc::lora``: (dx LoRA part [T, H_in], dA_stack, dB_stack)."""
    return _backend_for(x).backward(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling)


@lora_backward.register_fake
def _lora_backward_fake(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling):
    return torch.empty_like(x), torch.empty_like(A_stack), torch.empty_like(B_stack)


def _setup_context(ctx, inputs, output):
    x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling = inputs
    # u is recomputed in the backward (one shrink) instead of being saved
    ctx.save_for_backward(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)


def _backward(ctx, dout):
    x, A_stack, B_stack, seg_starts, seg_adapter, scaling = ctx.saved_tensors
    dx, dA, dB = torch.ops.flexc.lora_backward(dout, x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    return dx, dout, dA, dB, None, None, None


torch.library.register_autograd("flexc::lora", _backward, setup_context=_setup_context)
