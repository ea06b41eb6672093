"""Torch references of the attention ops: the contracts spelled out in plain tensor code.

They are the test oracle every other backend (:mod:`flexc.kernels.attention_cpu`,
:mod:`flexc.kernels.attention_triton`) is compared against, and what runs where no
faster backend applies (fp64 gradchecks, ``FLEXC_KERNELS=torch``). They materialize
each sequence's ``[H, Tq, Tk]`` scores: correct, slow for long sequences.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["varlen_attention_ref", "varlen_attention_backward_ref", "paged_attention_ref", "write_kv_ref"]


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
