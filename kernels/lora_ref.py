"""Torch references of the multi-LoRA ops (a loop over segments), and the segment helpers every backend
shares. They are the test oracle of the Triton kernels (:mod:`flexc.kernels.lora_triton`) and what runs on
the CPU. Shapes are in :mod:`flexc.kernels.lora`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["make_segments", "check_shapes", "lora_shrink_ref", "lora_expand_ref", "lora_ref", "lora_backward_ref"]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half types and fp32, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def make_segments(token_adapters: Tensor) -> tuple[Tensor, Tensor]:
    """Group consecutive tokens with the same adapter into segments (host-side helper).

    token_adapters: int [T] adapter index per token (-1 = none)
    -> seg_starts int32 [S+1], seg_adapter int32 [S] (on the device of the input)
    """
    ids = token_adapters.tolist()
    starts, adapters = [0], []
    for i, a in enumerate(ids):
        if not adapters or a != adapters[-1]:
            if adapters:
                starts.append(i)
            adapters.append(a)
    starts.append(len(ids))
    if not adapters:
        starts = [0]
    dev = token_adapters.device
    return (torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor(adapters, dtype=torch.int32, device=dev))


def check_shapes(x: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                  scaling: Optional[Tensor]) -> None:
    """Shape checks that need no device sync (values are checked by the reference)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H_in]; got shape {tuple(x.shape)}")
    if A_stack.dim() != 3 or A_stack.shape[2] != x.shape[1]:
        raise ValueError(f"A_stack must be [num_adapters, r, {x.shape[1]}]; got {tuple(A_stack.shape)}")
    if B_stack.dim() != 3 or B_stack.shape[0] != A_stack.shape[0] or B_stack.shape[2] != A_stack.shape[1]:
        raise ValueError(f"B_stack must be [{A_stack.shape[0]}, H_out, {A_stack.shape[1]}]; "
                         f"got {tuple(B_stack.shape)}")
    if seg_starts.dim() != 1 or seg_adapter.dim() != 1 or seg_starts.numel() != seg_adapter.numel() + 1:
        raise ValueError(f"seg_starts must be [S+1] and seg_adapter [S]; got {tuple(seg_starts.shape)} "
                         f"and {tuple(seg_adapter.shape)}")
    if seg_starts.dtype != torch.int32 or seg_adapter.dtype != torch.int32:
        raise ValueError(f"seg_starts/seg_adapter must be int32; got {seg_starts.dtype}/{seg_adapter.dtype}")
    if scaling is not None and tuple(scaling.shape) != (A_stack.shape[0],):
        raise ValueError(f"scaling must be [{A_stack.shape[0]}]; got {tuple(scaling.shape)}")


def _segments(num_tokens: int, num_adapters: int, seg_starts: Tensor,
              seg_adapter: Tensor) -> list[tuple[int, int, int]]:
    """(start, end, adapter) per non-empty segment, after checking the values (host sync)."""
    starts, adapters = seg_starts.tolist(), seg_adapter.tolist()
    if starts[0] != 0 or starts[-1] != num_tokens or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"seg_starts must rise from 0 to T={num_tokens}; got {starts}")
    bad = [a for a in adapters if not -1 <= a < num_adapters]
    if bad:
        raise ValueError(f"seg_adapter values must be -1 or in [0, {num_adapters}); got {bad}")
    return [(s, e, a) for s, e, a in zip(starts[:-1], starts[1:], adapters) if e > s]


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)      # NOTE: skips the call: the CPU serving path is overhead-bound


def _shrink_one(x: Tensor, A: Tensor) -> Tensor:
    """One adapter's shrink: x [n, H_in], A [r, H_in] -> x A^T [n, r] in x's dtype (fp32 accumulation)."""
    acc = _acc_dtype(x)
    return _cast(_cast(x, acc) @ _cast(_cast(A, x.dtype), acc).T, x.dtype)


def _expand_one(y: Tensor, u: Tensor, B: Tensor, scale: float) -> Tensor:
    """One adapter's expand: y [n, H_out] + scale * u [n, r] B^T [r, H_out], summed in fp32, in y's dtype."""
    acc = _acc_dtype(y)
    d = (_cast(u, acc) @ _cast(_cast(B, u.dtype), acc).T) * scale
    return _cast(_cast(y, acc) + d, y.dtype)


def lora_shrink_ref(x: Tensor, A_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor) -> Tensor:
    """u = x A[a]^T per segment (torch reference); zero rows for tokens without adapter.

    x: [T, H_in], A_stack: [num_adapters, r, H_in] -> u: [T, r] (dtype of x)
    """
    u = x.new_zeros((x.shape[0], A_stack.shape[1]))
    for s, e, a in _segments(x.shape[0], A_stack.shape[0], seg_starts, seg_adapter):
        if a >= 0:
            u[s:e] = _shrink_one(x[s:e], A_stack[a])
    return u


def lora_expand_ref(y_base: Tensor, u: Tensor, B_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                    scaling: Tensor) -> Tensor:
    """y_base + scaling[a] * u B[a]^T per segment (torch reference); other rows copied.

    y_base: [T, H_out], u: [T, r], B_stack: [num_adapters, H_out, r], scaling: [num_adapters]
    -> out: [T, H_out] (dtype of y_base)
    """
    out = y_base.clone()
    scales = scaling.tolist()                     # fp32 values are exact as Python floats
    for s, e, a in _segments(y_base.shape[0], B_stack.shape[0], seg_starts, seg_adapter):
        if a >= 0:
            out[s:e] = _expand_one(y_base[s:e], u[s:e], B_stack[a], scales[a])
    return out


def lora_ref(x: Tensor, base_out: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
             seg_adapter: Tensor, scaling: Tensor) -> Tensor:
    """The forward of ``flexc::lora`` (torch reference); shapes in the module docstring.

    Per segment the shrink and the expand above, fused (u is never scattered into a [T, r] buffer), and a
    batch that is one adapted segment is computed without the copy of ``base_out``.
    """
    check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    segs = _segments(x.shape[0], A_stack.shape[0], seg_starts, seg_adapter)
    scales = scaling.tolist()
    if len(segs) == 1 and segs[0][2] >= 0:
        a = segs[0][2]                            # NOTE: the segments tile the batch, so this one covers it
        return _expand_one(base_out, _shrink_one(x, A_stack[a]), B_stack[a], scales[a])
    out = base_out.clone()
    for s, e, a in segs:
        if a >= 0:
            out[s:e] = _expand_one(base_out[s:e], _shrink_one(x[s:e], A_stack[a]), B_stack[a], scales[a])
    return out


def lora_backward_ref(dout: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
                      seg_adapter: Tensor, scaling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``flexc::lora`` (torch reference), recomputing u from x.

    dout: [T, H_out], x: [T, H_in] -> dx [T, H_in] (LoRA part only; zero for tokens
    without adapter), dA_stack [num_adapters, r, H_in], dB_stack [num_adapters, H_out, r]
    (zero for adapters no segment uses)
    """
    acc = _acc_dtype(x)
    dx = torch.zeros_like(x)
    dA = torch.zeros(A_stack.shape, dtype=acc, device=A_stack.device)
    dB = torch.zeros(B_stack.shape, dtype=acc, device=B_stack.device)
    for s, e, a in _segments(x.shape[0], A_stack.shape[0], seg_starts, seg_adapter):
        if a < 0:
            continue
        xs, g, sc = x[s:e].to(acc), dout[s:e].to(acc), scaling[a].to(acc)
        wa = A_stack[a].to(x.dtype).to(acc)                        # [r, H_in]
        wb = B_stack[a].to(x.dtype).to(acc)                        # [H_out, r]
        u = (xs @ wa.T).to(x.dtype).to(acc)                        # [n, r]
        du = (g @ wb) * sc                                         # [n, r]
        dB[a] += (g.T @ u) * sc
        dA[a] += du.T @ xs
        dx[s:e] = (du @ wa).to(x.dtype)
    return dx, dA.to(A_stack.dtype), dB.to(B_stack.dtype)
