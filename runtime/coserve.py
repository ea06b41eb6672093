"""Co-serving policies: where finetuning tokens go in each iteration.

The hybrid token scheduler (:class:`CoServePolicy`, FlexLLM's idea) builds
every iteration as: decode tokens, then prefill chunks (the inference policy),
then as many finetuning tokens as the latency model predicts keep the
iteration within the TPOT target: forward tokens of the active finetuning
sequence while its forward is incomplete, else backward layers (a window
top-down over the whole sequence). When no inference work is present the
iteration still advances finetuning, so idle time is never wasted.

Baselines beside it, through the same :class:`~flexc.runtime.scheduler.SchedulingPolicy`
interface:

* ``temporal``: the paper's temporal sharing: inference iterations, with a
  finetuning-only iteration (a full token budget of forward, or the whole
  backward) after every ``interval`` of them and whenever inference is idle;
* ``inference_only``: finetuning never runs;
* ``finetune_only``: only finetuning runs, at the full token budget.

:class:`FinetuneQueue` holds the jobs (first come first served; one job's
sequence is in flight at a time, the others wait). :func:`iteration_work`
describes a scheduled batch for the latency model.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from flexc.runtime.batch import SchedulerOutput, ScheduledSequence, SeqKind
from flexc.runtime.latency import IterationWork, LatencyModel
from flexc.runtime.scheduler import DecodeFirstPolicy

if TYPE_CHECKING:
    from flexc.runtime.executor import Executor
    from flexc.runtime.finetune import FinetuneJob
    from flexc.runtime.kv_cache import KVCacheManager
    from flexc.runtime.scheduler import Scheduler
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["FinetuneQueue", "CoServePolicy", "TemporalPolicy", "InferenceOnlyPolicy", "FinetuneOnlyPolicy",
           "POLICIES", "make_policy", "iteration_work"]


class FinetuneQueue:
    """Finetuning jobs in submission order; the first unfinished one is active."""

    def __init__(self) -> None:
        self.jobs: list["FinetuneJob"] = []
        self.sequences: dict[str, "FinetuneSequence"] = {}
        """Sequences with work in flight, by id (what the executor records into)."""

    def add(self, job: "FinetuneJob") -> None:
        self.jobs.append(job)

    def active(self) -> Optional[tuple["FinetuneJob", "FinetuneSequence"]]:
        """(job, its current sequence) of the first job with work left, or None."""
        for job in self.jobs:
            fs = job.next_sequence()
            if fs is not None:
                self.sequences[fs.seq_id] = fs
                return job, fs
        return None

    def job_of(self, seq_id: str) -> "FinetuneJob":
        prefix = seq_id.rsplit("/", 1)[0]
        return next(j for j in self.jobs if j.job_id == prefix)

    @property
    def has_work(self) -> bool:
        return any(not j.finished for j in self.jobs)


def iteration_work(batch: SchedulerOutput, num_layers: int, lengths: dict[str, int]) -> IterationWork:
    """The latency model's description of a scheduled batch (``lengths``: finetuning sequence lengths)."""
    bwd = sum(k * lengths.get(sid, 0) for sid, k in batch.finetune_backward.items())
    return _seqs_work(batch.seqs) + IterationWork(ft_backward_layer_tokens=bwd,
                                                  ft_backward_layers=sum(batch.finetune_backward.values()))


def _seqs_work(seqs: list[ScheduledSequence]) -> IterationWork:
    """The forward part: tokens by kind, attention pairs of every chunk, one pass per finetuning adapter."""
    dec = pre = ft = pairs = 0
    ft_adapters = set()
    for s in seqs:
        n = len(s.token_ids)
        if s.kind is SeqKind.FINETUNE:
            ft += n
            ft_adapters.add(s.adapter_id)
        elif s.kind is SeqKind.DECODE:
            dec += n
        else:
            pre += n
        pairs += n * (s.num_computed_tokens + n) if n > 1 else 0
    return IterationWork(decode_tokens=dec, prefill_tokens=pre, attention_pairs=pairs, ft_forward_tokens=ft,
                         ft_forward_passes=len(ft_adapters))


def _tokens_left(sched: "Scheduler", seqs: list[ScheduledSequence]) -> int:
    return sched.config.token_budget - sum(len(s.token_ids) for s in seqs)


def _add_forward(sched: "Scheduler", job: "FinetuneJob", fs: "FinetuneSequence", n: int,
                 seqs: list[ScheduledSequence]) -> bool:
    seq = sched.schedule_finetune_forward(fs, job.adapter_name, n)
    if seq is not None:
        seqs.append(seq)
    return seq is not None


class InferenceOnlyPolicy(DecodeFirstPolicy):
    """Inference alone (finetuning jobs wait forever): the baseline for latency and the idle fraction."""

    name = "inference_only"


class FinetuneOnlyPolicy:
    """Finetuning alone at the full token budget; inference requests are not scheduled."""

    name = "finetune_only"

    def schedule(self, sched: "Scheduler") -> list[ScheduledSequence]:
        seqs: list[ScheduledSequence] = []
        _finetune_full(sched, seqs)
        return seqs


def _finetune_full(sched: "Scheduler", seqs: list[ScheduledSequence]) -> bool:
    """A finetuning-only iteration: a full budget of forward tokens, or the sequence's whole backward.
    Returns whether any finetuning work was scheduled."""
    act = sched.finetune.active() if sched.finetune is not None else None
    if act is None:
        return False
    job, fs = act
    if fs.forward_remaining > 0:
        return _add_forward(sched, job, fs, _tokens_left(sched, seqs), seqs)
    if fs.in_backward and not fs.done:
        sched.schedule_finetune_backward(fs, fs.next_backward_layer + 1)
        return True
    return False


class TemporalPolicy:
    """Temporal sharing: a finetuning-only iteration after every ``interval`` inference iterations, and
    whenever no inference work is waiting or running."""

    name = "temporal"

    def __init__(self, interval: int = 4):
        if interval < 1:
            raise ValueError(f"temporal interval must be >= 1, got {interval}")
        self.interval = interval
        self._count = 0
        self._inference = DecodeFirstPolicy()

    def schedule(self, sched: "Scheduler") -> list[ScheduledSequence]:
        busy = bool(sched.running or sched.waiting)
        if busy and self._count < self.interval:
            self._count += 1
            return self._inference.schedule(sched)
        self._count = 0
        seqs: list[ScheduledSequence] = []
        if not _finetune_full(sched, seqs) and busy:
            return self._inference.schedule(sched)
        return seqs


class CoServePolicy:
    """The hybrid token scheduler: inference first, then finetuning up to what the TPOT target allows."""

    name = "coserve"

    def __init__(self, latency: LatencyModel, tpot_slo: float, headroom: float = 0.9,
                 min_idle_tokens: int = 16):
        if tpot_slo <= 0:
            raise ValueError(f"tpot_slo must be positive seconds, got {tpot_slo}")
        self.latency = latency
        self.budget_s = tpot_slo * headroom
        """Iteration time the policy fills up to (a margin below the TPOT SLO for prediction error)."""
        self.min_idle_tokens = min_idle_tokens
        self._inference = DecodeFirstPolicy()
        self.bias = 1.0
        """Running mean of measured / predicted seconds over co-served iterations (inference and finetuning
        together). The model is fitted over every kind of iteration, the large finetuning-only ones weighing
        most; where it under-predicts the mixed ones the TPOT target matters for, the fill is cut by this."""

    def observe(self, work: IterationWork, seconds: float) -> None:
        """Record a measured iteration (the engine calls this when the policy uses the engine's model)."""
        inference = work.decode_tokens + work.prefill_tokens
        finetuning = work.ft_forward_tokens + work.ft_backward_layer_tokens
        pred = self.latency.predict(work)
        if inference and finetuning and pred > 0 and seconds > 0:
            self.bias = 0.9 * self.bias + 0.1 * min(seconds / pred, 4.0)

    @property
    def fill_s(self) -> float:
        """What this iteration is filled up to: the budget, less the model's recent under-prediction."""
        return self.budget_s / max(1.0, self.bias)

    def schedule(self, sched: "Scheduler") -> list[ScheduledSequence]:
        seqs = self._inference.schedule(sched)
        act = sched.finetune.active() if sched.finetune is not None else None
        if act is None:
            return seqs
        job, fs = act
        base = _seqs_work(seqs)
        idle = not seqs
        if fs.forward_remaining > 0:
            limit = min(_tokens_left(sched, seqs), fs.forward_remaining)
            start = fs.forward_pos
            # NOTE: the chunk's attention (its tokens x the context it sees) grows with its position
            n = self.latency.max_fit(base, self.fill_s, lambda m: IterationWork(
                ft_forward_tokens=m, attention_pairs=m * (start + m), ft_forward_passes=1), limit)
            if idle:
                n = max(n, min(limit, self.min_idle_tokens))
            if n > 0:
                _add_forward(sched, job, fs, n, seqs)
        elif fs.in_backward and not fs.done:
            left = fs.next_backward_layer + 1
            k = self.latency.max_units(base, self.fill_s,
                                       IterationWork(ft_backward_layer_tokens=fs.length, ft_backward_layers=1), left)
            if idle:
                k = max(k, 1)
            sched.schedule_finetune_backward(fs, min(k, left))
        return seqs


POLICIES = ("coserve", "temporal", "inference_only", "finetune_only")


def make_policy(name: str, latency: Optional[LatencyModel] = None, tpot_slo: float = 0.1, interval: int = 4):
    """A policy by name (``coserve`` needs the latency model)."""
    if name == "coserve":
        if latency is None:
            raise ValueError("the coserve policy needs a latency model")
        return CoServePolicy(latency, tpot_slo)
    if name == "temporal":
        return TemporalPolicy(interval)
    if name == "inference_only":
        return InferenceOnlyPolicy()
    if name == "finetune_only":
        return FinetuneOnlyPolicy()
    raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")



def profile_latency(executor: "Executor", kv: "KVCacheManager", vocab_size: int, max_len: int,
                    repeats: int = 2, seed: int = 0) -> list[tuple[IterationWork, float]]:
    """Time a short grid of synthetic iterations (decode, prefill, finetuning forward and backward, mixed)
    on the real executor; the samples fit a :class:`LatencyModel` at start-up.

    Uses scratch KV blocks (freed afterwards) and a throw-away finetuning sequence on the base weights.
    """
    import time

    import torch

    from flexc.runtime.dataset import TrainingSequence
    from flexc.runtime.sequence import FinetuneSequence, make_layouts

    g = torch.Generator().manual_seed(seed)
    runner = executor.runner
    num_layers = len(runner.layers)
    seq_len = max(8, min(128, max_len // 2))
    ctx = max(4, min(32, max_len // 4))
    samples: list[tuple[IterationWork, float]] = []
    ids = iter(range(10**9))

    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    def inference_seq(n_new: int, n_ctx: int) -> ScheduledSequence:
        rid = f"__profile_{next(ids)}"
        if kv.allocate_slots(rid, n_ctx + n_new) is None:
            raise ValueError("the KV cache is too small to profile the latency model; raise kv_cache_tokens")
        kind = SeqKind.DECODE if n_new == 1 else SeqKind.PREFILL
        return ScheduledSequence(req_id=rid, kind=kind, adapter_id=None, token_ids=toks(n_new), num_computed_tokens=n_ctx,
                                 block_ids=list(kv.get_block_ids(rid)), sample=True)

    def timed(seqs, backward=None, ft=None) -> None:
        batch = SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                                total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs),
                                finetune_backward=backward or {})
        t0 = time.perf_counter()
        if seqs:
            executor.execute(batch, ft)
        for sid, k in (backward or {}).items():
            ft[sid].backward_window(runner, k)
        executor.synchronize()
        samples.append((iteration_work(batch, num_layers, {s: f.length for s, f in (ft or {}).items()}),
                        time.perf_counter() - t0))
        for s in seqs:
            if s.kind is not SeqKind.FINETUNE:
                kv.free(s.req_id)

    try:
        for _ in range(repeats):
            for d in (1, 8, 32):
                timed([inference_seq(1, ctx) for _ in range(d)])
            for p in (seq_len // 4, seq_len):
                timed([inference_seq(p, 0)])
            seq = TrainingSequence(tuple(toks(seq_len)), tuple(toks(seq_len - 1)) + (-100,))
            fs = FinetuneSequence(seq, make_layouts(runner), 1.0 / seq_len, f"__profile_ft_{next(ids)}")
            ftmap = {fs.seq_id: fs}
            for n in (seq_len // 4, seq_len - seq_len // 4):
                s = None
                if kv.allocate_slots(fs.seq_id, fs.forward_pos + n) is not None:
                    start, tid, _ = fs.next_chunk(n)
                    s = ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=None, token_ids=tid,
                                          num_computed_tokens=start, block_ids=list(kv.get_block_ids(fs.seq_id)),
                                          sample=False)
                extra = [inference_seq(1, ctx) for _ in range(4)] if n != seq_len // 4 else []
                timed(extra + ([s] if s is not None else []), ft=ftmap)
            if fs.in_backward:
                timed([], backward={fs.seq_id: 1}, ft=ftmap)
                timed([], backward={fs.seq_id: max(1, num_layers // 2)}, ft=ftmap)
            kv.free(fs.seq_id)
    finally:
        for rid in list(kv.req_to_blocks):
            if rid.startswith("__profile"):
                kv.free(rid)
    return samples
