"""flexc: co-serve LLM inference and LoRA finetuning with one copy of the base model.

Python API::

    import flexc
    cm = flexc.compile("llama-3.1-8b", lora=flexc.LoraSpec(r=16, targets=("down_proj",)))
    cm.save_plan("plan.json")
    engine = flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=16), policy="coserve")

The names below load on first use (PEP 562), so importing one room (``flexc.kernels.lora``,
``flexc.runtime.scheduler``) does not pull in the compiler and Dynamo.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compile": ("flexc.compiler", "compile"),
    "CompiledModel": ("flexc.ir.artifact", "CompiledModel"),
    "LoraSpec": ("flexc.ir.spec", "LoraSpec"),
    "resolve_model": ("flexc.models", "resolve_model"),
    "Engine": ("flexc.engine", "Engine"),
    "EngineConfig": ("flexc.runtime.engine", "EngineConfig"),
    "GenerationResult": ("flexc.runtime.engine", "GenerationResult"),
    "FinetuneJob": ("flexc.runtime.finetune", "FinetuneJob"),
}
"""Public name -> (module, attribute)."""

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexc' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value            # NOTE: cached in the module namespace, as a normal import would
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
