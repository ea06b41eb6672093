"""The pass manager: resolve passes by name, run a pipeline, record what each one did.

A pass is a plain function ``(graph: CompiledGraph, ctx: PassContext) -> report``.
The report is a dataclass (or a dict) saying what the pass found or changed; it
goes to ``plan.json`` under ``passes[i].report``. Options reach a pass through
``ctx.options``, never through module globals.

A pipeline entry is a function (its name is ``flexc_name`` when :func:`define_pass`
gave it one, else ``__name__``), a ``(name, function)`` pair, or a string looked up
in this order:

* a built-in name (:data:`BUILTIN_PASSES`);
* ``module:function`` (``flexc compile --pass mypkg.passes:count_adapters``);
* a Python entry point in the group ``flexc.passes`` (name -> function).

Example::

    @define_pass("count_lora")
    def count_lora(graph, ctx):
        n = sum(1 for r in graph.regions.values() for x in r.nodes() if ...)
        return {"modified": False, "lora_nodes": n}

    flexc.compile("smollm2-135m", passes=[count_lora])
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

from flexc.ir.artifact import PassRecord

if TYPE_CHECKING:
    from flexc.ir.graph import CompiledGraph

logger = logging.getLogger(__name__)

__all__ = ["PassContext", "PassError", "PassManager", "define_pass", "resolve_pass", "BUILTIN_PASSES",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "flexc.passes"
PassFn = Callable[["CompiledGraph", "PassContext"], Any]
PassSpec = Union[str, PassFn, tuple[str, PassFn]]
BUILTIN_PASSES: Mapping[str, str] = MappingProxyType({
    "prune": "flexc.passes.prune:prune",
    "memory": "flexc.passes.memory:memory",
    "parallelize": "flexc.passes.parallelize:parallelize",
    "serve": "flexc.passes.serve:serve",
})
"""The built-in passes by name (``module:function``, imported when first used)."""


@dataclasses.dataclass(kw_only=True)
class PassContext:
    """What every pass may read: compile options and the results of the passes before it."""

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Compile options (seq_len, dtype, activation_budget, device_memory, tp, ...)."""
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Report of each pass that already ran, by pass name."""


class PassError(RuntimeError):
    """A pass failed; names the pass and the passes that ran before it."""


def define_pass(name: str, *, requires: Sequence[str] = ()) -> Callable[[PassFn], PassFn]:
    """Decorator: name a pass and list the passes that must have run before it (checked by the manager)."""
    def deco(fn: PassFn) -> PassFn:
        fn.flexc_name = name  # type: ignore[attr-defined]
        fn.flexc_requires = tuple(requires)  # type: ignore[attr-defined]
        return fn
    return deco


def _import_function(spec: str) -> PassFn:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"pass {spec!r}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"pass {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


def resolve_pass(spec: PassSpec) -> tuple[str, PassFn]:
    """A pipeline entry (built-in name, ``module:function``, entry-point name, function or pair) ->
    (name, function)."""
    if isinstance(spec, tuple):
        return spec
    if callable(spec):
        return getattr(spec, "flexc_name", getattr(spec, "__name__", "pass")), spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"pass must be a name, 'module:function' or a function, got {spec!r}")
    if spec in BUILTIN_PASSES:
        return spec, _import_function(BUILTIN_PASSES[spec])
    if ":" in spec:
        fn = _import_function(spec)
        return getattr(fn, "flexc_name", spec.partition(":")[2]), fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return spec, ep.load()
    raise ValueError(f"unknown pass {spec!r}: not built in ({', '.join(BUILTIN_PASSES)}), not 'module:function', "
                     f"and no entry point in group {ENTRY_POINT_GROUP!r}")


class PassManager:
    """Runs a pipeline of passes in order, recording each one's report and wall time."""

    def __init__(self, passes: Sequence[PassSpec]):
        self.passes: list[tuple[str, PassFn]] = [resolve_pass(p) for p in passes]

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
