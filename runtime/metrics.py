"""Engine metrics: per-iteration work and time, per-request latency, SLO attainment, throughput.

The engine records every iteration (what it computed, how long it took) and
every finished request (TTFT including queueing, TPOT); :meth:`MetricsRecorder.summary`
turns them into an :class:`EngineMetrics` snapshot.

Why SLOs were missed: an iteration with inference tokens that takes longer than
the TPOT SLO is a miss. It is put down to *inference* when there was no
finetuning in it, or when the inference part alone was predicted by the current
latency model to exceed the SLO, or when its observed share (observed seconds x
predicted inference / predicted total) does: the machine is slower than
profiled or the inference load alone does not fit. Otherwise the finetuning
fill pushed it over. Without a latency model's predictions a mixed miss is
unattributed. ``observed_vs_profiled`` says how far the machine is from its
start-up profile.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["EngineMetrics", "MetricsRecorder", "percentile"]


@dataclasses.dataclass(kw_only=True)
class EngineMetrics:
    """A snapshot of how the engine has served (times in seconds)."""

    requests_finished: int
    slo_attainment: float
    """Fraction of finished requests whose TTFT and TPOT both met their SLOs (1.0 when none finished)."""
    tpot_slo_attainment: float
    ttft_slo_attainment: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    inference_tokens_per_s: float
    """Generated tokens per wall second."""
    finetune_tokens_per_s: float
    """Finetuning sequence tokens whose forward and backward completed, per wall second."""
    busy_fraction: float
    """Share of wall time spent in iterations."""
    iterations: int
    wall_seconds: float
    slo_miss_iterations: int = 0
    """Iterations with inference tokens that took longer than the TPOT SLO."""
    slo_miss_inference: int = 0
    """Of those, the ones where inference alone exceeded the SLO (no finetuning in them, or the inference part
    predicted or observed over it): a slower machine than profiled, or more inference than fits."""
    slo_miss_finetuning: int = 0
    """Of those, the ones only the finetuning fill pushed over the SLO (inference alone fitted)."""
    slo_miss_unattributed: int = 0
    """Mixed misses without latency-model predictions to attribute them (a policy without a model)."""
    observed_vs_profiled: Optional[float] = None
    """Median over iterations of observed seconds / the start-up profile's prediction (2.0: the machine runs at
    half the profiled speed); None without a profile."""
    history: list[dict] = dataclasses.field(default_factory=list)
    """Per iteration: t (since start), seconds, decode_tokens, prefill_tokens, ft_forward_tokens,
    ft_backward_layers, generated_tokens, ft_tokens_done, predicted_s and profiled_s (None without a model),
    slo_miss (``inference``, ``finetuning``, ``unattributed`` or None)."""

    def to_dict(self, with_history: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_history:
            d.pop("history")
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``, linearly interpolated between the closest ranks (numpy's
    default); 0.0 for no values. Every latency summary of flexc uses this one."""
    return float(np.percentile(values, q)) if len(values) else 0.0


class MetricsRecorder:
    """Collects iterations and finished requests; SLOs in seconds."""

    def __init__(self, tpot_slo: float, ttft_slo: float, clock: Optional[Callable[[], float]] = None):
        """``clock``: what ``summary`` reads the end of the wall time from (the engine's clock; default
        ``time.perf_counter``)."""
        self.tpot_slo = tpot_slo
        self.ttft_slo = ttft_slo
        self.clock = clock
        self.start: Optional[float] = None
        self.history: list[dict] = []
        self.requests: list[tuple[float, float]] = []
        self._generated = 0
        self._ft_tokens = 0
        self._busy = 0.0
        self._misses = {"inference": 0, "finetuning": 0, "unattributed": 0}
        self._profiled_ratios: list[float] = []

    def reset(self) -> None:
        self.__init__(self.tpot_slo, self.ttft_slo, self.clock)

    def iteration(self, t0: float, seconds: float, *, decode_tokens: int, prefill_tokens: int, ft_forward_tokens: int,
                  ft_backward_layers: int, generated_tokens: int, ft_tokens_done: int,
                  predicted_s: Optional[float] = None, predicted_inference_s: Optional[float] = None,
                  profiled_s: Optional[float] = None) -> None:
        """Record one iteration; ``predicted_s`` / ``predicted_inference_s``: the current latency model's
        prediction of it and of its inference part alone, ``profiled_s``: the start-up profile's (None without
        a model)."""
        if self.start is None:
            self.start = t0
        self._busy += seconds
        self._generated += generated_tokens
        self._ft_tokens += ft_tokens_done
        miss = None
        if (decode_tokens or prefill_tokens) and seconds > self.tpot_slo:
            miss = self._attribute(seconds, bool(ft_forward_tokens or ft_backward_layers), predicted_s,
                                   predicted_inference_s)
            self._misses[miss] += 1
        if profiled_s and profiled_s > 0 and seconds > 0:
            self._profiled_ratios.append(seconds / profiled_s)
        rnd = (lambda x: None if x is None else round(x, 5))
        self.history.append(dict(t=round(t0 - self.start, 4), seconds=round(seconds, 5), decode_tokens=decode_tokens,
                                 prefill_tokens=prefill_tokens, ft_forward_tokens=ft_forward_tokens,
                                 ft_backward_layers=ft_backward_layers, generated_tokens=generated_tokens,
                                 ft_tokens_done=ft_tokens_done, predicted_s=rnd(predicted_s),
                                 profiled_s=rnd(profiled_s), slo_miss=miss))

    def _attribute(self, seconds: float, finetuning: bool, predicted: Optional[float],
                   predicted_inference: Optional[float]) -> str:
        """Why an iteration over the TPOT SLO missed it (see the module docstring)."""
        if not finetuning:
            return "inference"
        if predicted_inference is None or not predicted:
            return "unattributed"
        if predicted_inference > self.tpot_slo or seconds * predicted_inference / predicted > self.tpot_slo:
            return "inference"
        return "finetuning"

    def request_finished(self, ttft: float, tpot: float) -> None:
        self.requests.append((ttft, tpot))

    def summary(self, with_history: bool = True) -> EngineMetrics:
        now = self.clock() if self.clock is not None else time.perf_counter()
        wall = (now - self.start) if self.start is not None else 0.0
        ttfts = [a for a, _ in self.requests]
        tpots = [b for _, b in self.requests]
        n = len(self.requests)
        ok_tpot = [b <= self.tpot_slo for b in tpots]
        ok_ttft = [a <= self.ttft_slo for a in ttfts]
        both = [x and y for x, y in zip(ok_tpot, ok_ttft)]
        frac = (lambda xs: sum(xs) / len(xs) if xs else 1.0)
        w = max(wall, 1e-9)
        return EngineMetrics(requests_finished=n, slo_attainment=frac(both), tpot_slo_attainment=frac(ok_tpot),
                             ttft_slo_attainment=frac(ok_ttft), ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
                             tpot_p50=percentile(tpots, 50), tpot_p99=percentile(tpots, 99),
                             inference_tokens_per_s=self._generated / w, finetune_tokens_per_s=self._ft_tokens / w,
                             busy_fraction=min(self._busy / w, 1.0) if wall else 0.0, iterations=len(self.history),
                             wall_seconds=wall, slo_miss_iterations=sum(self._misses.values()),
                             slo_miss_inference=self._misses["inference"],
                             slo_miss_finetuning=self._misses["finetuning"],
                             slo_miss_unattributed=self._misses["unattributed"],
                             observed_vs_profiled=(percentile(self._profiled_ratios, 50) if self._profiled_ratios
                                                   else None),
                             history=list(self.history) if with_history else [])
