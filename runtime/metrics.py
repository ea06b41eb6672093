"""Engine metrics: per-iteration work and time, per-request latency, SLO attainment, throughput.

The engine records every iteration (what it computed, how long it took) and
every finished request (TTFT including queueing, TPOT); :meth:`MetricsRecorder.summary`
turns them into an :class:`EngineMetrics` snapshot.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

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
    history: list[dict] = dataclasses.field(default_factory=list)
    """Per iteration: t (since start), seconds, decode_tokens, prefill_tokens, ft_forward_tokens,
    ft_backward_layers, generated_tokens, ft_tokens_done."""

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

    def __init__(self, tpot_slo: float, ttft_slo: float):
        self.tpot_slo = tpot_slo
        self.ttft_slo = ttft_slo
        self.start: Optional[float] = None
        self.history: list[dict] = []
        self.requests: list[tuple[float, float]] = []
        self._generated = 0
        self._ft_tokens = 0
        self._busy = 0.0

    def reset(self) -> None:
        self.__init__(self.tpot_slo, self.ttft_slo)

    def iteration(self, t0: float, seconds: float, *, decode_tokens: int, prefill_tokens: int, ft_forward_tokens: int,
                  ft_backward_layers: int, generated_tokens: int, ft_tokens_done: int) -> None:
        if self.start is None:
            self.start = t0
        self._busy += seconds
        self._generated += generated_tokens
        self._ft_tokens += ft_tokens_done
        self.history.append(dict(t=round(t0 - self.start, 4), seconds=round(seconds, 5), decode_tokens=decode_tokens,
                                 prefill_tokens=prefill_tokens, ft_forward_tokens=ft_forward_tokens,
                                 ft_backward_layers=ft_backward_layers, generated_tokens=generated_tokens,
                                 ft_tokens_done=ft_tokens_done))

    def request_finished(self, ttft: float, tpot: float) -> None:
        self.requests.append((ttft, tpot))

    def summary(self, with_history: bool = True) -> EngineMetrics:
        wall = (time.perf_counter() - self.start) if self.start is not None else 0.0
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
                             wall_seconds=wall, history=list(self.history) if with_history else [])
