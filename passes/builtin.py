"""Imports the built-in passes so that they register themselves with the pass manager."""
from __future__ import annotations

import importlib

BUILTIN_MODULES = ("prune", "memory", "parallelize")

for _name in BUILTIN_MODULES:
    try:
        importlib.import_module(f"flexc.passes.{_name}")
    except ModuleNotFoundError as e:   # a built-in not present in this build
        if e.name != f"flexc.passes.{_name}":
            raise
