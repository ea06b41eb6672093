"""The compiled artifact: what ``flexc.compile`` returns and what every later stage reads.

A :class:`CompiledModel` holds the annotated region graphs (:class:`~flexc.ir.graph.CompiledGraph`), the
record of every pass that ran (:class:`PassRecord`: name, time, report) and the options it was compiled
with; :meth:`CompiledModel.plan` is its versioned, JSON-serializable summary (``plan.json``), which
``flexc inspect`` reads. The runtime binds and runs what the artifact says; it re-derives no decision.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from flexc.ir.graph import CompiledGraph, RegionGraph
from flexc.ir.schema import SCHEMA_VERSION
from flexc.ir.spec import LoraSpec, ModelSource

__all__ = ["CompiledModel", "PassRecord", "SCHEMA_VERSION", "model_shape", "report_to_dict", "pass_report",
           "write_whole"]


@dataclasses.dataclass(kw_only=True)
class PassRecord:
    """One pass run: name, wall time and report."""

    name: str
    seconds: float
    report: Any

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 4), "report": report_to_dict(self.report)}


def report_to_dict(report: Any) -> Any:
    """Make a report JSON-friendly: dataclasses -> dicts, sympy/other objects -> str."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        if hasattr(report, "to_dict"):
            return report_to_dict(report.to_dict())
        return {f.name: report_to_dict(getattr(report, f.name)) for f in dataclasses.fields(report)}
    if isinstance(report, dict):
        return {str(k): report_to_dict(v) for k, v in report.items()}
    if isinstance(report, (list, tuple)):
        return [report_to_dict(v) for v in report]
    if report is None or isinstance(report, (bool, int, float, str)):
        return report
    return str(report)


@dataclasses.dataclass
class CompiledModel:
    """What ``flexc.compile`` returns: region graphs, pass records and the plan."""

    source: ModelSource
    lora: Optional[LoraSpec]
    dtype: str
    seq_len: int
    graph: CompiledGraph
    passes: list[PassRecord]
    compile_seconds: float
    options: dict

    @property
    def regions(self) -> dict[str, RegionGraph]:
        return self.graph.regions

    def plan(self) -> dict:
        """plan.json content (versioned, JSON-serializable)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {"name": self.source.name, "kind": self.source.kind, **self.graph.model},
            "peft": self.graph.lora,
            "seq_len": self.seq_len,
            "options": {k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool, type(None)))},
            "regions": {name: r.summary() for name, r in self.graph.regions.items()},
            "layer_regions": list(self.graph.layer_regions),
            "passes": [p.to_dict() for p in self.passes],
            "compile_seconds": round(self.compile_seconds, 3),
            **({"memory": mem[-1].to_dict()["report"]} if (mem := [p for p in self.passes if p.name == "memory"])
               else {}),
        }

    def save_plan(self, path: str) -> None:
        """Write plan.json whole or not at all: the plan is built first and lands by rename, so an interrupted
        compile never leaves an empty or truncated file behind."""
        write_whole(path, (json.dumps(self.plan(), indent=2) + "\n").encode())

    def pass_report(self, name: str) -> Any:
        """The report of the last run of pass ``name`` (ValueError naming the passes that ran if it did not)."""
        return pass_report(self.passes, name)


def write_whole(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a private file renamed into place, so a reader (or a
    process killed mid-write) never sees a truncated file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pass_report(records: list[PassRecord], name: str) -> Any:
    """The report of the last record of pass ``name`` in ``records``."""
    for rec in reversed(records):
        if rec.name == name:
            return rec.report
    raise ValueError(f"no {name!r} pass ran; ran: {[r.name for r in records] or 'none'}")


def model_shape(source: ModelSource) -> dict:
    """The model's shape from its config alone (no capture): the keys of ``CompiledGraph.model`` that do not
    need the built model (e.g. what ``check_tp`` reads before any rank starts)."""
    cfg = source.config
    return {
        "architecture": source.architecture, "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        # the config's own tensor-parallel plan (layers.*.<proj> -> colwise/rowwise), read here so that the
        # parallelize pass never imports the model's modeling code for it
        "base_tp_plan": dict(getattr(cfg, "base_model_tp_plan", None) or {}),
    }


