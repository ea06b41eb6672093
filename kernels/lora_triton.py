"""Triton kernels of the multi-LoRA ops: segment-gather shrink and expand, and the per-adapter outer products
of the backward. Same arguments and results as :mod:`flexc.kernels.lora_ref`. Tiles of BLOCK_M tokens never
straddle segments (``make_tile_map``), so each program multiplies by ONE adapter's weights; kernel bodies are
jitted at first launch (:class:`~flexc.kernels._triton.Kernel`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flexc.kernels._triton import Kernel, dot_precision, interpret_enabled, make_tile_map, next_pow2, tl
from flexc.kernels.lora_ref import check_shapes

__all__ = ["lora_shrink_triton", "lora_expand_triton", "lora_triton", "lora_backward_triton"]


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


_SHRINK = Kernel(_shrink_kernel)


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


_EXPAND = Kernel(_expand_kernel)


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


_SEG_OUTER = Kernel(_seg_outer_kernel)


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
        _SHRINK[(max_tiles, split)](
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
    _EXPAND[(max_tiles, -(-N // block_n))](
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
    _SEG_OUTER[(num_adapters, -(-M // block_m), -(-N // block_n))](
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
    check_shapes(x, A_stack, B_stack, seg_starts, seg_adapter, scaling)
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
