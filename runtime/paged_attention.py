"""The serving executor's batched CPU path of ``flexc::attention`` over the paged cache.

``flexc::attention``'s torch reference (``kernels/attention.py``) attends one
sequence at a time: with 32 decode sequences and 30 layers that is ~1,000
small Python-level attention calls per iteration, which dominates a CPU decode
step. This module computes exactly the same contract for a batch prepared
once per iteration: the K/V of the new tokens are written through
``write_kv_ref``; all single-token (decode) sequences attend in ONE padded,
masked batched matmuls per KV head over whole gathered blocks (sequences grouped by
length to bound the padding); a first prefill chunk
attends to its own keys with torch's fused CPU flash attention (fp32, no
sliding window); later chunks (which also see cached keys) go through
``paged_attention_ref``.

The executor swaps it in for the op's call in its inference copy of each
layer graph (``attention="batched"``); with ``attention="op"`` the graph calls
the op itself. Follow-up: this belongs in ``kernels/`` as the CPU backend of
``flexc::attention`` (the Triton kernel already does one launch on GPU).

Invariant (tests/runtime/test_executor.py): the same logits, up to float
rounding, and the same greedy tokens as the op's reference path.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from flexc.kernels.attention import (PagedAttentionContext, current_paged_context, paged_attention_ref,
                                     write_kv_ref)

__all__ = ["BatchedPagedContext", "DecodeGroup", "paged_attention_batched", "make_decode_groups"]


@dataclasses.dataclass(kw_only=True)
class BatchedPagedContext(PagedAttentionContext):
    """A :class:`PagedAttentionContext` plus the decode/prefill split, computed once per iteration."""

    decode_groups: list["DecodeGroup"] = dataclasses.field(default_factory=list)
    """The single-token (decode) sequences, in groups of similar length (each group is padded to its longest)."""
    all_decode: bool = False
    """Every sequence is a single token, in one group in batch order (no gather/scatter of queries needed)."""
    prefill_idx: Optional[Tensor] = None
    """int64 [Tp]: flat-batch token index of the multi-token sequences' tokens (None: none)."""
    prefill_block_tables: Optional[Tensor] = None
    prefill_context_lens: Optional[Tensor] = None
    prefill_cu_seqlens: Optional[Tensor] = None


@dataclasses.dataclass(kw_only=True)
class DecodeGroup:
    """Decode sequences that attend together in one padded batched call."""

    idx: Tensor
    """int64 [n]: flat-batch token index of each sequence's (single) query token."""
    blocks: Tensor
    """int64 [n * nb]: each sequence's physical blocks, padded with block 0 to the group's longest (nb)."""
    total: Tensor
    """int64 [n]: keys of each sequence (cached tokens + the new one)."""
    bias: dict = dataclasses.field(default_factory=dict)
    """By sliding window (0 = none): [n, 1, L] additive key mask (:func:`_decode_bias`), built by the first
    layer that needs it."""


DECODE_GROUP_SIZE = 16
"""Decode sequences per padded attention call: sorting by length and grouping bounds the padding (the gathered
bytes) at a few more calls per layer."""


def make_decode_groups(token_idx: Tensor, block_tables: Tensor, context_lens: Tensor,
                       group_size: int = DECODE_GROUP_SIZE) -> list[DecodeGroup]:
    """Group decode sequences by length (one group, in batch order, when they fit in one).

    token_idx: int64 [Nd] flat-batch index of each query, block_tables: int32 [Nd, B] (-1 unused),
    context_lens: int32 [Nd] (each decode token is at that position).
    """
    total = context_lens.long() + 1                                          # keys incl. the new token
    order = torch.arange(len(total)) if len(total) <= group_size else torch.argsort(total)
    groups = []
    for sel in order.split(group_size):
        bt = block_tables[sel]
        nb = int((bt >= 0).sum(1).max())
        groups.append(DecodeGroup(idx=token_idx[sel], blocks=bt[:, :nb].long().clamp_min(0).reshape(-1).contiguous(),
                                  total=total[sel]))
    return groups


def _decode_bias(grp: DecodeGroup, window: int, dtype: torch.dtype, num_keys: int) -> Tensor:
    """[n, 1, L] additive mask: 0 where a key is inside the sequence (and the window), -inf elsewhere."""
    bias = grp.bias.get(window)
    if bias is None:
        j = torch.arange(num_keys)
        visible = j[None, :] < grp.total[:, None]                            # [n, L]
        if window > 0:
            visible &= j[None, :] > (grp.total[:, None] - 1 - window)
        bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None, :]
        grp.bias[window] = bias
    return bias


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _decode_attention(q: Tensor, kc: Tensor, vc: Tensor, grp: DecodeGroup, scale: float,
                      window: int) -> tuple[Tensor, Tensor]:
    # q: [Nd, Hq, D], caches [num_blocks, block_size, Hkv, D] -> out [Nd, Hq, D], lse [Hq, Nd]
    nd, hq, d = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    a = _acc(q)
    num_keys = grp.blocks.numel() // nd * bs
    # NOTE: whole blocks are gathered (one contiguous copy each); per KV head, its keys/values are strided
    # [Nd, L, D] views of the gathered rows that BLAS reads in place (no transpose copy)
    kk = kc.index_select(0, grp.blocks).view(nd, num_keys, hkv, d).to(a)       # [Nd, L, Hkv, D]
    vv = vc.index_select(0, grp.blocks).view(nd, num_keys, hkv, vc.shape[3]).to(a)
    bias = _decode_bias(grp, window, a, num_keys)
    qa = q.to(a)
    g = hq // hkv
    outs, lses = [], []
    for h in range(hkv):
        s = torch.baddbmm(bias, qa[:, h * g:(h + 1) * g], kk[:, :, h].transpose(1, 2), alpha=scale)  # [Nd, G, L]
        p = torch.softmax(s, dim=-1)
        # log-sum-exp without a second exp pass: at the row maximum p = exp(0) / sum, so lse = max - log(p_max)
        lses.append(s.amax(dim=-1) - torch.log(p.amax(dim=-1)))                      # [Nd, G]
        outs.append(torch.bmm(p, vv[:, :, h]))                                         # [Nd, G, Dv]
    return torch.stack(outs, 1).view(nd, hq, -1), torch.cat(lses, 1).t()


def _prefill_attention(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, ctx: BatchedPagedContext,
                       scale: float, window: int) -> tuple[Tensor, Tensor]:
    # q: [Tp, Hq, D], k/v: [Tp, Hkv, D] (the prefill tokens only) -> out [Tp, Hq, D], lse [Hq, Tp]
    if window > 0 or q.dtype != torch.float32:
        return paged_attention_ref(q, kc, vc, ctx.prefill_block_tables, ctx.prefill_context_lens,
                                   ctx.prefill_cu_seqlens, scale, window)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    bounds = ctx.prefill_cu_seqlens.tolist()
    for i, c in enumerate(ctx.prefill_context_lens.tolist()):
        s, e = bounds[i], bounds[i + 1]
        if c:                          # a later chunk: attends to cached keys too
            o, l = paged_attention_ref(q[s:e], kc, vc, ctx.prefill_block_tables[i:i + 1],
                                       ctx.prefill_context_lens[i:i + 1], ctx.prefill_cu_seqlens.new_tensor([0, e - s]),
                                       scale, window)
        else:                          # a whole first chunk: causal attention over its own keys, fused
            g = q.shape[1] // k.shape[1]
            qh = q[s:e].transpose(0, 1)[None]                                            # [1, Hq, n, D]
            kh = k[s:e].transpose(0, 1).repeat_interleave(g, 0)[None]
            vh = v[s:e].transpose(0, 1).repeat_interleave(g, 0)[None]
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, True, scale=scale)
            o, l = o[0].transpose(0, 1), l[0]
        out[s:e] = o
        lse[:, s:e] = l
    return out, lse


def paged_attention_batched(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
                            window: int) -> tuple[Tensor, Tensor]:
    """Same signature and result as ``torch.ops.flexc.attention`` under a :class:`BatchedPagedContext`.

    q: [T, Hq, D], k/v: [T, Hkv, D], cu_seqlens: int32 [N+1] -> out [T, Hq, D], lse fp32 [Hq, T]
    """
    ctx = current_paged_context()
    if not isinstance(ctx, BatchedPagedContext):
        return torch.ops.flexc.attention(q, k, v, cu_seqlens, scale, window)
    kc, vc = ctx.k_caches[ctx.layer], ctx.v_caches[ctx.layer]
    write_kv_ref(k, v, kc, vc, ctx.slot_mapping)
    if not ctx.decode_groups:                  # prefill only: the plan's prefill part is the whole batch
        return _prefill_attention(q, k, v, kc, vc, ctx, scale, window)
    if ctx.all_decode:
        out, lse = _decode_attention(q, kc, vc, ctx.decode_groups[0], scale, window)
        return out.to(q.dtype), lse
    T, hq, _ = q.shape
    out = q.new_empty((T, hq, v.shape[2]))
    lse = q.new_empty((hq, T), dtype=torch.promote_types(q.dtype, torch.float32))
    for grp in ctx.decode_groups:
        o, l = _decode_attention(q.index_select(0, grp.idx), kc, vc, grp, scale, window)
        out.index_copy_(0, grp.idx, o.to(q.dtype))
        lse.index_copy_(1, grp.idx, l.to(lse.dtype))
    if ctx.prefill_idx is not None:
        pi = ctx.prefill_idx
        o, l = _prefill_attention(q.index_select(0, pi), k.index_select(0, pi), v.index_select(0, pi), kc, vc, ctx,
                                  scale, window)
        out.index_copy_(0, ctx.prefill_idx, o)
        lse.index_copy_(1, ctx.prefill_idx, l)
    return out, lse
