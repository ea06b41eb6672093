"""Multi-LoRA over one flat ragged batch as the torch custom op ``flexc::lora``.

A mixed batch holds tokens of many requests, each with its own adapter or none.
The runtime sorts them into *segments* (runs of tokens that use the same adapter)
and one launch applies every adapter (segment-gather matmul; a decode batch is
one-token segments, i.e. a gather per token). The serving executor's inference
graphs call it once per adapted linear for the whole batch
(``passes/multi_lora.py`` puts it in place of each captured LoRA branch):

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

It is the composition of :func:`lora_shrink` (u = x A^T, [T, r]) and
:func:`lora_expand` (base_out + scaling u B^T). The adapter weights are used in the
activation dtype (x's for the shrink, u's for the expand), accumulating in fp32,
and u is rounded to x's dtype in between, as PEFT does. The backward
(``flexc::lora_backward``) recomputes u and returns the LoRA part of dX plus
dA_stack and dB_stack; rows of ``base_out`` pass their gradient straight through.

Every ``*_ref`` function is the torch reference (a loop over segments); the
``*_triton`` function of the same name takes the same arguments. The public
functions and the ops pick one by device in ``_backend_for`` (CUDA: Triton).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from flexc.kernels._triton import dot_precision, interpret_enabled, jit, make_tile_map, next_pow2, tl, use_triton

__all__ = [
    "make_segments",
    "lora_forward",
    "lora_shrink",
    "lora_expand",
    "lora_shrink_ref",
    "lora_expand_ref",
    "lora_ref",
    "lora_backward_ref",
    "lora_shrink_triton",
    "lora_expand_triton",
    "lora_triton",
    "lora_backward_triton",
]


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


def _check_shapes(x: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
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


# ----------------------------------------------------------------- torch reference
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
    _check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
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


# ----------------------------------------------------------------- Triton kernels
# Tiles of BLOCK_M tokens never straddle segments (``make_tile_map``), so each
# program multiplies by ONE adapter's weights. Kernel bodies are jitted at first
# launch by ``_triton.jit``.

def _shrink_kernel(x_ptr, w_ptr, out_ptr, seg_ptr, ad_ptr, scale_ptr, tile_seg_ptr, tile_cu_ptr,
                   sx_t, sx_k, sw_a, sw_r, sw_k, so_s, so_t, so_r, num_segs, rank, k_dim,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr):
    # grid: (token tiles, SPLIT_K). out[split, t, :] = scale[a] * x[t, K_split] @ w[a][:, K_split]^T
    # x: [T, K], w: [num_adapters, R, K], out: fp32 [SPLIT_K, T, R] pre-zeroed (rows without adapter stay 0)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid)
    if seg >= num_segs:
        return
    a = tl.load(ad_ptr + seg)
    if a < 0:
        return
    end = tl.load(seg_ptr + seg + 1)
    t = tl.load(seg_ptr + seg) + (pid - tl.load(tile_cu_ptr + seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < end
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    w_base = w_ptr + a.to(tl.int64) * sw_a
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    k_per_split = tl.cdiv(k_dim, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_dim, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        xt = tl.load(x_ptr + t[:, None] * sx_t + k[None, :] * sx_k, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + r[None, :] * sw_r + k[:, None] * sw_k, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(xt, wt.to(xt.dtype), input_precision=PREC)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + a)
    tl.store(out_ptr + split * so_s + t[:, None] * so_t + r[None, :] * so_r, acc, mask=t_ok[:, None] & r_ok[None, :])


def _expand_kernel(y_ptr, u_ptr, w_ptr, out_ptr, seg_ptr, ad_ptr, scale_ptr, tile_seg_ptr, tile_cu_ptr,
                   sy_t, sy_n, su_t, su_r, sw_a, sw_n, sw_r, so_t, so_n, num_segs, rank, n_dim,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   HAS_BASE: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr):
    # grid: (token tiles, N tiles). out[t, n] = y[t, n] + scale[a] * u[t, :] @ w[a][n, :]
    # y/out: [T, N] (y = 0 without HAS_BASE), u: [T, R], w: [num_adapters, N, R]; rows without adapter: out = y
    pid = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.load(tile_seg_ptr + pid)
    if seg >= num_segs:
        return
    a = tl.load(ad_ptr + seg)
    end = tl.load(seg_ptr + seg + 1)
    t = tl.load(seg_ptr + seg) + (pid - tl.load(tile_cu_ptr + seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = (t < end)[:, None] & (n < n_dim)[None, :]
    if HAS_BASE:
        acc = tl.load(y_ptr + t[:, None] * sy_t + n[None, :] * sy_n, mask=m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if a >= 0:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        ut = tl.load(u_ptr + t[:, None] * su_t + r[None, :] * su_r, mask=(t < end)[:, None] & r_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + a.to(tl.int64) * sw_a + n[None, :] * sw_n + r[:, None] * sw_r,
                     mask=(n < n_dim)[None, :] & r_ok[:, None], other=0.0)
        d = tl.dot(ut, wt.to(ut.dtype), input_precision=PREC)
        if HAS_SCALE:
            d = d * tl.load(scale_ptr + a)
        acc += d
    tl.store(out_ptr + t[:, None] * so_t + n[None, :] * so_n, acc.to(out_ptr.dtype.element_ty), mask=m)


def _seg_outer_kernel(p_ptr, q_ptr, out_ptr, seg_ptr, ad_ptr, scale_ptr, sp_t, sp_m, sq_t, sq_n, so_a, so_m, so_n,
                      num_segs, m_dim, n_dim, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr):
    # grid: (num_adapters, M tiles, N tiles). out[a] = scale[a] * sum over tokens t of adapter a of p[t]^T q[t]
    # p: [T, M], q: [T, N], out: [num_adapters, M, N]; one program owns its block (no atomics)
    a = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < m_dim
    n_ok = n < n_dim
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(0, num_segs):
        if tl.load(ad_ptr + s) == a:
            end = tl.load(seg_ptr + s + 1)
            for t0 in range(tl.load(seg_ptr + s), end, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                t_ok = t < end
                pt = tl.load(p_ptr + t[None, :] * sp_t + m[:, None] * sp_m, mask=m_ok[:, None] & t_ok[None, :],
                             other=0.0)                                              # [BLOCK_M, BLOCK_T]
                qt = tl.load(q_ptr + t[:, None] * sq_t + n[None, :] * sq_n, mask=t_ok[:, None] & n_ok[None, :],
                             other=0.0)                                              # [BLOCK_T, BLOCK_N]
                acc += tl.dot(pt, qt.to(pt.dtype), input_precision=PREC)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + a)
    tl.store(out_ptr + a * so_a + m[:, None] * so_m + n[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _block_m(num_tokens: int, num_segs: int) -> int:
    """Token tile: about the mean segment length, 16..64 (16 under the interpreter)."""
    if interpret_enabled():
        return 16
    return min(64, max(16, next_pow2(num_tokens // max(num_segs, 1))))


def _shrink(x: Tensor, w: Tensor, seg_starts: Tensor, seg_adapter: Tensor, scaling: Optional[Tensor]) -> Tensor:
    # x: [T, K], w: [num_adapters, R, K] (any strides) -> [T, R] in x's dtype
    T, K = x.shape
    R = w.shape[1]
    num_segs = seg_adapter.numel()
    block_m = _block_m(T, num_segs)
    block_k = 16 if interpret_enabled() else 128
    tile_seg, tile_cu, max_tiles = make_tile_map(seg_starts, block_m, T)
    # split K when there are too few token tiles to fill the GPU; partial sums are added below
    split = max(1, min(256 // max_tiles, K // (4 * block_k))) if not interpret_enabled() else min(2, -(-K // block_k))
    partial = torch.zeros((split, T, R), dtype=torch.float32, device=x.device)
    if T:
        jit(_shrink_kernel)[(max_tiles, split)](
            x, w, partial, seg_starts, seg_adapter, scaling if scaling is not None else seg_starts,
            tile_seg, tile_cu, *x.stride(), *w.stride(), *partial.stride(), num_segs, R, K,
            BLOCK_M=block_m, BLOCK_R=max(16, next_pow2(R)), BLOCK_K=block_k, SPLIT_K=split,
            HAS_SCALE=scaling is not None, PREC=dot_precision(x.dtype))
    return (partial[0] if split == 1 else partial.sum(0)).to(x.dtype)


def _expand(y: Optional[Tensor], u: Tensor, w: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
            scaling: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    # y: [T, N] or None (zeros), u: [T, R], w: [num_adapters, N, R] (any strides) -> [T, N]
    T, R = u.shape
    N = w.shape[1]
    num_segs = seg_adapter.numel()
    block_m = _block_m(T, num_segs)
    block_n = 32 if interpret_enabled() else 64
    out = torch.empty((T, N), dtype=out_dtype, device=u.device)
    if T == 0:
        return out
    tile_seg, tile_cu, max_tiles = make_tile_map(seg_starts, block_m, T)
    y_arg = y if y is not None else out
    jit(_expand_kernel)[(max_tiles, -(-N // block_n))](
        y_arg, u, w, out, seg_starts, seg_adapter, scaling if scaling is not None else seg_starts,
        tile_seg, tile_cu, *y_arg.stride(), *u.stride(), *w.stride(), *out.stride(), num_segs, R, N,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, next_pow2(R)),
        HAS_BASE=y is not None, HAS_SCALE=scaling is not None, PREC=dot_precision(u.dtype))
    return out


def _seg_outer(p: Tensor, q: Tensor, seg_starts: Tensor, seg_adapter: Tensor, num_adapters: int,
               scaling: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    # p: [T, M], q: [T, N] -> [num_adapters, M, N]: per adapter, the sum over its tokens of p^T q
    M, N = p.shape[1], q.shape[1]
    out = torch.empty((num_adapters, M, N), dtype=out_dtype, device=p.device)
    small = 16 if interpret_enabled() else 64
    block_m = max(16, next_pow2(M)) if M <= 32 else small
    block_n = max(16, next_pow2(N)) if N <= 32 else small
    jit(_seg_outer_kernel)[(num_adapters, -(-M // block_m), -(-N // block_n))](
        p, q, out, seg_starts, seg_adapter, scaling if scaling is not None else seg_starts,
        *p.stride(), *q.stride(), *out.stride(), seg_adapter.numel(), M, N,
        BLOCK_T=16 if interpret_enabled() else 32, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SCALE=scaling is not None, PREC=dot_precision(p.dtype))
    return out


def lora_shrink_triton(x: Tensor, A_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor) -> Tensor:
    """Triton :func:`lora_shrink_ref`. x: [T, H_in], A_stack: [num_adapters, r, H_in] -> u: [T, r]"""
    return _shrink(x, A_stack, seg_starts, seg_adapter, None)


def lora_expand_triton(y_base: Tensor, u: Tensor, B_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                       scaling: Tensor) -> Tensor:
    """Triton :func:`lora_expand_ref`. y_base: [T, H_out], u: [T, r], B_stack: [num_adapters, H_out, r]"""
    return _expand(y_base, u, B_stack, seg_starts, seg_adapter, scaling, y_base.dtype)


def lora_triton(x: Tensor, base_out: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
                seg_adapter: Tensor, scaling: Tensor) -> Tensor:
    """Triton :func:`lora_ref`: one shrink and one expand launch for all adapters."""
    _check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
    u = _shrink(x, A_stack, seg_starts, seg_adapter, None)
    return _expand(base_out, u, B_stack, seg_starts, seg_adapter, scaling, base_out.dtype)


def lora_backward_triton(dout: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
                         seg_adapter: Tensor, scaling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton :func:`lora_backward_ref`: dx, dA_stack, dB_stack in five launches."""
    num_adapters = A_stack.shape[0]
    u = _shrink(x, A_stack, seg_starts, seg_adapter, None)                               # [T, r]
    du = _shrink(dout, B_stack.transpose(1, 2), seg_starts, seg_adapter, scaling).to(x.dtype)   # [T, r]
    dx = _expand(None, du, A_stack.transpose(1, 2), seg_starts, seg_adapter, None, x.dtype)     # [T, H_in]
    dA = _seg_outer(du, x, seg_starts, seg_adapter, num_adapters, None, A_stack.dtype)          # [A, r, H_in]
    dB = _seg_outer(dout, u, seg_starts, seg_adapter, num_adapters, scaling, B_stack.dtype)     # [A, H_out, r]
    return dx, dA, dB


# ----------------------------------------------------------------- dispatch
@dataclasses.dataclass(frozen=True)
class _Backend:
    """One implementation of every piece (torch reference or Triton)."""

    shrink: Callable[..., Tensor]
    expand: Callable[..., Tensor]
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


_TORCH = _Backend(shrink=lora_shrink_ref, expand=lora_expand_ref, forward=lora_ref, backward=lora_backward_ref)
_TRITON = _Backend(shrink=lora_shrink_triton, expand=lora_expand_triton, forward=lora_triton,
                   backward=lora_backward_triton)


def _backend_for(x: Tensor) -> _Backend:
    """The device dispatch of this module: Triton for CUDA tensors, the reference otherwise.

    The rule (and the ``FLEXC_KERNELS`` override tests use) lives in ``_triton.use_triton``.
    """
    return _TRITON if use_triton(x) else _TORCH


def lora_shrink(x: Tensor, A_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor) -> Tensor:
    """u = x A[a]^T per segment, zero for tokens without adapter.

    x: [T, H_in], A_stack: [num_adapters, r, H_in], seg_starts: int32 [S+1], seg_adapter: int32 [S]
    -> u: [T, r] (dtype of x)
    """
    return _backend_for(x).shrink(x, A_stack, seg_starts, seg_adapter)


def lora_expand(y_base: Tensor, u: Tensor, B_stack: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                scaling: Tensor) -> Tensor:
    """y_base + scaling[a] * u B[a]^T per segment; rows without adapter are y_base.

    y_base: [T, H_out], u: [T, r], B_stack: [num_adapters, H_out, r], scaling: fp32 [num_adapters]
    -> out: [T, H_out] (dtype of y_base)
    """
    return _backend_for(u).expand(y_base, u, B_stack, seg_starts, seg_adapter, scaling)


def lora_forward(x: Tensor, base_out: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
                 seg_adapter: Tensor, scaling: Tensor) -> Tensor:
    """What ``flexc::lora`` computes, as a plain call (no dispatcher, no autograd wrapper).

    For graphs run under ``no_grad`` (the serving executor's inference graphs): on the CPU the op's Python
    wrapper costs about as much as the LoRA math of a decode batch. Shapes in the module docstring.
    """
    return _backend_for(x).forward(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)


# ----------------------------------------------------------------- custom ops
@torch.library.custom_op("flexc::lora", mutates_args=())
def lora(x: Tensor, base_out: Tensor, A_stack: Tensor, B_stack: Tensor, seg_starts: Tensor,
         seg_adapter: Tensor, scaling: Tensor) -> Tensor:
    """base_out plus every segment's adapter applied to x; see the module docstring for shapes."""
    return lora_forward(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling)


@lora.register_fake
def _lora_fake(x, base_out, A_stack, B_stack, seg_starts, seg_adapter, scaling):
    _check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
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
