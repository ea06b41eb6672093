"""Ragged (varlen) causal attention as the torch custom op ``flexc::attention``.

The captured decoder-layer graphs call exactly one attention node, so they stay
independent of the device and of how the KV cache is laid out:

    flexc::attention(q, k, v, cu_seqlens, scale, window) -> (out, lse)
      q:   [T, Hq, D]     queries of one flat batch of T tokens
      k,v: [T, Hkv, D]    keys/values of the same tokens (GQA: Hq % Hkv == 0)
      cu_seqlens: int32 [N+1]  sequence starts, cu[0] == 0, cu[-1] == T
      out: [T, Hq, D]     (dtype of q)
      lse: [Hq, T] fp32   natural-log log-sum-exp of the scaled scores

Two ways to execute it, chosen by whether the runtime has made a paged-cache
context current (see ``paged_context``):

* no context (capture, full-sequence training, tests): every sequence attends
  causally to itself only (block-diagonal causal attention);
* a :class:`PagedAttentionContext` is current (serving): the new K/V are first
  written into the paged cache of the context's current layer, then every query
  token attends to its sequence's cached tokens plus the new ones before it.

Its backward (``flexc::attention_backward``) recomputes the probabilities from
q, k and the log-sum-exp instead of storing them (FlashAttention style).

Every ``*_ref`` function is the torch reference; the ``*_triton`` function of the
same name takes the same arguments and returns the same result from one Triton
launch per piece (ragged paged forward, varlen forward, FlashAttention-2
backward, KV write). The ops pick one by device in ``_backend_for``: CUDA tensors
run Triton, everything else the reference (``FLEXC_KERNELS`` overrides, see
``flexc.kernels._triton``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from flexc.kernels._triton import dot_precision, interpret_enabled, jit, make_tile_map, next_pow2, tl, use_triton

__all__ = [
    "PagedAttentionContext",
    "paged_context",
    "current_paged_context",
    "varlen_attention_ref",
    "varlen_attention_backward_ref",
    "paged_attention_ref",
    "write_kv_ref",
    "varlen_attention_triton",
    "varlen_attention_backward_triton",
    "paged_attention_triton",
    "write_kv_triton",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half types and fp32, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _causal_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    # q_pos: [Tq], k_pos: [Tk] absolute positions in one sequence -> [Tq, Tk] bool, True = attend
    m = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        m &= k_pos[None, :] > q_pos[:, None] - window
    return m


def _segment_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                       scale: float, window: int) -> tuple[Tensor, Tensor]:
    """Attention of one sequence's queries to its keys.

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] -> out [Tq, Hq, D] (acc dtype), lse [Hq, Tq] (acc dtype)
    """
    a = _acc_dtype(q)
    g = q.shape[1] // k.shape[1]
    qf = q.to(a).transpose(0, 1)                                   # [Hq, Tq, D]
    kf = k.to(a).transpose(0, 1).repeat_interleave(g, 0)           # [Hq, Tk, D]
    vf = v.to(a).transpose(0, 1).repeat_interleave(g, 0)           # [Hq, Tk, Dv]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale             # [Hq, Tq, Tk]
    s = s.masked_fill(~_causal_mask(q_pos, k_pos, window), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                               # [Hq, Tq]
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, vf).transpose(0, 1), lse


def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
                         window: int = 0) -> tuple[Tensor, Tensor]:
    """Block-diagonal causal attention over a flat batch (torch reference).

    q: [T, Hq, D], k/v: [T, Hkv, D], cu_seqlens: int32 [N+1] -> out [T, Hq, D], lse [Hq, T]
    ``window`` > 0 limits each query to the last ``window`` keys (sliding window).
    """
    T, Hq, _ = q.shape
    a = _acc_dtype(q)
    out = q.new_empty((T, Hq, v.shape[2]))
    lse = q.new_empty((Hq, T), dtype=a)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        pos = torch.arange(e - s, device=q.device)
        o, l = _segment_attention(q[s:e], k[s:e], v[s:e], pos, pos, scale, window)
        out[s:e] = o.to(q.dtype)
        lse[:, s:e] = l
    return out, lse


def varlen_attention_backward_ref(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                                  window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`varlen_attention_ref`, recomputing P from q, k and lse.

    dout/out: [T, Hq, D], lse/dlse: [Hq, T] -> dq [T, Hq, D], dk/dv [T, Hkv, D]
    """
    a = _acc_dtype(q)
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        qf = q[s:e].to(a).transpose(0, 1)                           # [Hq, n, D]
        kf = k[s:e].to(a).transpose(0, 1).repeat_interleave(g, 0)   # [Hq, n, D]
        vf = v[s:e].to(a).transpose(0, 1).repeat_interleave(g, 0)
        do = dout[s:e].to(a).transpose(0, 1)
        o = out[s:e].to(a).transpose(0, 1)
        sc = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~_causal_mask(pos, pos, window), float("-inf"))
        p = torch.exp(sc - lse[:, s:e, None].to(a))                  # [Hq, n, n]
        dvh = torch.matmul(p.transpose(-1, -2), do)                  # [Hq, n, D]
        dp = torch.matmul(do, vf.transpose(-1, -2))
        delta = (do * o).sum(-1)                                     # [Hq, n]
        if dlse is not None:
            delta = delta - dlse[:, s:e].to(a)
        ds = p * (dp - delta[..., None])
        dqh = torch.matmul(ds, kf) * scale
        dkh = torch.matmul(ds.transpose(-1, -2), qf) * scale
        dq[s:e] = dqh.transpose(0, 1).to(q.dtype)
        dk[s:e] = dkh.view(Hkv, g, n, -1).sum(1).transpose(0, 1).to(k.dtype)
        dv[s:e] = dvh.view(Hkv, g, n, -1).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------- paged cache
@dataclasses.dataclass(kw_only=True)
class PagedAttentionContext:
    """What the runtime tells the attention op about the paged KV cache for one batch.

    The flat batch holds N sequences; sequence ``i`` has query tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (the op's own argument) at absolute
    positions ``context_lens[i] .. context_lens[i] + num_new - 1``.
    """

    k_caches: list[Tensor]
    """Per layer, keys: [num_blocks, block_size, Hkv, D]."""
    v_caches: list[Tensor]
    """Per layer, values: [num_blocks, block_size, Hkv, D]."""
    block_tables: Tensor
    """int32 [N, max_blocks_per_seq]: physical block of each logical block (-1 = unused)."""
    context_lens: Tensor
    """int32 [N]: tokens of each sequence already in the cache before this batch."""
    slot_mapping: Tensor
    """int64 [T]: cache slot (block * block_size + offset) where each new token's K/V go."""
    layer: int = 0
    """Index of the layer being executed; the executor sets it before each layer."""


_CURRENT: list[PagedAttentionContext] = []


@contextlib.contextmanager
def paged_context(ctx: PagedAttentionContext) -> Iterator[PagedAttentionContext]:
    """Make ``ctx`` the cache the attention op reads and writes while the block runs."""
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()


def current_paged_context() -> Optional[PagedAttentionContext]:
    """The innermost active paged context, or None (plain varlen attention)."""
    return _CURRENT[-1] if _CURRENT else None


def write_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new keys/values into the paged cache.

    k/v: [T, Hkv, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], slot_mapping: int64 [T]
    """
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def paged_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                        cu_seqlens: Tensor, scale: float, window: int = 0) -> tuple[Tensor, Tensor]:
    """Attention of new query tokens to their sequence's paged cache (new tokens already written).

    q: [T, Hq, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], block_tables: int32 [N, B],
    context_lens: int32 [N] (cached tokens before the new ones), cu_seqlens: int32 [N+1]
    -> out [T, Hq, D], lse [Hq, T]
    """
    T, Hq, _ = q.shape
    bs = k_cache.shape[1]
    out = q.new_empty((T, Hq, v_cache.shape[3]))
    lse = q.new_empty((Hq, T), dtype=_acc_dtype(q))
    bounds = cu_seqlens.tolist()
    ctx_lens = context_lens.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e == s:
            continue
        total = ctx_lens[i] + (e - s)
        nblk = -(-total // bs)
        blocks = block_tables[i, :nblk].long()
        kk = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:total]   # [total, Hkv, D]
        vv = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:total]
        q_pos = torch.arange(ctx_lens[i], total, device=q.device)
        k_pos = torch.arange(total, device=q.device)
        o, l = _segment_attention(q[s:e], kk, vv, q_pos, k_pos, scale, window)
        out[s:e] = o.to(q.dtype)
        lse[:, s:e] = l
    return out, lse


# ----------------------------------------------------------------- Triton kernels
# Same contracts as the references above. A query tile's rows are (token, head)
# pairs: BLOCK_Q tokens of one sequence times the G query heads that share a KV
# head, so every K/V tile is loaded once per group (GQA) and a decode token still
# fills G rows. Tiles never straddle sequences (see ``make_tile_map``). Kernel
# bodies are jitted at first launch by ``_triton.jit``; softmax runs in base 2.

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
    jit(_attn_fwd_kernel)[(max_tiles, Hkv)](
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
    jit(_attn_bwd_dq_kernel)[(max_tiles, Hkv)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, tile_seq, tile_cu,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *lse.stride(),
        num_seqs, D, float(scale), int(window), **common)
    tile_seq, tile_cu, max_tiles = make_tile_map(cu_seqlens, block_n, T)
    jit(_attn_bwd_dkdv_kernel)[(max_tiles, Hkv)](
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
    jit(_write_kv_kernel)[(T,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        k_cache.shape[1], Hkv, D, BLOCK_H=next_pow2(Hkv), BLOCK_D=next_pow2(D))


# ----------------------------------------------------------------- dispatch
@dataclasses.dataclass(frozen=True)
class _Backend:
    """One implementation of every piece the ops need (torch reference or Triton)."""

    varlen: Callable[..., tuple[Tensor, Tensor]]
    varlen_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    paged: Callable[..., tuple[Tensor, Tensor]]
    write_kv: Callable[..., None]


_TORCH = _Backend(varlen=varlen_attention_ref, varlen_backward=varlen_attention_backward_ref,
                  paged=paged_attention_ref, write_kv=write_kv_ref)
_TRITON = _Backend(varlen=varlen_attention_triton, varlen_backward=varlen_attention_backward_triton,
                   paged=paged_attention_triton, write_kv=write_kv_triton)


def _backend_for(q: Tensor) -> _Backend:
    """The device dispatch of the attention ops: Triton for CUDA tensors, the reference otherwise.

    The rule (and the ``FLEXC_KERNELS`` override tests use) lives in ``_triton.use_triton``.
    """
    return _TRITON if use_triton(q) else _TORCH


# ----------------------------------------------------------------- custom ops
@torch.library.custom_op("flexc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
              window: int) -> tuple[Tensor, Tensor]:
    """See the module docstring: varlen causal attention, or paged when a context is current."""
    backend = _backend_for(q)
    ctx = current_paged_context()
    if ctx is None:
        return backend.varlen(q, k, v, cu_seqlens, scale, window)
    kc, vc = ctx.k_caches[ctx.layer], ctx.v_caches[ctx.layer]
    backend.write_kv(k, v, kc, vc, ctx.slot_mapping)
    return backend.paged(q, kc, vc, ctx.block_tables, ctx.context_lens, cu_seqlens, scale, window)


@attention.register_fake
def _attention_fake(q, k, v, cu_seqlens, scale, window):
    T, Hq, _ = q.shape
    return q.new_empty((T, Hq, v.shape[2])), q.new_empty((Hq, T), dtype=_acc_dtype(q))


@torch.library.custom_op("flexc::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                       window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``flexc::attention`` over full sequences (no cache involved)."""
    return _backend_for(q).varlen_backward(dout, q, k, v, out, lse, cu_seqlens, dlse, scale, window)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens, dlse, scale, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.window = scale, window
    # lse is rarely used downstream: leave its gradient None so the backward stays one node
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flexc.attention_backward(dout, q, k, v, out, lse, cu_seqlens, dlse,
                                                    ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("flexc::attention", _backward, setup_context=_setup_context)
