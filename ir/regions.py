"""The regions a causal LM is cut into, and the structural check behind layer templates.

A Hugging Face causal LM (Llama, Qwen2, Mistral layout) runs as

    embed:  (input_ids[T], position_ids[T])        -> (h[T,H], cos[T,D], sin[T,D])
    layer:  (h[T,H], cos[T,D], sin[T,D], cu[N+1])  -> h[T,H]       (once per decoder layer)
    head:   (h[T,H], labels[T])                     -> loss_sum     (training: summed CE, -100 ignored)
    logits: (h[T,H])                                -> logits[T,V]  (inference, fp32)

over one flat ragged batch of T tokens. The region modules wrap the model's own
submodules, so the same wrapper built around the real model binds the captured
graph's parameters by FQN (``layer.self_attn.q_proj.base_layer.weight``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flexc.kernels.cross_entropy import default_chunk

__all__ = ["EmbedRegion", "LayerRegion", "HeadRegion", "LogitsRegion", "causal_lm_parts", "layer_prefixes",
           "layer_signature", "TOKEN_INPUTS"]

TOKEN_INPUTS = {"embed": (0, 1), "layer": (0, 1, 2), "head": (0, 1), "logits": (0,)}
"""Per region kind, the user inputs whose dim 0 is the token count T."""


def layer_prefixes(model: nn.Module) -> list[str]:
    """Name of every decoder layer's module in ``model.named_modules()`` (the prefix of its parameters' names),
    in layer order: ``base_model.model.model.layers.0`` for a PEFT model."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in causal_lm_parts(model).model.layers]


def causal_lm_parts(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a model or PEFT model."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model   # PeftModel -> CausalLM
    if not (hasattr(m, "lm_head") and hasattr(m, "model") and hasattr(m.model, "layers")):
        raise ValueError(f"{type(model).__name__} does not have the *ForCausalLM layout (model.layers, lm_head)")
    return m


class EmbedRegion(nn.Module):
    """Token embedding and rotary tables: (ids[T], pos[T]) -> (h[T,H], cos[T,D], sin[T,D])."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.embed_tokens = lm.model.embed_tokens
        self.rotary_emb = lm.model.rotary_emb

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        h = self.embed_tokens(input_ids)                               # [T, H]
        cos, sin = self.rotary_emb(h[None], position_ids[None])        # [1, T, D] each
        return h, cos[0], sin[0]


class LayerRegion(nn.Module):
    """One decoder layer on a flat batch: (h[T,H], cos[T,D], sin[T,D], cu[N+1] int32) -> h[T,H]."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor):
        out = self.layer(h[None], attention_mask=None, position_embeddings=(cos[None], sin[None]),
                         cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
        out = out[0] if isinstance(out, tuple) else out
        return out[0]


class HeadRegion(nn.Module):
    """Final norm, lm_head and summed cross-entropy: (h[T,H], labels[T]) -> loss_sum (fp32 scalar).

    ``labels[t]`` is the token that position t must predict (already shifted), -100 to skip.
    Summing (not averaging) lets the loss of a sequence split into chunks add up exactly.
    Same value and gradients as ``F.cross_entropy(lm_head(norm(h)).float(), labels, reduction="sum")``,
    without saving the fp32 logits for the backward (see ``flexc.kernels.cross_entropy``).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.norm = lm.model.norm
        self.lm_head = lm.lm_head

    def forward(self, h: torch.Tensor, labels: torch.Tensor):
        # NOTE: full [T, V] fp32 logits are never kept for the backward: flexc::linear_cross_entropy computes
        # the loss and its input gradient chunk by chunk in the forward (kernels/cross_entropy.py)
        weight = self.lm_head.weight
        if weight.requires_grad or getattr(self.lm_head, "bias", None) is not None:
            raise ValueError("the flexc head needs a frozen lm_head without bias (train adapters on the decoder "
                             "layers, not on lm_head)")
        x = self.norm(h[None])[0]                                      # [T, H]
        loss_sum, _dx = torch.ops.flexc.linear_cross_entropy(x, weight, labels, default_chunk(weight.shape[0]))
        return loss_sum


class LogitsRegion(nn.Module):
    """Final norm and lm_head for sampling: (h[T,H]) -> logits[T,V] fp32."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.norm = lm.model.norm
        self.lm_head = lm.lm_head

    def forward(self, h: torch.Tensor):
        return self.lm_head(self.norm(h[None]))[0].float()


_SKIP_ATTRS = {"layer_idx", "config", "kwargs"}   # kwargs: PEFT records the module path there


def _freeze(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        items = [_freeze(x) for x in v]
        return tuple(items) if all(x is not _UNHASHABLE for x in items) else _UNHASHABLE
    if isinstance(v, dict):
        items = sorted((str(k), _freeze(x)) for k, x in v.items())
        return tuple(items) if all(x is not _UNHASHABLE for _, x in items) else _UNHASHABLE
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return _UNHASHABLE


_UNHASHABLE = object()


def layer_signature(layer: nn.Module) -> tuple:
    """Everything a captured layer template bakes in: module types, parameter FQNs/shapes/dtypes,
    which parameters train, and per-module constants (LoRA scaling, norm eps, attention scaling,
    sliding window, active adapter, training flag). Two layers with equal signatures can share
    one template; ``layer_idx`` is excluded because flexc attention never reads it.
    """
    mods = []
    for name, mod in layer.named_modules():
        consts = []
        for k, v in sorted(vars(mod).items()):
            if k in _SKIP_ATTRS or (k.startswith("_") and k not in ("_active_adapter", "_disable_adapters")):
                continue
            fv = _freeze(v)
            if fv is not _UNHASHABLE:
                consts.append((k, fv))
        mods.append((name, type(mod).__name__, tuple(consts)))
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in layer.named_parameters())
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers())
    return tuple(mods), params, buffers
