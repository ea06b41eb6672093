"""The CPU backend of the attention ops: torch's fused attention kernels instead of materialized scores.

Same contracts as the references in :mod:`flexc.kernels.attention` (which stay the test oracle):

* :func:`varlen_attention_cpu` / :func:`varlen_attention_backward_cpu`: whole sequences (training), one
  fused causal flash-attention call per sequence, forward and backward (torch's CPU flash kernel, which
  also returns the log-sum-exp the backward needs); never an ``[H, T, T]`` score tensor;
* :func:`paged_attention_cpu`: the serving batch over the paged cache. Single-token sequences (decodes)
  attend in one fused call per group of similar length over whole gathered blocks (padded keys masked); a chunk with no cached context (a first prefill or finetuning chunk)
  runs the fused causal kernel over its own keys; a later chunk runs the fused kernel over its gathered
  cached keys with an additive ``[chunk, context]`` mask (bottom-right causal).

Sliding windows, and a backward that needs the log-sum-exp's own gradient, use the references.
The batch plan (which sequences decode, their groups) is derived from the op's arguments on every call:
the ops hold no state between calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flexc.kernels.attention_ref import paged_attention_ref, varlen_attention_backward_ref, varlen_attention_ref

__all__ = ["varlen_attention_cpu", "varlen_attention_backward_cpu", "paged_attention_cpu", "DECODE_GROUP_SIZE"]

DECODE_GROUP_SIZE = 16
"""Decode sequences per padded attention call: sorting by length and grouping bounds the padding (the gathered
bytes) at a few more calls per layer."""
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads(x: Tensor, groups: int) -> Tensor:
    # x: [n, Hkv, D] -> [1, Hkv * groups, n, D] (each KV head repeated for the query heads that share it)
    x = x.transpose(0, 1)
    return (x.repeat_interleave(groups, 0) if groups > 1 else x)[None]


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    # q: [n, Hq, D], k/v: [m, Hkv, D] -> out [n, Hq, D], lse fp32 [Hq, n]; causal (top-left) without a mask
    g = q.shape[1] // k.shape[1]
    out, lse = _flash(q.transpose(0, 1)[None], _heads(k, g), _heads(v, g), 0.0, mask is None, attn_mask=mask,
                      scale=scale)
    return out[0].transpose(0, 1), lse[0]


def varlen_attention_cpu(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
                         window: int = 0) -> tuple[Tensor, Tensor]:
    """Block-diagonal causal attention, fused per sequence.

    q: [T, Hq, D], k/v: [T, Hkv, D], cu_seqlens: int32 [N+1] -> out [T, Hq, D], lse fp32 [Hq, T]
    """
    if window > 0 or q.dtype not in _FUSED_DTYPES:
        return varlen_attention_ref(q, k, v, cu_seqlens, scale, window)
    T, Hq, _ = q.shape
    out = q.new_empty((T, Hq, v.shape[2]))
    lse = q.new_empty((Hq, T), dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e], lse[:, s:e] = _fused(q[s:e], k[s:e], v[s:e], scale, None)
    return out, lse


def varlen_attention_backward_cpu(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                                  window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`varlen_attention_cpu`, fused per sequence (P recomputed from q, k and lse).

    dout/out: [T, Hq, D], lse/dlse: [Hq, T] -> dq [T, Hq, D], dk/dv [T, Hkv, D]
    """
    if window > 0 or dlse is not None or q.dtype not in _FUSED_DTYPES:
        return varlen_attention_backward_ref(dout, q, k, v, out, lse, cu_seqlens, dlse, scale, window)
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n == 0:
            continue
        dqh, dkh, dvh = _flash_backward(dout[s:e].transpose(0, 1)[None], q[s:e].transpose(0, 1)[None],
                                        _heads(k[s:e], g), _heads(v[s:e], g), out[s:e].transpose(0, 1)[None],
                                        lse[None, :, s:e].to(torch.float32), 0.0, True, scale=scale)
        dq[s:e] = dqh[0].transpose(0, 1)
        dk[s:e] = dkh[0].view(Hkv, g, n, -1).sum(1).transpose(0, 1)        # the query heads of a KV head add up
        dv[s:e] = dvh[0].view(Hkv, g, n, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------- the serving batch over the paged cache
def _gather(cache: Tensor, block_tables: Tensor, i: int, total: int) -> Tensor:
    # the first ``total`` cached tokens of sequence i: [total, Hkv, D]
    nblk = -(-total // cache.shape[1])
    return cache[block_tables[i, :nblk].long()].reshape(-1, *cache.shape[2:])[:total]


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     i: int, context: int, scale: float) -> tuple[Tensor, Tensor]:
    """One chunk of n new tokens after ``context`` cached ones (its own K/V already in the cache)."""
    if context == 0:
        return _fused(q, k, v, scale, None)
    n = q.shape[0]
    total = context + n
    keys, values = _gather(k_cache, block_tables, i, total), _gather(v_cache, block_tables, i, total)
    # bottom-right causal: new token j (at position context + j) sees keys 0 .. context + j
    visible = torch.arange(total)[None, :] <= torch.arange(context, total)[:, None]
    mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
    return _fused(q, keys.to(q.dtype), values.to(q.dtype), scale, mask)


def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, blocks: Tensor, total: Tensor,
                      scale: float) -> tuple[Tensor, Tensor]:
    # q: [n, Hq, D] one query per sequence; blocks: int64 [n * nb] (padded with block 0); total: int64 [n] keys
    # -> out [n, Hq, D], lse fp32 [Hq, n]
    n, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    num_keys = blocks.numel() // n * bs
    # whole blocks are gathered (one contiguous copy each) and read per KV head as strided [n, Hkv, L, D] views;
    # the G query heads sharing a KV head become G query rows of that head (they see the same keys, so no
    # causal mask among them): one fused call for the group, no repeated K/V
    kk = k_cache.index_select(0, blocks).view(n, num_keys, hkv, d).transpose(1, 2).to(q.dtype)
    vv = v_cache.index_select(0, blocks).view(n, num_keys, hkv, v_cache.shape[3]).transpose(1, 2).to(q.dtype)
    j = torch.arange(num_keys)
    hidden = j[None, :] >= total[:, None]
    bias = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))[:, None, None, :]
    out, lse = _flash(q.view(n, hkv, hq // hkv, d), kk, vv, 0.0, False, attn_mask=bias, scale=scale)
    return out.reshape(n, hq, -1), lse.reshape(n, hq).t()


def _decode_groups(idx: list[int], block_tables: Tensor, context_lens: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(sequence indices, padded blocks, keys per sequence) of the decode sequences, in groups of similar length
    (one group, in batch order, when they fit in one)."""
    sel = torch.tensor(idx, dtype=torch.long)
    total = context_lens.long()[sel] + 1
    order = torch.arange(len(idx)) if len(idx) <= DECODE_GROUP_SIZE else torch.argsort(total)
    groups = []
    for part in order.split(DECODE_GROUP_SIZE):
        bt = block_tables[sel[part]]
        nb = int((bt >= 0).sum(1).max())
        groups.append((sel[part], bt[:, :nb].long().clamp_min(0).reshape(-1).contiguous(), total[part]))
    return groups


def paged_attention_cpu(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                        context_lens: Tensor, cu_seqlens: Tensor, scale: float,
                        window: int = 0) -> tuple[Tensor, Tensor]:
    """New tokens attending to their sequence's cache (their own K/V already written into it).

    q: [T, Hq, D], k/v: [T, Hkv, D] (the new tokens'), caches [num_blocks, block_size, Hkv, D],
    block_tables int32 [N, B], context_lens int32 [N], cu_seqlens int32 [N+1] -> out [T, Hq, D], lse fp32 [Hq, T]
    """
    if window > 0 or q.dtype not in _FUSED_DTYPES:
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale, window)
    T, Hq, _ = q.shape
    bounds = cu_seqlens.tolist()
    contexts = context_lens.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if T == len(lens):                                  # every sequence decodes one token (no scatter needed)
        out = q.new_empty((T, Hq, v.shape[2]))
        lse = q.new_empty((Hq, T), dtype=torch.float32)
        for sel, blocks, total in _decode_groups(list(range(T)), block_tables, context_lens):
            o, l = _decode_attention(q if len(sel) == T else q.index_select(0, sel), k_cache, v_cache, blocks,
                                     total, scale)
            out.index_copy_(0, sel, o)
            lse.index_copy_(1, sel, l)
        return out, lse
    out = q.new_empty((T, Hq, v.shape[2]))
    lse = q.new_empty((Hq, T), dtype=torch.float32)
    decodes = [i for i, n in enumerate(lens) if n == 1]
    if decodes:
        rows = cu_seqlens[:-1].long()
        for sel, blocks, total in _decode_groups(decodes, block_tables, context_lens):
            r = rows[sel]
            o, l = _decode_attention(q.index_select(0, r), k_cache, v_cache, blocks, total, scale)
            out.index_copy_(0, r, o)
            lse.index_copy_(1, r, l)
    for i, n in enumerate(lens):
        if n > 1:
            s, e = bounds[i], bounds[i + 1]
            out[s:e], lse[:, s:e] = _chunk_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache, block_tables, i,
                                                     contexts[i], scale)
    return out, lse
