"""Ragged causal attention as torch custom ops: ``flexc::attention`` (training) and
``flexc::paged_attention`` (serving, over the paged KV cache).

The captured decoder-layer graphs call exactly one attention node, so they stay
independent of the device and of how the KV cache is laid out::

    flexc::attention(q, k, v, cu_seqlens, scale, window) -> (out, lse)
      q:   [T, Hq, D]     queries of one flat batch of T tokens
      k,v: [T, Hkv, D]    keys/values of the same tokens (GQA: Hq % Hkv == 0)
      cu_seqlens: int32 [N+1]  sequence starts, cu[0] == 0, cu[-1] == T
      out: [T, Hq, D]     (dtype of q)
      lse: [Hq, T] fp32   natural-log log-sum-exp of the scaled scores

Every sequence attends causally to itself only (block-diagonal causal attention).
Its backward (``flexc::attention_backward``) recomputes the probabilities from
q, k and the log-sum-exp instead of storing them (FlashAttention style).

The serving graphs (built by the ``serve`` pass) call the paged form instead::

    flexc::paged_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, slot_mapping,
                           cu_seqlens, scale, window) -> (out, lse)
      k_cache, v_cache: [num_blocks, block_size, Hkv, D]   this layer's cache (MUTATED: the new K/V are
                                                           written at ``slot_mapping``)
      block_tables: int32 [N, B]   physical block of each logical block of sequence i (-1 unused)
      context_lens: int32 [N]      tokens of sequence i in the cache before this batch
      slot_mapping: int64 [T]      cache slot (block * block_size + offset) of each new token

Sequence i's new tokens sit at positions ``context_lens[i] ..`` and attend to its cached tokens and the new
ones up to themselves. The op declares its cache writes (``mutates_args``), so functionalization and
``torch.compile`` see them; it reads no state besides its arguments.

Backends, chosen per call from the query tensor (:func:`~flexc.kernels._triton.kernel_backend`):
``triton`` (:mod:`flexc.kernels.attention_triton`, CUDA), ``cpu`` (:mod:`flexc.kernels.attention_cpu`:
torch's fused CPU attention) and ``torch`` (:mod:`flexc.kernels.attention_ref`, the references and the
test oracle; ``FLEXC_KERNELS=torch`` forces them).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from flexc.kernels._triton import kernel_backend
from flexc.kernels.attention_cpu import paged_attention_cpu, varlen_attention_backward_cpu, varlen_attention_cpu
from flexc.kernels.attention_ref import (paged_attention_ref, varlen_attention_backward_ref, varlen_attention_ref,
                                         write_kv_ref)
from flexc.kernels.attention_triton import (paged_attention_triton, varlen_attention_backward_triton,
                                            varlen_attention_triton, write_kv_triton)

__all__ = ["attention", "attention_backward", "paged_attention", "backend_for"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """One implementation of every piece the ops need."""

    name: str
    varlen: Callable[..., tuple[Tensor, Tensor]]
    varlen_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    paged: Callable[..., tuple[Tensor, Tensor]]
    """``paged(q, k, v, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale, window)``, after
    ``write_kv`` (``k``/``v`` are the new tokens', which a backend may use instead of reading them back)."""
    write_kv: Callable[..., None]


def _drop_new_kv(paged: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """Adapt a paged function that reads the new K/V back from the cache to the backend signature."""
    def run(q, k, v, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale, window):
        return paged(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale, window)
    return run


_BACKENDS = {
    "torch": AttentionBackend(name="torch", varlen=varlen_attention_ref, varlen_backward=varlen_attention_backward_ref,
                              paged=_drop_new_kv(paged_attention_ref), write_kv=write_kv_ref),
    "cpu": AttentionBackend(name="cpu", varlen=varlen_attention_cpu, varlen_backward=varlen_attention_backward_cpu,
                            paged=paged_attention_cpu, write_kv=write_kv_ref),
    "triton": AttentionBackend(name="triton", varlen=varlen_attention_triton,
                               varlen_backward=varlen_attention_backward_triton,
                               paged=_drop_new_kv(paged_attention_triton), write_kv=write_kv_triton),
}


def backend_for(q: Tensor) -> AttentionBackend:
    """The implementation the ops run for queries ``q`` (the rule lives in ``_triton.kernel_backend``)."""
    return _BACKENDS[kernel_backend(q)]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------- training: whole sequences
@torch.library.custom_op("flexc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
              window: int) -> tuple[Tensor, Tensor]:
    """Block-diagonal causal attention over a flat batch (see the module docstring)."""
    return backend_for(q).varlen(q, k, v, cu_seqlens, scale, window)


@attention.register_fake
def _attention_fake(q, k, v, cu_seqlens, scale, window):
    T, Hq, _ = q.shape
    return q.new_empty((T, Hq, v.shape[2])), q.new_empty((Hq, T), dtype=_acc_dtype(q))


@torch.library.custom_op("flexc::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens: Tensor, dlse: Optional[Tensor], scale: float,
                       window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``flexc::attention`` over full sequences."""
    return backend_for(q).varlen_backward(dout, q, k, v, out, lse, cu_seqlens, dlse, scale, window)


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


# ----------------------------------------------------------------- serving: the paged cache
@torch.library.custom_op("flexc::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, slot_mapping: Tensor, cu_seqlens: Tensor, scale: float,
                    window: int) -> tuple[Tensor, Tensor]:
    """Write the new tokens' K/V into this layer's cache, then attend over the cache (module docstring)."""
    backend = backend_for(q)
    backend.write_kv(k, v, k_cache, v_cache, slot_mapping)
    return backend.paged(q, k, v, k_cache, v_cache, block_tables, context_lens, cu_seqlens, scale, window)


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, k_cache, v_cache, block_tables, context_lens, slot_mapping, cu_seqlens, scale,
                          window):
    T, Hq, _ = q.shape
    return q.new_empty((T, Hq, v.shape[2])), q.new_empty((Hq, T), dtype=_acc_dtype(q))
