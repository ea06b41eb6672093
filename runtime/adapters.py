"""Resident LoRA adapters: registered from PEFT directories, tensors, or created fresh.

The compiled layer template has the LoRA matmuls of ONE adapter structure
(rank R, target projections, scaling alpha/R baked in); every resident adapter
must fit it. Any number of adapters share one copy of the base weights.

What fits: any rank r <= R (``lora_A`` is zero-padded to R rows, ``lora_B`` to
R columns); targets that are a subset of the compiled targets (the missing
projections get zero weights); any scaling (alpha, rsLoRA): the ratio of the
adapter's scaling to the compiled one is folded into ``lora_B`` (exact up to
one rounding). Padding and missing targets are exact in the forward and in the
backward: a padded row of A meets a zero column of B (and the reverse), so it
gets a zero gradient and stays zero under SGD and AdamW. Anything else is a
:class:`ValueError` that says what differs.

Every adapter keeps its own :class:`AdapterShape` (rank, alpha, rsLoRA,
targets). ``own_weights`` / ``own_grads`` / ``publish_own`` convert between the
stack's coordinates (padded, folded) and the adapter's own (what PEFT holds for
it): finetuning trains in the adapter's own coordinates, so the optimizer sees
exactly PEFT's parameters and gradients whatever the compiled scaling, and
``save`` writes the adapter's own PEFT directory.

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

__all__ = ["Adapter", "AdapterRegistry", "AdapterShape"]

_ADAPTER_PREFIX = "default"   # the adapter name PEFT gives the compiled model's (only) adapter
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(kw_only=True, frozen=True)
class AdapterShape:
    """One adapter's own LoRA structure (PEFT's ``LoraConfig`` fields flexc serves)."""

    r: int
    """Its rank (<= the compiled rank)."""
    alpha: float
    """``lora_alpha``."""
    targets: tuple[str, ...]
    """Projections it adapts (a subset of the compiled targets)."""
    use_rslora: bool = False
    """Scaling alpha / sqrt(r) instead of alpha / r."""

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft(self) -> Any:
        """The ``peft.LoraConfig`` a PEFT model of this adapter has (dropout 0: flexc trains without it)."""
        from peft import LoraConfig
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", use_rslora=self.use_rslora)


@dataclasses.dataclass(kw_only=True)
class Adapter:
    """One resident adapter."""

    name: str
    weights: dict[str, torch.Tensor]
    """lora_A / lora_B tensors by the model's parameter name, in the model's dtype (at tp > 1 this rank's
    shards)."""
    source: str
    """Where it came from: a directory path, ``fresh`` or ``tensors``."""
    shape: AdapterShape
    """Its own rank, alpha and targets (the stack holds it padded to the compiled rank, scaling folded into B)."""
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
                             "with max_lora_rank=R (any adapter of rank <= R) or lora=LoraSpec(r=..., targets=...)")
        if capacity and name not in self.adapters and len(self.adapters) >= self.max_adapters:
            raise ValueError(f"cannot load adapter {name!r}: {len(self.adapters)} adapters are resident and "
                             f"max_adapters={self.max_adapters}; remove one first")

    def _put(self, name: str, weights: dict[str, torch.Tensor], source: str, shape: AdapterShape) -> Adapter:
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
        ad = Adapter(name=name, weights=weights, source=source, shape=shape, slot=slot, version=self._version)
        self.adapters[name] = ad
        logger.info("adapter %s resident (%s, r=%d of %d, %d targets)", name, source, shape.r, self.spec.r,
                    len(shape.targets))
        return ad

    def load_peft_dir(self, name: str, path: str) -> Adapter:
        """Register the PEFT adapter saved in ``path`` (adapter_config.json + adapter_model.safetensors)."""
        self._check_room(name, capacity=False)
        cfg_path = os.path.join(str(path), "adapter_config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read adapter_config.json ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: adapter_config.json is not a JSON object")
        shape = self._check_config(cfg, path)
        self._check_room(name)              # NOTE: after the config check: a mismatch is the more useful error
        st_path = os.path.join(str(path), "adapter_model.safetensors")
        if not os.path.isfile(st_path):
            raise ValueError(f"{path}: no adapter_model.safetensors (flexc reads safetensors adapters only)")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            raw = load_file(st_path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read adapter_model.safetensors ({e})") from None
        state = {}
        for k, v in raw.items():
            for part in ("lora_A", "lora_B"):
                k = k.replace(f".{part}.weight", f".{part}.{_ADAPTER_PREFIX}.weight")
            state[k] = v
        return self._put(name, self._complete(state, shape, path), os.path.abspath(str(path)), shape)

    def load_tensors(self, name: str, state: Mapping[str, torch.Tensor], shape: Optional[AdapterShape] = None,
                     source: str = "tensors") -> Adapter:
        """Register lora_A/lora_B tensors named as the model's parameters (e.g. a PEFT model's state_dict).
        ``shape``: the adapter's own structure; by default inferred from the tensors (rank from lora_A, targets
        from the names) with the compiled scaling."""
        self._check_room(name)
        state = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        if shape is None:
            shape = self._infer_shape(state, source)
        return self._put(name, self._complete(dict(state), shape, source), source, shape)

    def create_fresh(self, name: str, seed: int = 0, init: str = "peft",
                     shape: Optional[AdapterShape] = None) -> Adapter:
        """A new adapter of ``shape`` (default: the compiled rank, alpha and targets): ``peft`` init
        (Kaiming-uniform A, zero B: outputs equal the base model's, as ``get_peft_model``) or ``random`` (B random
        too, so it changes outputs; tests)."""
        self._check_room(name)
        if init not in ("peft", "random"):
            raise ValueError(f"adapter init must be 'peft' or 'random', got {init!r}")
        spec = self.spec
        shape = shape or AdapterShape(r=spec.r, alpha=spec.alpha, targets=tuple(spec.targets))
        self._check_shape(shape, "fresh adapter")
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for n, (full, dtype) in self._shapes.items():
            if _target_of(n) not in shape.targets:
                continue
            if ".lora_A." in n:
                bound = 1.0 / math.sqrt(full[1])         # kaiming_uniform_(a=sqrt(5)) on [r, in]
                w = (torch.rand((shape.r, full[1]), generator=g) * 2 - 1) * bound
            else:
                w = (torch.randn((full[0], shape.r), generator=g) * 0.05 if init == "random"
                     else torch.zeros((full[0], shape.r)))
            weights[n] = w.to(dtype)
        return self._put(name, self._complete(weights, shape, "fresh"), "fresh", shape)

    # ------------------------------------------------------------------ the adapter's own coordinates
    def _fold(self, shape: AdapterShape) -> float:
        """What the stack's lora_B holds: the adapter's B times this (its scaling / the compiled scaling)."""
        return shape.scaling / (self.spec.alpha / self.spec.r)

    @staticmethod
    def _own_view(n: str, w: torch.Tensor, r: int) -> torch.Tensor:
        return w[:r] if ".lora_A." in n else w[:, :r]       # A: [R, in] -> [r, in]; B: [out, R] -> [out, r]

    def own_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of adapter ``name``'s tensors in its own coordinates (rank r, its own scaling, only the
        projections it targets): what a PEFT model of it holds (at tp > 1, this rank's shards of them)."""
        ad = self.get(name)
        k = self._fold(ad.shape)
        out = {}
        for n, w in ad.weights.items():
            if _target_of(n) in ad.shape.targets:
                v = self._own_view(n, w, ad.shape.r)
                out[n] = v.clone() if ".lora_A." in n or k == 1.0 else v / k
        return out

    def whole_own_weights(self, name: str) -> dict[str, torch.Tensor]:
        """:meth:`own_weights` as whole tensors (at tp > 1 gathered from every rank: all ranks call it)."""
        ad = self.get(name)
        k = self._fold(ad.shape)
        whole = self.whole_weights(name)
        return {n: (self._own_view(n, w, ad.shape.r) / (1.0 if ".lora_A." in n else k)).clone()
                for n, w in whole.items() if _target_of(n) in ad.shape.targets}

    def own_grads(self, name: str, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients with respect to the stack's tensors -> gradients with respect to the adapter's own
        (d/dB_own = k * d/dB_stack for B_stack = k * B_own; A unchanged; padding and untargeted projections
        dropped: their gradients are zero)."""
        ad = self.get(name)
        k = self._fold(ad.shape)
        out = {}
        for n, g in grads.items():
            if _target_of(n) in ad.shape.targets:
                v = self._own_view(n, g, ad.shape.r)
                out[n] = v * k if ".lora_B." in n and k != 1.0 else v
        return out

    def publish_own(self, name: str, own: Mapping[str, torch.Tensor]) -> None:
        """Write own-coordinate tensors (as :meth:`own_weights` returns) into adapter ``name``'s slot: what the
        next iteration's inference reads."""
        ad = self.get(name)
        k = self._fold(ad.shape)
        with torch.no_grad():
            for n, w in own.items():
                view = self._own_view(n, ad.weights[n], ad.shape.r)
                view.copy_(w * k if ".lora_B." in n and k != 1.0 else w)

    # ------------------------------------------------------------------ checks
    def _check_shape(self, shape: AdapterShape, where: Any) -> None:
        spec = self.spec
        if not isinstance(shape.r, int) or isinstance(shape.r, bool) or not 1 <= shape.r <= spec.r:
            raise ValueError(f"{where}: adapter rank r={shape.r!r} is not served: this engine serves ranks 1 to "
                             f"{spec.r} (the compiled rank; raise --max-lora-rank / LoraSpec(r=...) to serve more)")
        if not isinstance(shape.alpha, (int, float)) or isinstance(shape.alpha, bool) or not shape.alpha > 0:
            raise ValueError(f"{where}: lora_alpha must be a positive number, got {shape.alpha!r}")
        extra = sorted(set(shape.targets) - set(spec.targets))
        if extra or not shape.targets:
            raise ValueError(f"{where}: adapter targets {extra or '[]'} are not in the compiled targets "
                             f"{list(spec.targets)}; compile with those targets to serve it")

    def _check_config(self, cfg: dict, path: Any) -> AdapterShape:
        """Reject what the compiled template cannot run; return the adapter's own structure."""
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; flexc runs LORA adapters")
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            raise ValueError(f"{path}: target_modules as a regex ({targets!r}) is not supported; "
                             f"allowed: a subset of {list(self.spec.targets)}")
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters"):
            if cfg.get(key):
                raise ValueError(f"{path}: per-module {key} is not supported; use one r and alpha on projections")
        if cfg.get("use_dora"):
            raise ValueError(f"{path}: DoRA adapters (use_dora=true) are not supported; plain LoRA only")
        for key, allowed in (("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none"),
                             ("layers_to_transform", None)):
            if cfg.get(key, allowed) != allowed:
                raise ValueError(f"{path}: {key}={cfg.get(key)!r} is not supported; allowed: {allowed!r}")
        shape = AdapterShape(r=cfg.get("r"), alpha=cfg.get("lora_alpha", 8),
                             targets=tuple(t for t in self.spec.targets if t in targets) + tuple(
                                 sorted(set(targets) - set(self.spec.targets))),
                             use_rslora=bool(cfg.get("use_rslora", False)))
        self._check_shape(shape, path)
        return shape

    def _infer_shape(self, state: Mapping[str, torch.Tensor], where: Any) -> AdapterShape:
        ranks = {int(w.shape[0]) for n, w in state.items() if ".lora_A." in n and w.dim() == 2}
        if len(ranks) != 1:
            raise ValueError(f"{where}: lora_A tensors must all have the same rank, got ranks {sorted(ranks)}")
        r = ranks.pop()
        targets = {_target_of(n) for n in state}
        return AdapterShape(r=r, alpha=self.spec.alpha / self.spec.r * r,   # the compiled scaling: nothing folded
                            targets=tuple(t for t in self.spec.targets if t in targets)
                            + tuple(sorted(targets - set(self.spec.targets))))

    def _complete(self, state: Mapping[str, torch.Tensor], shape: AdapterShape, where: Any
                  ) -> dict[str, torch.Tensor]:
        """Check names, shapes and dtypes; pad to the compiled rank, zero-fill projections the adapter does not
        target; fold the scaling ratio into B."""
        self._check_shape(shape, where)
        if not state:
            raise ValueError(f"{where}: the adapter has no lora_A/lora_B tensors")
        unknown = sorted(set(state) - set(self._shapes))
        if unknown:
            raise ValueError(f"{where}: adapter tensor {unknown[0]!r} matches no LoRA parameter of the compiled "
                             f"model (e.g. {next(iter(self._shapes), 'none')!r})")
        k = self._fold(shape)
        out = {}
        for n, (full, dtype) in self._shapes.items():
            out[n] = torch.zeros(full, dtype=dtype)       # NOTE: _put copies it into the adapter's stack slot
            w = state.get(n)
            if w is None:
                continue
            if _target_of(n) not in shape.targets:
                raise ValueError(f"{where}: tensor {n} adapts {_target_of(n)}, which the adapter's config does not "
                                 f"target ({list(shape.targets)})")
            want = (shape.r, full[1]) if ".lora_A." in n else (full[0], shape.r)
            if tuple(w.shape) != want:
                raise ValueError(f"{where}: adapter tensor {n} has shape {tuple(w.shape)}; rank {shape.r} on this "
                                 f"model needs {want}")
            if w.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"{where}: adapter tensor {n} has dtype {w.dtype}; allowed: fp32, fp16, bf16")
            if not torch.isfinite(w).all():
                raise ValueError(f"{where}: adapter tensor {n} has non-finite values")
            w = w.detach().to(dtype)
            self._own_view(n, out[n], shape.r).copy_(w * k if ".lora_B." in n and k != 1.0 else w)
        return out


def _target_of(param_name: str) -> str:
    """``...self_attn.q_proj.lora_A.default.weight`` -> ``q_proj``."""
    return param_name.split(".lora_")[0].rsplit(".", 1)[-1]


def _detach(adapter: Adapter) -> None:
    """Give ``adapter`` private copies of its slot's tensors, in place in its ``weights`` dict (which a finetuning
    job may hold), before the slot is freed or reused."""
    for n, w in adapter.weights.items():
        adapter.weights[n] = w.clone()
