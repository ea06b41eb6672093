"""The simulator against reality: the same load on a real engine and on the simulated one.

:func:`run_real` drives a real :class:`~flexc.runtime.engine.Engine` (any model, e.g. the embedded SmolLM2 on
this CPU) with a seeded request stream, each request submitted when its arrival time has passed, beside a
finetuning job, for ``duration`` wall seconds, then lets the requests finish. :func:`run_replay` simulates the
same requests (same arrivals, prompt and output lengths), the same finetuning sequence lengths, the same
policy, with the :class:`~flexc.runtime.simulator.cost.MeasuredCost` of a latency model fitted on this
machine. :func:`compare` puts the two side by side.

Which latency model prices the simulated iterations is the caller's choice and is reported with the result:
the engine's start-up profile (a few dozen synthetic iterations), or the model as the engine left it after the
run: the engine refines its latency model online from every measured iteration (a window of the last 512),
so after the run it has been fitted on the run's own iterations. The policy in the simulation starts from the
model the real policy started with.

Both sides measure the same way: TTFT from the arrival time (queueing included), TPOT per request as (last
token - first token) / (tokens - 1), SLO attainment over the requests that arrived in the window (unfinished
ones miss), finetuning tokens/s as tokens of sequences whose backward completed inside the window.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from typing import TYPE_CHECKING, Optional, Sequence


from flexc.runtime.latency import LatencyModel
from flexc.runtime.simulator.report import summarize_requests
from flexc.runtime.simulator.run import InstanceSpec, SimulationConfig, simulate_instance
from flexc.runtime.simulator.workload import RequestSpec, SequenceShape

if TYPE_CHECKING:
    from flexc.runtime.dataset import TrainingSequence
    from flexc.runtime.engine import Engine

__all__ = ["ValidationLoad", "make_load", "RealRun", "run_real", "run_replay", "compare", "attainment", "METRICS",
           "full_iteration"]

METRICS = ("slo_attainment", "finetune_tokens_per_s", "tpot_p50", "ttft_p50", "inference_tokens_per_s")


@dataclasses.dataclass(kw_only=True)
class ValidationLoad:
    """One seeded load: requests with token ids, finetuning sequences with tokens and their shapes."""

    requests: list[RequestSpec]
    prompts: list[list[int]]
    """Prompt token ids of each request."""
    training: list["TrainingSequence"]
    shapes: list[SequenceShape]


def make_load(*, rate: float, duration: float, seed: int, vocab_size: int, cv: float = 1.0,
              prompt_tokens: tuple[int, int] = (16, 96), output_tokens: tuple[int, int] = (8, 32),
              finetune_tokens: tuple[int, int] = (32, 96), finetune_sequences: int = 64) -> ValidationLoad:
    """Arrivals at ``rate`` for ``duration`` s (gamma gaps with coefficient of variation ``cv``; 1 is Poisson),
    uniform prompt/output lengths, random token ids (the requests ignore EOS, so they generate exactly their
    output length), uniform finetuning lengths."""
    from flexc.runtime.dataset import TrainingSequence
    rng = random.Random(seed)
    shape = 1.0 / cv ** 2
    reqs, prompts, t = [], [], 0.0
    while True:
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
        if t >= duration:
            break
        p, o = rng.randint(*prompt_tokens), rng.randint(*output_tokens)
        reqs.append(RequestSpec(arrival=t, prompt_tokens=p, output_tokens=o))
        prompts.append([rng.randrange(vocab_size) for _ in range(p)])
    training, shapes = [], []
    for _ in range(finetune_sequences):
        n = rng.randint(*finetune_tokens)
        ids = tuple(rng.randrange(vocab_size) for _ in range(n))
        training.append(TrainingSequence(ids, ids[1:] + (-100,)))
        shapes.append(SequenceShape(length=n, num_loss_tokens=n - 1))
    return ValidationLoad(requests=reqs, prompts=prompts, training=training, shapes=shapes)


@dataclasses.dataclass(kw_only=True)
class RealRun:
    """What the real engine did."""

    metrics: dict
    """Metrics at the SLOs the run was given."""
    ttfts: list[float]
    """TTFT (from arrival) of every finished request."""
    tpots: list[float]
    requests: int
    """Requests that arrived in the window."""
    latency_start: LatencyModel
    """The engine's latency model when the run began (its start-up fit)."""
    latency_end: LatencyModel
    """The same model after the run (refined online on the run's iterations)."""
    iterations: int
    wall: float


def run_real(engine: "Engine", load: ValidationLoad, *, duration: float, tpot_slo: float, ttft_slo: float,
             drain: float = 30.0, grad_accum: int = 1, lr: float = 1e-3) -> RealRun:
    """Serve ``load`` on ``engine`` (each request submitted once its arrival time has passed) beside a finetuning
    job on ``load.training`` for ``duration`` seconds, then up to ``drain`` more for the requests to finish; SLO
    attainment against ``tpot_slo`` and ``ttft_slo``."""
    latency_start = copy.deepcopy(engine.latency)
    engine.recorder.reset()
    engine.finetune(load.training, adapter="validation", optimizer="sgd", lr=lr, grad_accum=grad_accum, epochs=1000)
    t0 = time.perf_counter()
    arrival_at: dict[str, float] = {}
    submitted_at: dict[str, float] = {}
    ttfts, tpots = [], []
    generated = 0
    i = 0
    while True:
        now = time.perf_counter() - t0
        if now >= duration and (not arrival_at or now >= duration + drain):
            break
        while i < len(load.requests) and load.requests[i].arrival <= now:
            r = load.requests[i]
            rid = engine.submit(load.prompts[i], max_new_tokens=r.output_tokens, ignore_eos=True)
            arrival_at[rid], submitted_at[rid] = r.arrival, now
            i += 1
        if not engine.has_work():
            nxt = load.requests[i].arrival if i < len(load.requests) else duration
            time.sleep(min(max(nxt - now, 0.001), 0.25))
            continue
        for ev in engine.step():
            end = time.perf_counter() - t0
            generated += end <= duration
            if ev.finished and ev.request_id in arrival_at:
                res = engine.result(ev.request_id, release=True)
                # NOTE: the engine's TTFT runs from submission; the load's from arrival
                ttfts.append(res.ttft + submitted_at[ev.request_id] - arrival_at.pop(ev.request_id))
                tpots.append(res.tpot)
    wall = time.perf_counter() - t0
    for rid in list(arrival_at):
        engine.abort(rid)
    ft = _finetune_tokens_in_window(engine, t0, duration)
    metrics = summarize_requests(ttfts, tpots, i, tpot_slo, ttft_slo)
    metrics.update(finetune_tokens_per_s=ft / duration, inference_tokens_per_s=generated / duration,
                   requests=i, finished=len(ttfts))
    return RealRun(metrics=metrics, ttfts=ttfts, tpots=tpots, requests=i, latency_start=latency_start,
                   latency_end=copy.deepcopy(engine.latency),
                   iterations=len(engine.recorder.history), wall=wall)


def _finetune_tokens_in_window(engine: "Engine", t0: float, duration: float) -> int:
    rec = engine.recorder
    if rec.start is None:
        return 0
    return sum(h["ft_tokens_done"] for h in rec.history if rec.start + h["t"] + h["seconds"] - t0 <= duration)


def run_replay(load: ValidationLoad, *, cost_latency: LatencyModel, policy_latency: LatencyModel, policy: str,
               duration: float, drain: float, tpot_slo: float, ttft_slo: float, token_budget: int, kv_tokens: int,
               max_model_len: int, grad_accum: int = 1, lr: float = 1e-3) -> dict:
    """The same load simulated: iterations priced by ``cost_latency``, the policy starting from
    ``policy_latency``. Returns the metrics (keys of :data:`METRICS` and more)."""
    from flexc.runtime.simulator.cost import MeasuredCost
    spec = InstanceSpec(cost=MeasuredCost(cost_latency), latency=policy_latency,
                        num_layers=cost_latency.num_layers, kv_tokens=kv_tokens, max_model_len=max_model_len)
    cfg = SimulationConfig(rates=(1.0,), policies=(policy,), duration=duration, drain=drain, requests=load.requests,
                           tpot_slo=tpot_slo, ttft_slo=ttft_slo, token_budget=token_budget, finetune=load.shapes,
                           grad_accum=grad_accum, lr=lr, instances=2)
    res = simulate_instance(spec, cfg, policy, 1.0, keep_requests=True)
    out = {m: getattr(res, m) for m in ("slo_attainment", "finetune_tokens_per_s", "tpot_p50", "tpot_mean",
                                         "ttft_mean", "ttft_p50", "ttft_p99", "tpot_p99", "inference_tokens_per_s")}
    out.update(requests=res.requests, finished=res.finished, iterations=res.iterations, ttfts=res.notes["ttfts"],
               tpots=res.notes["tpots"])
    return out


def attainment(ttfts: Sequence[float], tpots: Sequence[float], requests: int, tpot_slo: float,
               ttft_slo: float) -> float:
    """SLO attainment of per-request TTFTs and TPOTs over ``requests`` arrivals (the unfinished ones miss)."""
    return summarize_requests(ttfts, tpots, requests, tpot_slo, ttft_slo)["slo_attainment"]


def full_iteration(latency: LatencyModel, token_budget: int) -> float:
    """Predicted seconds of a full iteration: 4 decodes and a finetuning chunk filling the token budget."""
    from flexc.runtime.latency import IterationWork
    n = token_budget - 4
    return latency.predict(IterationWork(decode_tokens=4, ft_forward_tokens=n, attention_pairs=n * 64))


def compare(real: dict, simulated: dict, metrics: Sequence[str] = METRICS) -> dict[str, dict]:
    """Per metric: real, simulated and the relative difference |sim - real| / |real|."""
    out = {}
    for m in metrics:
        r, s = float(real[m]), float(simulated[m])
        out[m] = {"real": r, "simulated": s, "relative_error": abs(s - r) / abs(r) if r else (0.0 if s == 0 else
                                                                                              float("inf"))}
    return out


def error_line(rows: dict[str, dict], limit: Optional[float] = None) -> str:
    """One line per metric, for messages and benchmark output."""
    return "; ".join(f"{m}: real {v['real']:.4g}, simulated {v['simulated']:.4g} ({100 * v['relative_error']:.1f}%)"
                     for m, v in rows.items())
