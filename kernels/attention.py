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

Every function here is the torch reference; ``kernels/triton_attention.py``
(when present) provides GPU kernels with the same contracts.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "PagedAttentionContext",
    "paged_context",
    "current_paged_context",
    "varlen_attention_ref",
    "varlen_attention_backward_ref",
    "paged_attention_ref",
    "write_kv_ref",
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


# ----------------------------------------------------------------- custom ops
@torch.library.custom_op("flexc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
              window: int) -> tuple[Tensor, Tensor]:
    """See the module docstring: varlen causal attention, or paged when a context is current."""
    ctx = current_paged_context()
    if ctx is None:
        return varlen_attention_ref(q, k, v, cu_seqlens, scale, window)
    kc, vc = ctx.k_caches[ctx.layer], ctx.v_caches[ctx.layer]
    write_kv_ref(k, v, kc, vc, ctx.slot_mapping)
    return paged_attention_ref(q, kc, vc, ctx.block_tables, ctx.context_lens, cu_seqlens, scale, window)


@attention.register_fake
def _attention_fake(q, k, v, cu_seqlens, scale, window):
    T, Hq, _ = q.shape
    return q.new_empty((T, Hq, v.shape[2])), q.new_empty((Hq, T), dtype=_acc_dtype(q))


@torch.library.custom_op("flexc::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                       window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``flexc::attention`` over full sequences (no cache involved)."""
    return varlen_attention_backward_ref(dout, q, k, v, out, lse, cu_seqlens, dlse, scale, window)


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
