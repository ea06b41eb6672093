"""Installs ``flexc::attention`` into Hugging Face models through ``AttentionInterface``.

A model whose config says ``attn_implementation="flexc"`` calls
:func:`flexc_attention_forward` for every attention layer. The HF code then
builds no mask (flexc is not a mask-based implementation), so the sequence
structure of the flat batch comes only from ``cu_seq_lens_q``, which the caller
passes through the decoder layer's keyword arguments.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

import flexc.kernels  # noqa: F401  (registers torch.ops.flexc.attention)

ATTN_IMPLEMENTATION = "flexc"


def flexc_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            scaling: Optional[float] = None, dropout: float = 0.0,
                            sliding_window: Optional[int] = None, **kwargs: Any):
    """HF attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    if attention_mask is not None:
        raise ValueError("flexc attention takes packed sequences described by cu_seq_lens_q, not a mask")
    if query.shape[0] != 1:
        raise ValueError(f"flexc attention expects one flat batch (batch dim 1), got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"flexc attention has no dropout; got attention dropout {dropout}")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("flexc attention needs cu_seq_lens_q (int32 [N+1] sequence starts)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)                                     # [T, Hq, D]
    k = key[0].transpose(0, 1)                                       # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    out, _lse = torch.ops.flexc.attention(q, k, v, cu, float(scaling), int(sliding_window or 0))
    return out.unsqueeze(0), None


def register_flexc_attention() -> None:
    """Register the flexc attention function with transformers (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, flexc_attention_forward)
