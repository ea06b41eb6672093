"""``flexc.Engine``: the runtime's engine, built from a model name.

The engine (:mod:`flexc.runtime.engine`) takes a compiled model and the model with its weights; this front-door
constructor does the part that needs the front door's rooms: resolve the name (presets, Hugging Face
directories, the embedded SmolLM2), compile it with the passes the engine needs, load weights and tokenizer,
and pick the tensor-parallel engine when asked for one::

    engine = flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=16), policy="coserve",
                                          max_adapters=4, tpot_slo=0.2)
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Union

from flexc.compiler import compile as flexc_compile
from flexc.ir.artifact import model_shape
from flexc.ir.spec import LoraSpec
from flexc.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from flexc.passes.parallelize import check_tp
from flexc.runtime.engine import Engine as _Engine
from flexc.runtime.engine import EngineConfig, resolve_device

if TYPE_CHECKING:
    from flexc.runtime.launch import ParallelDims
    from flexc.runtime.scheduler import SchedulingPolicy

__all__ = ["Engine", "engine_config"]

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def engine_config(config: Optional[EngineConfig] = None, **fields: Any) -> EngineConfig:
    """``config`` with ``fields`` replaced (or a new one from ``fields``); an unknown field is a ValueError that
    names it and the allowed ones."""
    bad = sorted(set(fields) - set(_CONFIG_FIELDS))
    if bad:
        raise ValueError(f"unknown engine option {bad[0]!r}; allowed: {', '.join(_CONFIG_FIELDS)}")
    return dataclasses.replace(config, **fields) if config is not None else EngineConfig(**fields)


class Engine(_Engine):
    """:class:`flexc.runtime.engine.Engine` (continuous batching, co-serving, finetuning), with the constructor
    that compiles and loads a model by name."""

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, lora: Any = None, dtype: str = "fp32",
                        policy: Union[None, str, "SchedulingPolicy"] = None, dims: Optional["ParallelDims"] = None,
                        device: str = "auto", config: Optional[EngineConfig] = None,
                        max_lora_rank: Optional[int] = None, compile_options: Optional[dict] = None,
                        **options: Any) -> _Engine:
        """Compile ``name_or_path`` (see :func:`flexc.resolve_model`), load its weights and tokenizer.

        ``lora``: None (base model only), True, a ``LoraSpec``, its dict or a ``peft.LoraConfig``: the adapter
        structure every adapter served by this engine must fit (rank up to its r, targets a subset, any alpha).
        ``max_lora_rank`` (instead of ``lora``): serve and finetune PEFT adapters of rank 1..max_lora_rank on any
        of the seven projections (compiled as ``LoraSpec(r=max_lora_rank, alpha=max_lora_rank)``; each adapter's
        own alpha and targets come from its config).
        ``options``: :class:`~flexc.runtime.engine.EngineConfig` fields (``kv_cache_tokens``, ``token_budget``,
        ``max_adapters``, ``tpot_slo``, ...), applied over ``config``.
        ``dims``: this process's rank in a tensor-parallel group (``run_tp`` passes it): compiled for
        ``tp=dims.tp``, the result is a :class:`~flexc.runtime.tp_engine.TPEngine` holding this rank's shards.
        ``device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``: where the
        weights, the KV cache and the batches live.
        ``compile_options``: options of :func:`flexc.compile`'s passes, e.g. ``{"activation_budget": "max"}``
        (save every value the backward needs instead of recomputing: the fastest finetuning, the most memory)
        or ``{"recompute_budget": 0.3}``.
        """
        cfg = engine_config(config, **options)
        where = resolve_device(device)
        source = resolve_model(name_or_path)
        spec = LoraSpec.coerce(lora)
        if max_lora_rank is not None:
            if not isinstance(max_lora_rank, int) or isinstance(max_lora_rank, bool) or max_lora_rank < 1:
                raise ValueError(f"max_lora_rank must be a positive integer, got {max_lora_rank!r}")
            if spec is not None and spec.r != max_lora_rank:
                raise ValueError(f"max_lora_rank={max_lora_rank} disagrees with lora r={spec.r}; give one of them")
            spec = spec or LoraSpec(r=max_lora_rank, alpha=max_lora_rank)
        tp = dims.tp if dims is not None else 1
        check_tp(model_shape(source), tp)
        # NOTE: the training passes (memory plan) have nothing to plan for a base-only engine: skip them there
        passes = None if spec is not None else ("parallelize", "serve") if tp > 1 else ("serve",)
        compiled = flexc_compile(source, lora=spec, dtype=dtype, builtin_passes=passes,
                                 **({"tp": tp} if tp > 1 else {}), **(compile_options or {}))
        model = load_model(source, spec, dtype).to(where)
        tokenizer = load_tokenizer(source)
        if tp > 1:
            from flexc.runtime.tp_engine import TPEngine     # NOTE: only tensor-parallel runs import it
            return TPEngine(compiled, model, dims, tokenizer=tokenizer, config=cfg, policy=policy)
        return cls(compiled, model, tokenizer=tokenizer, config=cfg, policy=policy)
