"""flexc: co-serve LLM inference and LoRA finetuning with one copy of the base model.

Python API::

    import flexc
    cm = flexc.compile("llama-3.1-8b", lora=flexc.LoraSpec(r=16, targets=("down_proj",)))
    cm.save_plan("plan.json")
"""
from flexc.compiler import CompiledModel, compile
from flexc.models import LoraSpec, resolve_model
from flexc.runtime.engine import Engine

__all__ = ["compile", "CompiledModel", "LoraSpec", "resolve_model"]
__version__ = "0.1.0"
