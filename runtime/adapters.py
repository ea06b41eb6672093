"""Resident LoRA adapters: registered from PEFT directories, tensors, or created fresh.

The compiled layer template has the LoRA matmuls of ONE adapter structure
(rank r, target projections, scaling alpha/r baked in); every resident adapter
must fit it. Any number of adapters share one copy of the base weights.

What fits: the same rank; targets that are a subset of the compiled targets
(the missing projections get zero weights, which is exact); a different
scaling (alpha, rsLoRA) is folded into ``lora_B`` (exact up to one rounding).
Anything else is a :class:`ValueError` that says what differs.

Storage: per LoRA parameter of the model, one *stack* ``[max_adapters, *shape]``
(``lora_A``: ``[max_adapters, r, H_in]``, ``lora_B``: ``[max_adapters, H_out, r]``)
allocated up front, as vLLM's ``max_loras`` buffers; each resident adapter owns
a *slot* (an index into every stack) and its ``weights`` are views of its slot.
The inference graphs read the stacks (``flexc::lora`` picks the slot per token
segment) and finetuning binds the views and updates them in place after every
optimizer step, so inference sees each new version with no copy and nothing to
re-bind. An adapter that is removed or replaced gets private copies of its
tensors first (a job still holding them no longer writes into the slot).

Weights are kept by the model's parameter names, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.

On a tensor-parallel rank (``shards`` given) every check and fresh init is made
on whole tensors and the registry keeps this rank's shards; ``whole_weights``
gathers them back (what ``save_adapter`` writes).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from flexc.ir.spec import LoraSpec
    from flexc.runtime.sharding import ShardPlan

logger = logging.getLogger(__name__)

__all__ = ["Adapter", "AdapterRegistry"]

_ADAPTER_PREFIX = "default"   # the adapter name PEFT gives the compiled model's (only) adapter


@dataclasses.dataclass(kw_only=True)
class Adapter:
    """One resident adapter."""

    name: str
    weights: dict[str, torch.Tensor]
    """lora_A / lora_B tensors by the model's parameter name, in the model's dtype (at tp > 1 this rank's
    shards)."""
    source: str
    """Where it came from: a directory path, ``fresh`` or ``tensors``."""
    slot: int = -1
    """Index of this adapter's entry in every stack of the registry."""
    version: int = 0
    """Registration count of the registry when this adapter was (re)registered. In-place updates (finetuning
    steps) do not change it: the stacks are the storage, so readers see them anyway."""


class AdapterRegistry:
    """Many adapters resident at once for one compiled model (up to ``max_adapters``), stored in stacks."""

    def __init__(self, spec: Optional["LoraSpec"], model: nn.Module, max_adapters: int = 8,
                 shards: Optional["ShardPlan"] = None):
        """``shards``: on a tensor-parallel rank, the plan that cuts whole adapter tensors to this rank's."""
        if not isinstance(max_adapters, int) or max_adapters < 0:
            raise ValueError(f"max_adapters must be a non-negative integer, got {max_adapters!r}")
        self.spec = spec
        self.max_adapters = max_adapters
        self.adapters: dict[str, Adapter] = {}
        self.shards = shards
        lora = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        self._shapes = {n: (shards.whole_shape(n, p.shape) if shards is not None else tuple(p.shape), p.dtype)
                        for n, p in lora.items()}
        # NOTE: max_adapters slots reserved up front, so the stacks (what the inference graphs bind) never move;
        # on a tensor-parallel rank they hold this rank's shards
        local = {n: shards.local_shape(n, self._shapes[n][0]) if shards is not None else tuple(p.shape)
                 for n, p in lora.items()}
        self._stacks = {n: torch.zeros((max_adapters, *local[n]), dtype=p.dtype, device=p.device)
                        for n, p in lora.items()}
        self._version = 0

    # ------------------------------------------------------------------ lookup
    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.adapters) or 'none'}")
        return self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def whole_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s whole tensors (at tp > 1 gathered from every rank: all ranks call it)."""
        weights = self.get(name).weights
        if self.shards is None:
            return weights
        return {n: self.shards.gather(n, w) for n, w in weights.items()}

    def slot(self, name: str) -> int:
        """The stack index of adapter ``name`` (ValueError naming the loaded adapters if unknown)."""
        return self.get(name).slot

    def stack(self, param_name: str) -> torch.Tensor:
        """The stack of the model parameter ``param_name``: ``[max_adapters, *shape]``, slot i = adapter in slot i
        (free slots hold stale values no segment selects)."""
        if param_name not in self._stacks:
            raise ValueError(f"{param_name!r} is not a LoRA parameter of the compiled model "
                             f"(e.g. {next(iter(self._stacks), 'none')!r})")
        return self._stacks[param_name]

    def remove(self, name: str) -> None:
        _detach(self.get(name))
        del self.adapters[name]

    # ------------------------------------------------------------------ registration
    def _check_room(self, name: str, capacity: bool = True) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if self.spec is None:
            raise ValueError("this engine was compiled without LoRA (lora=None); adapters need an engine built "
                             "with lora=LoraSpec(r=..., targets=...) matching them")
        if capacity and name not in self.adapters and len(self.adapters) >= self.max_adapters:
            raise ValueError(f"cannot load adapter {name!r}: {len(self.adapters)} adapters are resident and "
                             f"max_adapters={self.max_adapters}; remove one first")

    def _put(self, name: str, weights: dict[str, torch.Tensor], source: str) -> Adapter:
        if self.shards is not None:           # NOTE: checked and initialised whole, kept as this rank's shards
            weights = {n: self.shards.shard(n, w) for n, w in weights.items()}
        old = self.adapters.pop(name, None)
        if old is not None:
            _detach(old)
            slot = old.slot
        else:
            taken = {a.slot for a in self.adapters.values()}
            slot = next(i for i in range(self.max_adapters) if i not in taken)   # _check_room made room
        with torch.no_grad():
            for n, w in weights.items():
                view = self._stacks[n][slot]
                view.copy_(w)
                weights[n] = view
        self._version += 1
        ad = Adapter(name=name, weights=weights, source=source, slot=slot, version=self._version)
        self.adapters[name] = ad
        logger.info("adapter %s resident (%s, %d tensors)", name, source, len(weights))
        return ad

    def load_peft_dir(self, name: str, path: str) -> Adapter:
        """Register the PEFT adapter saved in ``path`` (adapter_config.json + adapter_model.safetensors)."""
        self._check_room(name, capacity=False)
        cfg_path = os.path.join(str(path), "adapter_config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
        with open(cfg_path) as f:
            cfg = json.load(f)
        scale = self._check_config(cfg, path)
        self._check_room(name)              # NOTE: after the config check: a mismatch is the more useful error
        st_path = os.path.join(str(path), "adapter_model.safetensors")
        if not os.path.isfile(st_path):
            raise ValueError(f"{path}: no adapter_model.safetensors (flexc reads safetensors adapters only)")
        from safetensors.torch import load_file
        raw = load_file(st_path)
        state = {}
        for k, v in raw.items():
            for part in ("lora_A", "lora_B"):
                k = k.replace(f".{part}.weight", f".{part}.{_ADAPTER_PREFIX}.weight")
            state[k] = v
        return self._put(name, self._complete(state, scale, path), os.path.abspath(str(path)))

    def load_tensors(self, name: str, state: Mapping[str, torch.Tensor], scale: float = 1.0,
                     source: str = "tensors") -> Adapter:
        """Register lora_A/lora_B tensors named as the model's parameters (e.g. a PEFT model's state_dict);
        ``scale`` multiplies lora_B (adapter scaling / compiled scaling)."""
        self._check_room(name)
        state = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        return self._put(name, self._complete(dict(state), scale, source), source)

    def create_fresh(self, name: str, seed: int = 0, init: str = "peft") -> Adapter:
        """A new adapter: ``peft`` init (Kaiming-uniform A, zero B: outputs equal the base model's, as
        ``get_peft_model``) or ``random`` (B random too, so it changes outputs; tests)."""
        self._check_room(name)
        if init not in ("peft", "random"):
            raise ValueError(f"adapter init must be 'peft' or 'random', got {init!r}")
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for n, (shape, dtype) in self._shapes.items():
            if ".lora_A." in n:
                bound = 1.0 / math.sqrt(shape[1])        # kaiming_uniform_(a=sqrt(5)) on [r, in]
                w = (torch.rand(shape, generator=g) * 2 - 1) * bound
            else:
                w = torch.randn(shape, generator=g) * 0.05 if init == "random" else torch.zeros(shape)
            weights[n] = w.to(dtype)
        return self._put(name, weights, "fresh")

    # ------------------------------------------------------------------ checks
    def _check_config(self, cfg: dict, path: Any) -> float:
        """Reject what the compiled template cannot run; return the factor folded into lora_B."""
        spec = self.spec
        assert spec is not None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; flexc runs LORA adapters")
        r = cfg.get("r")
        if r != spec.r:
            raise ValueError(f"{path}: adapter rank r={r} does not match the compiled rank r={spec.r}; "
                             f"compile the engine with lora=LoraSpec(r={r}, ...) to serve it")
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            raise ValueError(f"{path}: target_modules as a regex ({targets!r}) is not supported; "
                             f"allowed: a subset of {list(spec.targets)}")
        extra = sorted(set(targets) - set(spec.targets))
        if extra:
            raise ValueError(f"{path}: adapter targets {extra} are not in the compiled targets "
                             f"{list(spec.targets)}; compile with those targets to serve it")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise ValueError(f"{path}: per-module {key} is not supported; use one r and alpha")
        if cfg.get("use_dora"):
            raise ValueError(f"{path}: DoRA adapters (use_dora=true) are not supported; plain LoRA only")
        if cfg.get("bias", "none") != "none":
            raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not supported; allowed: 'none'")
        if cfg.get("layers_to_transform") is not None:
            raise ValueError(f"{path}: layers_to_transform is not supported; the adapter must cover every layer")
        alpha = cfg.get("lora_alpha", 8)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return scaling / (spec.alpha / spec.r)

    def _complete(self, state: dict[str, torch.Tensor], scale: float, where: Any) -> dict[str, torch.Tensor]:
        """Check names and shapes; zero-fill projections the adapter does not target; fold ``scale`` into B."""
        unknown = sorted(set(state) - set(self._shapes))
        if unknown:
            raise ValueError(f"{where}: adapter tensor {unknown[0]!r} matches no LoRA parameter of the compiled "
                             f"model (e.g. {next(iter(self._shapes), 'none')!r})")
        out = {}
        for n, (shape, dtype) in self._shapes.items():
            w = state.get(n)
            if w is None:
                out[n] = torch.zeros(shape, dtype=dtype)
                continue
            if tuple(w.shape) != shape:
                raise ValueError(f"{where}: adapter tensor {n} has shape {tuple(w.shape)}, the compiled model "
                                 f"expects {shape}")
            w = w.detach().to(dtype)
            if ".lora_B." in n and scale != 1.0:
                w = w * scale
            out[n] = w                          # NOTE: _put copies it into the adapter's stack slot
        present = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in state}
        if not present:
            raise ValueError(f"{where}: the adapter has no lora_A/lora_B tensors")
        return out


def _detach(adapter: Adapter) -> None:
    """Give ``adapter`` private copies of its slot's tensors, in place in its ``weights`` dict (which a finetuning
    job may hold), before the slot is freed or reused."""
    for n, w in adapter.weights.items():
        adapter.weights[n] = w.clone()
