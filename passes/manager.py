"""Pass registry and pass manager.

A pass is a plain function ``(graph: CompiledGraph, ctx: PassContext) -> report``
registered by name. The report is a dataclass (or a dict) saying what the pass
found or changed; it goes to ``plan.json`` under ``passes[i].report``. Options
reach a pass through ``ctx.options``, never through module globals.

Passes come from three places, looked up in this order:

* built-ins and anything decorated with :func:`register_pass`;
* ``module:function`` specs (``flexc compile --pass mypkg.passes:count_adapters``);
* Python entry points in the group ``flexc.passes`` (name -> function).

Example::

    @register_pass("count_lora")
    def count_lora(graph, ctx):
        n = sum(1 for r in graph.regions.values() for x in r.nodes() if ...)
        return {"modified": False, "lora_nodes": n}
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from flexc.ir.artifact import PassRecord

if TYPE_CHECKING:
    from flexc.ir.graph import CompiledGraph

logger = logging.getLogger(__name__)

__all__ = ["PassContext", "PassError", "PassManager", "register_pass", "resolve_pass", "registered_passes",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "flexc.passes"
PassFn = Callable[["CompiledGraph", "PassContext"], Any]
_REGISTRY: dict[str, PassFn] = {}


@dataclasses.dataclass(kw_only=True)
class PassContext:
    """What every pass may read: compile options and the results of the passes before it."""

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Compile options (seq_len, dtype, activation_budget, device_memory, tp, ...)."""
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Report of each pass that already ran, by pass name."""


class PassError(RuntimeError):
    """A pass failed; names the pass and the passes that ran before it."""


def register_pass(name: str, *, requires: Sequence[str] = ()) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn`` under ``name``; ``requires`` lists passes that must have run first."""
    def deco(fn: PassFn) -> PassFn:
        fn.flexc_requires = tuple(requires)  # type: ignore[attr-defined]
        _REGISTRY[name] = fn
        return fn
    return deco


def registered_passes() -> list[str]:
    """Names of the passes registered in this process (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # built-in passes register themselves on import; imported lazily so the manager has no cycle
    for mod in ("flexc.passes.builtin",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def resolve_pass(spec: str) -> tuple[str, PassFn]:
    """A pass name, ``module:function`` or entry-point name -> (name, function)."""
    _load_builtins()
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"pass must be a name or 'module:function', got {spec!r}")
    if spec in _REGISTRY:
        return spec, _REGISTRY[spec]
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"pass {spec!r}: cannot import module {mod_name!r} ({e})") from e
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ValueError(f"pass {spec!r}: module {mod_name!r} has no function {fn_name!r}")
        return fn_name, fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return spec, ep.load()
    known = ", ".join(registered_passes()) or "none"
    raise ValueError(f"unknown pass {spec!r}: not registered ({known}), not 'module:function', "
                     f"and no entry point in group {ENTRY_POINT_GROUP!r}")


class PassManager:
    """Runs a pipeline of passes in order, recording each one's report and wall time."""

    def __init__(self, passes: Sequence[str | tuple[str, PassFn]]):
        self.passes: list[tuple[str, PassFn]] = [p if isinstance(p, tuple) else resolve_pass(p) for p in passes]

    def run(self, graph: "CompiledGraph", ctx: Optional[PassContext] = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for name, fn in self.passes:
            missing = [r for r in getattr(fn, "flexc_requires", ()) if r not in ctx.results]
            if missing:
                raise PassError(f"pass {name!r} requires {missing} to run before it; "
                                f"ran so far: {[r.name for r in records]}")
            t0 = time.perf_counter()
            try:
                report = fn(graph, ctx)
            except ValueError:
                raise
            except Exception as e:
                raise PassError(f"pass {name!r} failed: {type(e).__name__}: {e} "
                                f"(passes before it: {[r.name for r in records]})") from e
            rec = PassRecord(name=name, seconds=time.perf_counter() - t0, report=report)
            ctx.results[name] = report
            records.append(rec)
            logger.info("pass %s: %.3f s", name, rec.seconds)
        return records
