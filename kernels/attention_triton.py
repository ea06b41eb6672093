"""Triton kernels of the attention ops: ragged paged forward, varlen forward, FlashAttention-2 backward, KV write.

Same arguments and results as the references in :mod:`flexc.kernels.attention_ref`, each from one
launch per piece. A query tile's rows are (token, head) pairs: BLOCK_Q tokens of one sequence times the G
query heads that share a KV head, so every K/V tile is loaded once per group (GQA) and a decode token still
fills G rows. Tiles never straddle sequences (see ``make_tile_map``). Kernel bodies are jitted at first
launch (:class:`~flexc.kernels._triton.Kernel`); softmax runs in base 2.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flexc.kernels._triton import Kernel, dot_precision, interpret_enabled, make_tile_map, next_pow2, tl

__all__ = ["varlen_attention_triton", "varlen_attention_backward_triton", "paged_attention_triton",
           "write_kv_triton"]


def _attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, ctx_ptr, bt_ptr, tile_seq_ptr, tile_cu_ptr,
        sq_t, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, so_t, so_h, so_d, sl_h, sl_t, s_bt,
        num_seqs, block_size, head_dim, scale, window,
        G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PAGED: tl.constexpr, PREC: tl.constexpr):
    # grid: (query tiles, Hkv). PAGED: k/v are [num_blocks, block_size, Hkv, D] caches
    # read through bt_ptr; otherwise k/v are [T, Hkv, D] and sk_b/sv_b are token strides.
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + pid)
    if seq >= num_seqs:
        return
    q0 = (pid - tl.load(tile_cu_ptr + seq)) * BLOCK_Q
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    if PAGED:
        ctx = tl.load(ctx_ptr + seq)
    else:
        ctx = 0
    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (tok < seq_len)
    q_pos = ctx + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    qm = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (start + tok)[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d, mask=qm, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    hi = ctx + tl.minimum(q0 + BLOCK_Q, seq_len)                  # keys [lo, hi) can be visible
    lo = tl.maximum(ctx + q0 - window + 1, 0) * (window > 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        if PAGED:
            blk = tl.load(bt_ptr + seq * s_bt + n // block_size, mask=n_ok, other=0).to(tl.int64)
            k_off = blk * sk_b + (n % block_size) * sk_s
            v_off = blk * sv_b + (n % block_size) * sv_s
        else:
            k_off = (start + n).to(tl.int64) * sk_b
            v_off = (start + n).to(tl.int64) * sv_b
        kt = tl.load(k_ptr + k_off[None, :] + kvh * sk_h + d[:, None] * sk_d,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)       # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt.to(q.dtype), input_precision=PREC) * qk_scale
        ok = (n[None, :] <= q_pos[:, None]) & n_ok[None, :] & row_ok[:, None]
        ok = ok & ((n[None, :] > q_pos[:, None] - window) | (window <= 0))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_ptr + v_off[:, None] + kvh * sv_h + d[None, :] * sv_d,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)       # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), vv.to(q.dtype), input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + (start + tok)[:, None] * so_t + head[:, None] * so_h + d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=qm)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(lse_ptr + head * sl_h + (start + tok) * sl_t, lse, mask=row_ok)


_ATTN_FWD = Kernel(_attn_fwd_kernel)


def _attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, tile_seq_ptr, tile_cu_ptr,
        sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, sdo_t, sdo_h, sdo_d, sdq_t, sdq_h, sdq_d,
        sl_h, sl_t, num_seqs, head_dim, scale, window,
        G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    # grid: (query tiles, Hkv); dq of one tile = sum over its key tiles of dS·K
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + pid)
    if seq >= num_seqs:
        return
    q0 = (pid - tl.load(tile_cu_ptr + seq)) * BLOCK_Q
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (tok < seq_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    qm = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (start + tok)[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d, mask=qm, other=0.0)
    do = tl.load(do_ptr + (start + tok)[:, None] * sdo_t + head[:, None] * sdo_h + d[None, :] * sdo_d,
                 mask=qm, other=0.0).to(q.dtype)
    lse = tl.load(lse_ptr + head * sl_h + (start + tok) * sl_t, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + head * sl_h + (start + tok) * sl_t, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    hi = tl.minimum(q0 + BLOCK_Q, seq_len)
    lo = tl.maximum(q0 - window + 1, 0) * (window > 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        km = n_ok[:, None] & d_ok[None, :]
        kk = tl.load(k_ptr + (start + n)[:, None] * sk_t + kvh * sk_h + d[None, :] * sk_d, mask=km, other=0.0)
        vv = tl.load(v_ptr + (start + n)[:, None] * sv_t + kvh * sv_h + d[None, :] * sv_d, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(kk.to(q.dtype)), input_precision=PREC) * qk_scale
        ok = (n[None, :] <= tok[:, None]) & n_ok[None, :] & row_ok[:, None]
        ok = ok & ((n[None, :] > tok[:, None] - window) | (window <= 0))
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vv.to(q.dtype)), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), kk.to(q.dtype), input_precision=PREC)
    tl.store(dq_ptr + (start + tok)[:, None] * sdq_t + head[:, None] * sdq_h + d[None, :] * sdq_d,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qm)


_ATTN_BWD_DQ = Kernel(_attn_bwd_dq_kernel)


def _attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, tile_seq_ptr, tile_cu_ptr,
        sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, sdo_t, sdo_h, sdo_d,
        sdk_t, sdk_h, sdk_d, sdv_t, sdv_h, sdv_d, sl_h, sl_t, num_seqs, head_dim, scale, window,
        G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    # grid: (key tiles, Hkv); one program owns dk/dv of its keys and sums over the group's heads
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + pid)
    if seq >= num_seqs:
        return
    k0 = (pid - tl.load(tile_cu_ptr + seq)) * BLOCK_N
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    n = k0 + tl.arange(0, BLOCK_N)
    n_ok = n < seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    km = n_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_ptr + (start + n)[:, None] * sk_t + kvh * sk_h + d[None, :] * sk_d, mask=km, other=0.0)
    vv = tl.load(v_ptr + (start + n)[:, None] * sv_t + kvh * sv_h + d[None, :] * sv_d, mask=km, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    rows = tl.arange(0, BLOCK_M)
    q_hi = tl.where(window > 0, tl.minimum(seq_len, k0 + BLOCK_N - 1 + window), seq_len)
    for t0 in range(k0, q_hi, BLOCK_Q):                                  # queries that can see these keys
        tok = t0 + rows // G
        head = kvh * G + rows % G
        row_ok = (rows < BLOCK_Q * G) & (tok < seq_len)
        qm = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + (start + tok)[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d,
                    mask=qm, other=0.0)
        do = tl.load(do_ptr + (start + tok)[:, None] * sdo_t + head[:, None] * sdo_h + d[None, :] * sdo_d,
                     mask=qm, other=0.0).to(q.dtype)
        lse = tl.load(lse_ptr + head * sl_h + (start + tok) * sl_t, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + head * sl_h + (start + tok) * sl_t, mask=row_ok, other=0.0)
        st = tl.dot(kk.to(q.dtype), tl.trans(q), input_precision=PREC) * qk_scale     # [BLOCK_N, BLOCK_M]
        ok = (n[:, None] <= tok[None, :]) & n_ok[:, None] & row_ok[None, :]
        ok = ok & ((n[:, None] > tok[None, :] - window) | (window <= 0))
        pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(q.dtype), do, input_precision=PREC)
        dpt = tl.dot(vv.to(q.dtype), tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    tl.store(dk_ptr + (start + n)[:, None] * sdk_t + kvh * sdk_h + d[None, :] * sdk_d,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=km)
    tl.store(dv_ptr + (start + n)[:, None] * sdv_t + kvh * sdv_h + d[None, :] * sdv_d,
             dv.to(dv_ptr.dtype.element_ty), mask=km)


_ATTN_BWD_DKDV = Kernel(_attn_bwd_dkdv_kernel)


def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
                     skc_b, skc_s, skc_h, skc_d, svc_b, svc_s, svc_h, svc_d, block_size, num_heads, head_dim,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (T,); token t's [Hkv, D] keys/values go to cache slot slot_mapping[t] (< 0: skipped)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    m = (h < num_heads) & (d < head_dim)
    kk = tl.load(k_ptr + t * sk_t + h * sk_h + d * sk_d, mask=m)
    tl.store(kc_ptr + blk * skc_b + off * skc_s + h * skc_h + d * skc_d, kk.to(kc_ptr.dtype.element_ty), mask=m)
    vv = tl.load(v_ptr + t * sv_t + h * sv_h + d * sv_d, mask=m)
    tl.store(vc_ptr + blk * svc_b + off * svc_s + h * svc_h + d * svc_d, vv.to(vc_ptr.dtype.element_ty), mask=m)


_WRITE_KV = Kernel(_write_kv_kernel)


def _tiles(q: Tensor, num_kv_heads: int, value_dim: int, num_seqs: int) -> tuple[int, int, int, int]:
    """(G, BLOCK_Q, BLOCK_M, BLOCK_N) for the attention kernels; small tiles in the interpreter."""
    T, num_q_heads, head_dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads {num_q_heads} must be a multiple of KV heads {num_kv_heads}")
    if value_dim != head_dim:
        raise ValueError(f"the Triton kernels need value head dim == query head dim; got {value_dim} != {head_dim}")
    g = num_q_heads // num_kv_heads
    # 64x64 tiles for 16-bit inputs; fp32 tiles take twice the shared memory, so halve them
    big = 64 if q.element_size() <= 2 else 32
    block_n = 16 if interpret_enabled() else big
    # an all-decode batch (one query per sequence) only fills G rows of a tile: keep tiles small
    block_m = 16 if interpret_enabled() or T <= num_seqs else big
    block_m = max(block_m, next_pow2(g))
    return g, block_m // g, block_m, block_n


def _attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, window: int,
                          paged: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    # q: [T, Hq, D]; k/v: [T, Hkv, D], or caches [num_blocks, block_size, Hkv, D] when
    # paged=(block_tables, context_lens)
    T, Hq, D = q.shape
    Hkv = k.shape[-2]
    num_seqs = cu_seqlens.numel() - 1
    g, block_q, block_m, block_n = _tiles(q, Hkv, v.shape[-1], num_seqs)
    out = q.new_empty((T, Hq, D))
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    tile_seq, tile_cu, max_tiles = make_tile_map(cu_seqlens, block_q, T)
    if paged is None:
        kst, vst = (k.stride(0), 0, k.stride(1), k.stride(2)), (v.stride(0), 0, v.stride(1), v.stride(2))
        block_tables, context_lens, bt_stride, block_size = cu_seqlens, cu_seqlens, 0, 1   # unused
    else:
        block_tables, context_lens = paged
        kst, vst, bt_stride, block_size = k.stride(), v.stride(), block_tables.stride(0), k.shape[1]
    _ATTN_FWD[(max_tiles, Hkv)](
        q, k, v, out, lse, cu_seqlens, context_lens, block_tables, tile_seq, tile_cu,
        *q.stride(), *kst, *vst, *out.stride(), *lse.stride(), bt_stride,
        num_seqs, block_size, D, float(scale), int(window),
        G=g, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        PAGED=paged is not None, PREC=dot_precision(q.dtype))
    return out, lse


def varlen_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
                            window: int = 0) -> tuple[Tensor, Tensor]:
    """Triton :func:`varlen_attention_ref`: one launch over all sequences.

    q: [T, Hq, D], k/v: [T, Hkv, D], cu_seqlens: int32 [N+1] -> out [T, Hq, D], lse fp32 [Hq, T]
    """
    return _attention_fwd_triton(q, k, v, cu_seqlens, scale, window, None)


def paged_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, cu_seqlens: Tensor, scale: float,
                           window: int = 0) -> tuple[Tensor, Tensor]:
    """Triton :func:`paged_attention_ref`: prefill chunks and decode tokens in one launch.

    q: [T, Hq, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], block_tables: int32 [N, B],
    context_lens: int32 [N], cu_seqlens: int32 [N+1] -> out [T, Hq, D], lse fp32 [Hq, T]
    """
    return _attention_fwd_triton(q, k_cache, v_cache, cu_seqlens, scale, window, (block_tables, context_lens))


def varlen_attention_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                     cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                                     window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Triton :func:`varlen_attention_backward_ref` (FlashAttention-2: P recomputed from q, k and lse).

    dout/out: [T, Hq, D], lse/dlse: [Hq, T] -> dq [T, Hq, D], dk/dv [T, Hkv, D]
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    g, block_q, block_m, block_n = _tiles(q, Hkv, v.shape[-1], num_seqs)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if T == 0:
        return dq, dk, dv
    delta = (dout.float() * out.float()).sum(-1).t()                             # [Hq, T]
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    common = dict(G=g, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
                  PREC=dot_precision(q.dtype))
    tile_seq, tile_cu, max_tiles = make_tile_map(cu_seqlens, block_q, T)
    _ATTN_BWD_DQ[(max_tiles, Hkv)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, tile_seq, tile_cu,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *lse.stride(),
        num_seqs, D, float(scale), int(window), **common)
    tile_seq, tile_cu, max_tiles = make_tile_map(cu_seqlens, block_n, T)
    _ATTN_BWD_DKDV[(max_tiles, Hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, tile_seq, tile_cu,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        num_seqs, D, float(scale), int(window), **common)
    return dq, dk, dv


def write_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Triton :func:`write_kv_ref` (keys and values in one launch; negative slots are skipped).

    k/v: [T, Hkv, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], slot_mapping: int64 [T]
    """
    T, Hkv, D = k.shape
    if T == 0:
        return
    _WRITE_KV[(T,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        k_cache.shape[1], Hkv, D, BLOCK_H=next_pow2(Hkv), BLOCK_D=next_pow2(D))
