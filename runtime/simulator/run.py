"""Simulated runs: one engine instance under one policy at one arrival rate, and the grid of them.

:func:`simulate_instance` builds a :class:`~flexc.runtime.simulator.engine.SimulatedEngine`, queues a
finetuning job (every policy but ``inference_only``), feeds the seeded arrivals through the event loop for
``duration`` simulated seconds, lets the requests that arrived finish (at most ``drain`` seconds more) and
summarizes them (:class:`~flexc.runtime.simulator.report.RunResult`).

``separate`` is composed, not scheduled: of ``instances`` GPUs-worth of instances a fraction serves all the
traffic (``inference_only`` at rate / fraction each) and the rest finetune (``finetune_only``); the result is
per instance of the cluster (tokens/s scaled by the fractions, SLOs of the serving instances).

    spec = InstanceSpec(cost=RooflineCost(compiled, gpu), latency=fit_policy_latency(...), num_layers=32,
                        kv_tokens=300_000)
    results = simulate(spec, SimulationConfig(rates=(1, 2, 3), policies=("coserve", "separate")))
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

from flexc.runtime.policies import POLICIES, make_policy
from flexc.runtime.engine import EngineConfig
from flexc.runtime.latency import LatencyModel
from flexc.runtime.simulator.cost import CostModel, MeasuredCost, RooflineCost, kv_capacity
from flexc.runtime.simulator.engine import SimulatedEngine, fit_policy_latency
from flexc.runtime.simulator.hardware import GPU
from flexc.runtime.simulator.loop import EventLoop, Iteration, MeasurementEnd, RequestArrival, SimClock
from flexc.runtime.simulator.report import RunResult, summarize_requests
from flexc.runtime.simulator.workload import (CONVERSATION, GammaArrivals, PoissonArrivals, REASONING, RequestSpec,
                                              SequenceShape, TraceArrivals, Workload, finetune_sequences)

logger = logging.getLogger(__name__)

__all__ = ["SimulationConfig", "InstanceSpec", "InstanceRun", "simulate_instance", "simulate", "SIM_POLICIES",
           "roofline_instance", "measured_instance"]

SIM_POLICIES = POLICIES + ("separate",)

Progress = Callable[[str, float, float], None]
"""progress(policy, rate, simulated seconds so far)."""


@dataclasses.dataclass(kw_only=True)
class SimulationConfig:
    """What to simulate (everything but the hardware and model: :class:`InstanceSpec`)."""

    rates: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 5.0)
    """Arrival rates per instance, requests/s."""
    policies: Sequence[str] = ("coserve", "temporal", "separate")
    duration: float = 600.0
    """Simulated seconds of arrivals (the measured window)."""
    drain: float = 60.0
    """Simulated seconds after the window in which its requests may still finish."""
    seed: int = 0
    """Seed of the arrivals, the lengths and the finetuning data."""
    arrivals: str = "gamma"
    """``gamma`` (bursty, ``cv``), ``poisson`` or ``trace`` (``trace`` rows, rescaled to each rate)."""
    cv: float = 2.0
    """Coefficient of variation of the gamma gaps."""
    lengths: object = CONVERSATION
    """A LogNormalLengths or TraceLengths."""
    trace: Optional[tuple] = None
    """Trace rows (``workload.read_trace``) for ``arrivals='trace'``."""
    requests: Optional[Sequence[RequestSpec]] = None
    """An explicit request stream (replaces arrivals and lengths; one rate)."""
    token_budget: int = 256
    """Tokens per iteration (the paper's 256)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 256
    """Sequences per iteration."""
    tpot_slo: float = 0.045
    """Seconds per output token a request may take (the co-serving policy fills iterations up to 0.9 of it)."""
    ttft_slo: float = 5.0
    """Seconds from arrival to the first token (queueing included)."""
    temporal_interval: int = 4
    """``temporal``: a finetuning-only iteration after this many inference iterations."""
    min_finetune_share: float = EngineConfig.min_finetune_share
    """``coserve``'s floor: this fraction of the token budget (at least one backward layer) goes to finetuning in
    every iteration while the job has work (``EngineConfig.min_finetune_share``; 0 puts the SLO first)."""
    separate_fraction: float = 0.5
    """``separate``: the share of the instances that serve."""
    instances: int = 4
    """``separate``: instances in the cluster (the split is in whole instances)."""
    finetune: Optional[Sequence[SequenceShape]] = None
    """Finetuning dataset; default 256 sequences shaped like long reasoning data (``workload.REASONING``)."""
    grad_accum: int = 8
    """Sequences per optimizer step."""
    lr: float = 1e-3
    optimizer: str = "sgd"
    """The job's optimizer (its steps are counted; a simulated job holds no tensors)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.policies if p not in SIM_POLICIES]
        if bad or not self.policies:
            raise ValueError(f"unknown policy {bad[0] if bad else '(none)'}; allowed: {', '.join(SIM_POLICIES)}")
        if not self.rates or any(not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0) for r in self.rates):
            raise ValueError(f"rates must be positive numbers of requests/s, got {list(self.rates)}")
        for name in ("duration", "tpot_slo", "ttft_slo"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.drain < 0:
            raise ValueError(f"drain must be >= 0 seconds, got {self.drain}")
        if self.arrivals not in ("gamma", "poisson", "trace"):
            raise ValueError(f"arrivals must be gamma, poisson or trace, got {self.arrivals!r}")
        if self.arrivals == "trace" and not self.trace:
            raise ValueError("arrivals='trace' needs the trace rows (trace=read_trace(path))")
        if not 0 < self.separate_fraction < 1:
            raise ValueError(f"separate_fraction must be in (0, 1), got {self.separate_fraction}")
        if not 0 <= self.min_finetune_share <= 1:
            raise ValueError(f"min_finetune_share must be a fraction in [0, 1], got {self.min_finetune_share}")
        if not isinstance(self.instances, int) or self.instances < 2:
            raise ValueError(f"instances must be an integer >= 2 (separate splits them), got {self.instances!r}")

    def workload(self, rate: float) -> Workload:
        if self.arrivals == "trace":
            arrivals = TraceArrivals(tuple(self.trace), rate)
        elif self.arrivals == "poisson":
            arrivals = PoissonArrivals(rate=rate)
        else:
            arrivals = GammaArrivals(rate=rate, cv=self.cv)
        return Workload(arrivals=arrivals, lengths=self.lengths)

    def request_stream(self, rate: float) -> list[RequestSpec]:
        if self.requests is not None:
            return [r for r in self.requests if r.arrival < self.duration]
        return self.workload(rate).requests(self.duration, self.seed)

    def finetune_data(self) -> list[SequenceShape]:
        return list(self.finetune) if self.finetune is not None else finetune_sequences(256, self.seed, REASONING)


@dataclasses.dataclass(kw_only=True)
class InstanceSpec:
    """One serving instance: how iterations cost, what the policy believes, how big the model and cache are."""

    cost: CostModel
    latency: LatencyModel
    """The policy's latency model at start-up (copied for every run)."""
    num_layers: int
    kv_tokens: int
    """Tokens the paged KV cache holds (all sequences, finetuning ones included)."""
    max_model_len: int = 8193
    """Context length: prompt + output of a request stays below it."""


def roofline_instance(compiled: Any, gpu: GPU, tp: int, *, token_budget: int = 256) -> InstanceSpec:
    """An instance of ``compiled`` (``flexc.compile`` with LoRA, at this ``tp``) on ``tp`` GPUs: roofline costs,
    the policy's latency model fitted on a profile priced by them, the KV cache the memory plan leaves."""
    cost = RooflineCost(compiled, gpu, tp)
    num_layers = cost.num_layers
    latency = fit_policy_latency(cost, num_layers=num_layers, token_budget=token_budget, seq_len=compiled.seq_len)
    return InstanceSpec(cost=cost, latency=latency, num_layers=num_layers, kv_tokens=kv_capacity(compiled, gpu, tp),
                        max_model_len=compiled.seq_len + 1)


def measured_instance(latency: LatencyModel, *, kv_tokens: int, max_model_len: int,
                      policy_latency: Optional[LatencyModel] = None) -> InstanceSpec:
    """An instance whose iterations cost what ``latency`` (a fitted runtime latency model) predicts; the policy
    starts from ``policy_latency`` (default: the same model)."""
    return InstanceSpec(cost=MeasuredCost(latency), latency=policy_latency or MeasuredCost(latency).latency,
                        num_layers=latency.num_layers, kv_tokens=kv_tokens, max_model_len=max_model_len)


class InstanceRun:
    """The state of one simulated run: the engine, its requests, what finished, the measured window."""

    def __init__(self, engine: SimulatedEngine, requests: Sequence[RequestSpec], duration: float):
        self.engine = engine
        self.clock: SimClock = engine.sim_clock
        self.requests = list(requests)
        self.duration = duration
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.preemptions = 0
        self.generated = 0
        self.finetune_tokens = 0
        self.iterations = 0
        self.measuring = True
        self.finished = False
        """Set when the window has ended and every request that arrived in it has finished."""
        self._open: set[str] = set()

    def arrive(self, index: int) -> None:
        spec = self.requests[index]
        self._open.add(self.engine.submit_spec(spec.prompt_tokens, spec.output_tokens, f"r{index}"))

    def step(self) -> bool:
        """One engine iteration; False when the engine has nothing to run (it waits for the next arrival)."""
        eng = self.engine
        if not eng.has_work():
            return False
        before = self.clock.now
        events = eng.step()
        if self.clock.now == before and not events:
            return False
        self.iterations += 1
        if self.clock.now <= self.duration:
            self.generated += len(events)
            self.finetune_tokens += eng.recorder.history[-1]["ft_tokens_done"]
        for ev in events:
            if ev.finished and ev.request_id in self._open:
                self._open.discard(ev.request_id)
                res = eng.result(ev.request_id, release=True)
                self.ttfts.append(res.ttft)
                self.tpots.append(res.tpot)
                self.preemptions += res.num_preemptions
        if not self.measuring and not self._open:
            self.finished = True
        return eng.has_work()

    @property
    def unfinished(self) -> int:
        """Requests submitted and not finished."""
        return len(self._open)

    def end_measurement(self) -> None:
        self.measuring = False
        if not self._open:
            self.finished = True


def _engine(spec: InstanceSpec, config: SimulationConfig, policy: str) -> SimulatedEngine:
    latency = copy.deepcopy(spec.latency)
    pol = make_policy(policy, latency, config.tpot_slo, config.temporal_interval,
                      min_finetune_share=config.min_finetune_share)
    ecfg = EngineConfig(kv_cache_tokens=spec.kv_tokens, block_size=config.block_size,
                        token_budget=config.token_budget, max_num_seqs=config.max_num_seqs,
                        tpot_slo=config.tpot_slo, ttft_slo=config.ttft_slo,
                        min_finetune_share=config.min_finetune_share)
    blocks = -(-spec.kv_tokens // config.block_size)
    return SimulatedEngine(num_layers=spec.num_layers, cost=spec.cost, latency=latency, policy=pol, config=ecfg,
                           kv_blocks=blocks, max_model_len=spec.max_model_len)


def simulate_instance(spec: InstanceSpec, config: SimulationConfig, policy: str, rate: float,
                      progress: Optional[Progress] = None, serve: bool = True,
                      keep_requests: bool = False) -> RunResult:
    """One run of ``policy`` (a runtime policy name) at ``rate`` requests/s; ``serve=False``: no requests;
    ``keep_requests``: the notes hold every finished request's TTFT and TPOT (``ttfts``, ``tpots``)."""
    t_wall = time.perf_counter()
    engine = _engine(spec, config, policy)
    job = None
    if policy != "inference_only":
        data = config.finetune_data()
        job = engine.finetune(data, optimizer=config.optimizer, lr=config.lr, grad_accum=config.grad_accum,
                              epochs=10_000)
    requests = config.request_stream(rate) if serve else []
    too_long = [r for r in requests if r.prompt_tokens + r.output_tokens >= spec.max_model_len]
    if too_long:
        raise ValueError(f"a request of {too_long[0].prompt_tokens} + {too_long[0].output_tokens} tokens does not fit "
                         f"the context of {spec.max_model_len}")
    run = InstanceRun(engine, requests, config.duration)
    loop = EventLoop(run)
    for i, r in enumerate(requests):
        loop.push(RequestArrival(r.arrival, index=i))
    loop.push(MeasurementEnd(config.duration))
    if job is not None:
        loop.push(Iteration(0.0))
    tick = [0.0]

    def on_event(now: float) -> None:
        if progress is not None and now - tick[0] >= 10.0:
            tick[0] = now
            progress(policy, rate, now)

    loop.run_until(config.duration + config.drain, on_event)
    stats = summarize_requests(run.ttfts, run.tpots, len(requests), config.tpot_slo, config.ttft_slo)
    notes = {"optimizer_steps": job.step if job is not None else 0, "preemptions": run.preemptions,
             "unfinished": run.unfinished}
    if keep_requests:
        notes.update(ttfts=list(run.ttfts), tpots=list(run.tpots))
    return RunResult(policy=policy, rate=rate, duration=config.duration, requests=len(requests),
                     finished=len(run.ttfts), inference_tokens_per_s=run.generated / config.duration,
                     finetune_tokens_per_s=run.finetune_tokens / config.duration, iterations=run.iterations,
                     sim_seconds=time.perf_counter() - t_wall, notes=notes, **stats)


def _separate(spec: InstanceSpec, config: SimulationConfig, rate: float, finetune_only: RunResult,
              progress: Optional[Progress]) -> RunResult:
    serving = min(max(round(config.separate_fraction * config.instances), 1), config.instances - 1)
    frac = serving / config.instances
    inf = simulate_instance(spec, config, "inference_only", rate / frac, progress)
    d = inf.to_dict()
    d.update(policy="separate", rate=rate, inference_tokens_per_s=inf.inference_tokens_per_s * frac,
             finetune_tokens_per_s=finetune_only.finetune_tokens_per_s * (1 - frac),
             sim_seconds=inf.sim_seconds + finetune_only.sim_seconds,
             notes={"serving_instances": serving, "instances": config.instances,
                    "serving_rate_per_instance": rate / frac, "finetune_only_tokens_per_s":
                    finetune_only.finetune_tokens_per_s})
    return RunResult(**d)


def simulate(spec: InstanceSpec, config: SimulationConfig, progress: Optional[Progress] = None) -> list[RunResult]:
    """Every (rate, policy) of ``config``; ``finetune_only`` (and ``separate``'s finetuning side) runs once."""
    results: list[RunResult] = []
    ft_only: Optional[RunResult] = None
    if "finetune_only" in config.policies or "separate" in config.policies:
        ft_only = simulate_instance(spec, config, "finetune_only", config.rates[0], progress, serve=False)
        logger.info("finetune_only: %.1f tokens/s", ft_only.finetune_tokens_per_s)
    for rate in config.rates:
        for policy in config.policies:
            if policy == "finetune_only":
                results.append(dataclasses.replace(ft_only, rate=rate))
            elif policy == "separate":
                results.append(_separate(spec, config, rate, ft_only, progress))
            else:
                results.append(simulate_instance(spec, config, policy, rate, progress))
            r = results[-1]
            logger.info("%s at %g req/s: SLO %.1f%%, finetuning %.1f tokens/s (%.1f s)", policy, rate,
                        100 * r.slo_attainment, r.finetune_tokens_per_s, r.sim_seconds)
    return results
