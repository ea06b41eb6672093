"""Whether ``flexc run`` did what it set out to do, and if not, the likely cause.

The main job co-serves a request load and trains an adapter. It falls short
when the share of requests that met their SLOs (TTFT and TPOT) is below a
target, when few of the submitted requests finished, or when finetuning made no
progress (no optimizer step, or the loss did not fall). :func:`judge` turns what
the run measured (:class:`RunFacts`) into a :class:`Verdict`: the problems, in
words, and the causes the numbers point at:

* a busy machine: the cores other processes kept busy just before this job
  ran anything (sampled from ``/proc/stat``, which does not lag like the load
  average; the 1-minute load average where there is none), or the load
  average at the end less this job's own threads, is at least half the cores;
* iterations slower than profiled: the measured iteration times add up to at
  least ``slow_factor`` times what the latency model fitted at start-up
  predicted for the same work (a profile taken on a quiet machine and a run on
  a busy one, or the other way round).

* inference alone over the TPOT target: an iteration of only the decodes the
  run typically held takes longer than the target on this machine (its latency
  model at the end of the run), so no request can meet it, with or without
  finetuning (:func:`tpot_out_of_reach` says so before the run as well).

When none applies the verdict says the load is more than this machine serves
within the SLOs. ``flexc run --strict`` exits 1 when the verdict is not ok.

    >>> v = judge(RunFacts(submitted=10, finished=10, slo_met=10, ft_steps=5, losses=[2.0, 1.0]))
    >>> v.ok
    True
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence

__all__ = ["MachineLoad", "RunFacts", "Verdict", "judge", "read_load", "busy_cores", "threads_for", "exit_status",
           "decodes_in_flight", "tpot_out_of_reach"]

BUSY_SHARE = 0.5
"""Other processes' load (runnable tasks) at or above this share of the cores counts as a busy machine."""


def read_load() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_times() -> Optional[tuple[int, int]]:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)         # idle + iowait
    return sum(fields[:8]), idle


def busy_cores(sample_s: float = 0.5) -> Optional[float]:
    """How many cores other processes keep busy right now (``/proc/stat`` sampled over ``sample_s``; unlike the
    load average it does not lag a job that just ended), or None where there is no ``/proc/stat``."""
    a = _cpu_times()
    time.sleep(sample_s)
    b = _cpu_times()
    if a is None or b is None or b[0] <= a[0]:
        return None
    total, idle = b[0] - a[0], b[1] - a[1]
    return (1 - idle / total) * (os.cpu_count() or 1)


def threads_for(cores: int, busy: Optional[float]) -> int:
    """Torch threads for a job beside ``busy`` busy cores: 0 (torch's choice) on a quiet machine, else the cores
    left free, at least 1 (OpenMP threads that must wait for a core spin against the other processes and run
    several times slower than fewer threads)."""
    if busy is None or busy < BUSY_SHARE:
        return 0
    return max(1, min(cores, round(cores - busy)))


@dataclasses.dataclass(kw_only=True)
class MachineLoad:
    """The machine's load around the run."""

    cores: int
    """CPU cores of the machine (``os.cpu_count()``)."""
    start: Optional[float]
    """Cores other processes kept busy before the job built or ran anything (:func:`busy_cores`, else the 1-minute
    load average; None: not available)."""
    end: Optional[float]
    """1-minute load average when co-serving ended (this job's own threads included)."""
    own_threads: int = 1
    """Threads this job computes with (torch's intra-op threads)."""
    busy_fraction: float = 1.0
    """Share of the co-serving time the engine spent in iterations (its threads runnable)."""

    @property
    def others(self) -> Optional[float]:
        """The load of other processes: the larger of the start reading and the end reading less this job's
        own (threads x busy fraction); None if neither was read."""
        readings = []
        if self.start is not None:
            readings.append(self.start)
        if self.end is not None:
            readings.append(max(self.end - self.own_threads * self.busy_fraction, 0.0))
        return max(readings) if readings else None

    @property
    def busy(self) -> bool:
        others = self.others
        return others is not None and others >= BUSY_SHARE * max(self.cores, 1)


@dataclasses.dataclass(kw_only=True)
class RunFacts:
    """What one run measured (only counts and times; no engine)."""

    submitted: int
    """Requests submitted during co-serving."""
    finished: int
    """Requests that finished within it."""
    slo_met: int
    """Finished requests whose TTFT and TPOT met their SLOs."""
    slo_target: float = 0.9
    """Fraction of submitted requests that should finish within their SLOs (0-1)."""
    ft_status: str = "running"
    """The finetuning job's status at the end (queued, running, completed, failed)."""
    ft_steps: int = 0
    """Optimizer steps taken."""
    ft_total_steps: int = 0
    losses: Sequence[float] = ()
    """Training loss per optimizer step, in order."""
    ft_error: Optional[str] = None
    """Why the job failed, if it did."""
    load: Optional[MachineLoad] = None
    observed_s: Optional[float] = None
    """Measured seconds of the iterations compared with the profile (None: no comparison)."""
    profiled_s: Optional[float] = None
    """What the start-up latency profile predicted for the same iterations."""
    iterations_compared: int = 0
    tpot_slo: Optional[float] = None
    """The TPOT target in seconds (None: not judged against the decode-only iteration)."""
    decodes: int = 0
    """Decodes in a typical iteration of the run (the median over iterations that held any)."""
    decode_only_s: Optional[float] = None
    """Seconds the latency model at the end of the run predicts for an iteration of only those decodes."""


def decodes_in_flight(iteration_s: Callable[[int], float], rate: float, mean_new_tokens: float,
                      limit: int = 1024) -> int:
    """Requests decoding at once under a steady load of ``rate`` requests/s of ``mean_new_tokens`` tokens each
    when an iteration of k decodes takes ``iteration_s(k)`` seconds: Little's law (in flight = rate x time in the
    system, about ``mean_new_tokens`` iterations), solved by iterating from one request."""
    k = 1
    for _ in range(64):
        nxt = max(1, min(limit, math.ceil(rate * mean_new_tokens * iteration_s(k))))
        if nxt == k:
            break
        k = nxt
    return k


def tpot_out_of_reach(decodes: int, decode_only_s: Optional[float], tpot_slo: Optional[float]) -> Optional[str]:
    """When an iteration of ``decodes`` decodes alone takes longer than the TPOT target, the words for it (with a
    target that would leave finetuning about half of each iteration: twice the decodes' time, in 50 ms steps);
    else None."""
    if not decodes or decode_only_s is None or tpot_slo is None or decode_only_s <= tpot_slo:
        return None
    half = math.ceil(2 * decode_only_s / 0.05) * 0.05
    return (f"inference alone exceeds the TPOT target on this machine: an iteration of {decodes} decode"
            f"{'s' if decodes != 1 else ''} takes about {1000 * decode_only_s:.0f} ms, over the "
            f"{1000 * tpot_slo:.0f} ms target, so finetuning runs at its floor share; a target near {half:.2f} s "
            "(--tpot-slo) would leave finetuning about half of each iteration, a lower --rate fewer decodes")


@dataclasses.dataclass(kw_only=True)
class Verdict:
    """The run's shortfalls and their likely causes; ok when there are no problems."""

    problems: list[str] = dataclasses.field(default_factory=list)
    causes: list[str] = dataclasses.field(default_factory=list)
    slowdown: Optional[float] = None
    """Measured / profiled iteration time (None: not compared)."""
    load_others: Optional[float] = None
    """Other processes' 1-minute load average (see :class:`MachineLoad`)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The summary's verdict lines."""
        if self.ok:
            return ["verdict     OK: SLO attainment at target and finetuning made progress"]
        out = ["verdict     NOT OK: " + "; ".join(self.problems)]
        out += [f"            likely cause: {c}" for c in self.causes]
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, **dataclasses.asdict(self)}


def judge(facts: RunFacts, *, slow_factor: float = 1.25) -> Verdict:
    """The verdict on ``facts``: problems when the SLO attainment (over submitted requests) is below target or
    finetuning made no progress, and the causes the load and the iteration times point at."""
    v = Verdict()
    if facts.submitted:
        attained = facts.slo_met / facts.submitted
        if attained < facts.slo_target:
            v.problems.append(f"{100 * attained:.0f}% of {facts.submitted} requests finished within their SLOs "
                              f"({facts.finished} finished), target {100 * facts.slo_target:.0f}%")
    no_steps = facts.ft_steps == 0
    if facts.ft_status == "failed":
        v.problems.append(f"the finetuning job failed ({facts.ft_error or 'no reason given'})")
    elif no_steps:
        v.problems.append(f"finetuning made no progress (step 0 of {facts.ft_total_steps})")
    elif not _loss_fell(facts.losses):
        v.problems.append(f"finetuning loss did not fall over {len(facts.losses)} steps "
                          f"({_loss_span(facts.losses)})")
    if facts.load is not None:
        v.load_others = facts.load.others
    if facts.observed_s is not None and facts.profiled_s:
        v.slowdown = facts.observed_s / facts.profiled_s
    if v.ok:
        return v
    if facts.load is not None and facts.load.busy:
        v.causes.append(f"a busy machine: other processes kept about {v.load_others:.1f} of {facts.load.cores} "
                        f"cores busy ({_fmt(facts.load.start)} at the start; load average {_fmt(facts.load.end)} at "
                        f"the end with this job's {facts.load.own_threads} thread{'s' if facts.load.own_threads != 1 else ''})")
    if v.slowdown is not None and v.slowdown >= slow_factor:
        v.causes.append(f"iterations took {v.slowdown:.2f}x the time the start-up latency profile predicted "
                        f"({facts.observed_s:.1f} s measured vs {facts.profiled_s:.1f} s over "
                        f"{facts.iterations_compared} iterations): the machine was slower than when it was profiled")
    reach = tpot_out_of_reach(facts.decodes, facts.decode_only_s, facts.tpot_slo)
    if reach is not None:
        v.causes.append(reach + " (the run's typical iteration; its latency model at the end)")
    if not v.causes:
        slow = f"iterations matched the profile ({v.slowdown:.2f}x)" if v.slowdown is not None else \
            "iteration times were not compared with the profile"
        quiet = f"load of others {v.load_others:.1f} on {facts.load.cores} cores" if v.load_others is not None \
            and facts.load is not None else "load average not available"
        v.causes.append(f"none found in the machine ({quiet}; {slow}): the load or the SLOs ask more than this "
                        "machine serves")
    return v


def _loss_fell(losses: Sequence[float]) -> bool:
    """Whether the mean loss of the last quarter of the steps is below that of the first quarter (one step
    cannot show a fall)."""
    if len(losses) < 2:
        return False
    k = max(len(losses) // 4, 1)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def _loss_span(losses: Sequence[float]) -> str:
    return f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss recorded"


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def exit_status(verdict: Verdict, strict: bool) -> int:
    """``flexc run``'s exit status: 1 under ``--strict`` when the verdict is not ok, else 0."""
    return 1 if strict and not verdict.ok else 0
