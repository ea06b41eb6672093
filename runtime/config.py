"""The engine's serving limits and where it runs: :class:`EngineConfig`, :func:`resolve_device`."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from flexc.runtime.executor import BACKENDS

__all__ = ["EngineConfig", "resolve_device"]


@dataclasses.dataclass(kw_only=True)
class EngineConfig:
    """Serving limits of one engine."""

    kv_cache_tokens: Optional[int] = None
    """Tokens the paged KV cache holds (all sequences together); default 16384 unless kv_cache_bytes is given."""
    kv_cache_bytes: Optional[int] = None
    """Alternative to kv_cache_tokens: a memory budget in bytes for the cache."""
    block_size: int = 16
    """Tokens per KV block."""
    token_budget: int = 512
    """Tokens per iteration (decodes + prefill chunks)."""
    max_num_seqs: int = 256
    """Sequences per iteration."""
    max_adapters: int = 8
    """LoRA adapters resident at once."""
    backend: str = "eager"
    """How the serving graphs run: ``eager`` (as captured, op by op) or ``inductor`` (``torch.compile``, dynamic
    in the token count; compiled when the engine is built, see ``executor.compile_seconds``)."""
    tpot_slo: float = 0.2
    """Target seconds per output token; the co-serving policy fills iterations with finetuning up to it."""
    ttft_slo: float = 5.0
    """Target seconds to the first token, queueing included (for SLO attainment)."""
    latency_profile: Optional[str] = None
    """JSON file of the fitted latency model: loaded if it exists, was measured in this context (model, dtype,
    threads, device, torch, backend, machine) and is sane, else profiled at start-up and written."""
    min_finetune_share: float = 0.05
    """The co-serving policy's floor: this fraction of each iteration's token budget (at least one backward layer)
    goes to finetuning while a job has work, even when the TPOT SLO cannot be met; 0 puts the SLO first."""

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ValueError("give kv_cache_tokens or kv_cache_bytes, not both")
        if self.kv_cache_tokens is None and self.kv_cache_bytes is None:
            self.kv_cache_tokens = 16384
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.min_finetune_share <= 1:
            raise ValueError(f"min_finetune_share must be a fraction in [0, 1], got {self.min_finetune_share}")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (the current CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no CUDA device here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
