"""Checks that keep a latency profile honest: where it was measured, and whether its fit is plausible.

A profile fitted on a busy machine, with other threads, another dtype or another
model predicts the wrong iteration times, and the co-serving policy then plans
with them (the symptom: zero cost for finetuning, a big constant). Two checks:

* :class:`ProfileContext` records what a profile was measured on; a saved
  profile is reused only where every field matches (:meth:`ProfileContext.differs`
  names the first field that does not).
* :func:`check_fit` compares each per-token coefficient with the FLOPs the
  compiled graphs do per token (:func:`flop_costs`): the throughput it implies
  (FLOPs per unit / seconds per unit) must lie in a generous plausible range for
  the device, and the fit needs enough samples and a small residual.
  :func:`correct_fit` replaces the implausible per-token coefficients by the
  sane ones' seconds per FLOP times their own FLOPs.

A coefficient 10x off but plausible passes these; the running model's drift
adaptation (:mod:`flexc.runtime.latency`) corrects it within a window of
iterations.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from flexc.ir.vocab import evaluate_at
from flexc.runtime.latency import FEATURES

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel

__all__ = ["ProfileContext", "profile_context", "FlopCosts", "flop_costs", "check_fit", "correct_fit",
           "PER_TOKEN"]

PER_TOKEN = ("decode_tokens", "prefill_tokens", "ft_forward_tokens", "ft_backward_layer_tokens", "ft_loss_tokens")
"""The features whose coefficient is the cost of one token's work (each must be positive)."""

_MIN_SAMPLES = len(FEATURES) + 2
_MAX_RESIDUAL = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileContext:
    """What a latency profile was measured on; a saved profile is reused only where all of it matches."""

    model: str
    """The model's name (its source)."""
    graph: str
    """Fingerprint of the compiled graphs: architecture and shapes, adapter, regions' FLOPs (16 hex digits)."""
    dtype: str
    """The weights' dtype (``torch.float32``, ...)."""
    torch_threads: int
    """``torch.get_num_threads()`` when profiled."""
    device: str
    """``cpu`` or the CUDA device's name."""
    torch_version: str
    backend: str
    """The executor backend (``eager`` or ``inductor``)."""
    machine: str
    """CPU model and core count (``platform`` / ``/proc/cpuinfo``)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differs(self, saved: Optional[dict]) -> Optional[str]:
        """Why a profile saved with context ``saved`` cannot be reused here (one field named), None if it can."""
        if not saved:
            return "it records no context (written by an older flexc)"
        for f in dataclasses.fields(self):
            ours = getattr(self, f.name)
            if saved.get(f.name) != ours:
                return f"it was measured with {f.name}={saved.get(f.name)!r}, this run has {ours!r}"
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_context(compiled: "CompiledModel", *, dtype: torch.dtype, device: torch.device,
                    backend: str) -> ProfileContext:
    """The context of a profile measured now, for ``compiled`` with weights of ``dtype`` on ``device``."""
    graph = {"model": compiled.graph.model, "lora": compiled.graph.lora, "layers": compiled.graph.layer_regions,
             "flops": {n: [str(r.total_flops("forward")), str(r.total_flops("backward"))]
                       for n, r in sorted(compiled.regions.items())}}
    digest = hashlib.sha256(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()[:16]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return ProfileContext(model=compiled.source.name, graph=digest, dtype=str(dtype),
                          torch_threads=torch.get_num_threads(), device=dev, torch_version=torch.__version__,
                          backend=backend, machine=f"{_cpu_model()} x{os.cpu_count()}")


@dataclasses.dataclass(kw_only=True)
class FlopCosts:
    """FLOPs of one unit of each per-token latency feature, and the throughputs a fit may imply."""

    per_unit: dict[str, float]
    """Feature name -> FLOPs of one unit (a decode token: embedding, every layer, head and logits; a prefill
    token: embedding and every layer; a finetuning forward token: like decode; a backward unit: one token's
    backward through every layer; a loss token: the head region's forward and backward)."""
    min_flops_per_s: float
    """Slowest plausible throughput (FLOP/s); a coefficient implying less is implausible."""
    max_flops_per_s: float
    """Fastest plausible throughput; a coefficient implying more (work nearly free) is implausible."""
    typical_flops_per_s: float
    """Throughput assumed when no per-token coefficient is plausible (a last resort; drift corrects it)."""


def _linear(expr) -> float:
    """The coefficient of T in a cost polynomial a*T^2 + b*T + c (the per-token part)."""
    f0, f1, f2 = (evaluate_at(expr, t) for t in (0, 1, 2))
    return (4 * f1 - f2 - 3 * f0) / 2


def flop_costs(compiled: "CompiledModel", device: torch.device) -> FlopCosts:
    """Per-unit FLOPs of the per-token features from the compiled region graphs (``total_flops`` of the
    embedding, layer, head and logits regions), with throughput bounds for ``device``'s type."""
    regions = compiled.regions
    fwd = {n: _linear(r.total_flops("forward")) for n, r in regions.items()}
    bwd = {n: _linear(r.total_flops("backward")) for n, r in regions.items()}
    layers_fwd = sum(fwd[n] for n in compiled.graph.layer_regions)
    layers_bwd = sum(bwd[n] for n in compiled.graph.layer_regions)
    embed = fwd.get("embed", 0.0)
    head = fwd.get("head", 0.0) + fwd.get("logits", 0.0)
    per_unit = {"decode_tokens": embed + layers_fwd + head, "prefill_tokens": embed + layers_fwd,
                "ft_forward_tokens": embed + layers_fwd + head, "ft_backward_layer_tokens": layers_bwd,
                "ft_loss_tokens": fwd.get("head", 0.0) + bwd.get("head", 0.0)}
    gpu = device.type == "cuda"
    # NOTE: generous on purpose: small models are dominated by per-op overhead (few FLOPs, many microseconds),
    # large ones by compute; only absurd values (free work, a token taking seconds of a fast machine) fall out
    return FlopCosts(per_unit=per_unit, min_flops_per_s=1e5, max_flops_per_s=1e16 if gpu else 1e14,
                     typical_flops_per_s=1e12 if gpu else 1e10)


def check_fit(coef: Sequence[float], costs: FlopCosts, samples: Optional[int] = None,
              residual: Optional[float] = None) -> list[str]:
    """What is wrong with a fit (empty when it is sane): a per-token coefficient not positive or implying an
    implausible throughput, fewer than ``len(FEATURES) + 2`` samples, a relative RMS residual above 0.5."""
    problems = [f"{FEATURES[i]}: {why}" for i, why in _implausible(coef, costs).items()]
    if samples is not None and samples < _MIN_SAMPLES:
        problems.append(f"only {samples} samples (at least {_MIN_SAMPLES} needed)")
    if residual is not None and not residual <= _MAX_RESIDUAL:
        problems.append(f"residual {residual:.0%} of the mean iteration time (at most {_MAX_RESIDUAL:.0%})")
    return problems


def implausible_indices(costs: FlopCosts):
    """A ``check`` for :class:`~flexc.runtime.latency.LatencyModel`: indices of implausible coefficients."""
    return lambda coef: sorted(_implausible(coef, costs))


def _implausible(coef: Sequence[float], costs: FlopCosts) -> dict[int, str]:
    out = {}
    for name in PER_TOKEN:
        i = FEATURES.index(name)
        c, flops = float(coef[i]), costs.per_unit[name]
        if not (c > 0 and np.isfinite(c)):
            out[i] = f"{c:.3g} s per unit (must be positive)"
        elif flops > 0 and not costs.min_flops_per_s <= flops / c <= costs.max_flops_per_s:
            out[i] = (f"{c:.3g} s per unit implies {flops / c:.3g} FLOP/s (plausible: "
                      f"{costs.min_flops_per_s:.0e} to {costs.max_flops_per_s:.0e})")
    return out


def correct_fit(coef: Sequence[float], costs: FlopCosts) -> np.ndarray:
    """``coef`` with every implausible per-token coefficient replaced by its FLOPs times the median seconds per
    FLOP of the plausible ones (the typical throughput when none is plausible)."""
    out = np.array(coef, dtype=float)
    bad = _implausible(out, costs)
    sane = [out[FEATURES.index(n)] / costs.per_unit[n] for n in PER_TOKEN
            if FEATURES.index(n) not in bad and costs.per_unit[n] > 0]
    s_per_flop = float(np.median(sane)) if sane else 1.0 / costs.typical_flops_per_s
    for i in bad:
        out[i] = costs.per_unit[FEATURES[i]] * s_per_flop
    return out
