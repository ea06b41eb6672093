"""Co-serving policies: where finetuning tokens go in each iteration.

The hybrid token scheduler (:class:`CoServePolicy`, FlexLLM's idea) builds
every iteration as: decode tokens, then prefill chunks (the inference policy),
then as many finetuning tokens as the latency model predicts keep the
iteration within the TPOT target: forward tokens of the active finetuning
sequence while its forward is incomplete, else backward layers (a window
top-down over the whole sequence). When no inference work is present the
iteration is a finetuning-only one (a full token budget of forward, or the whole backward, as
``finetune_only`` runs), so idle time is never wasted.

Finetuning never starves: ``min_finetune_share`` is a floor *by tokens*, held
in every iteration whatever the latency model predicts (even when inference
alone already exceeds the TPOT target). While the active sequence's forward is
incomplete, ``ceil(min_finetune_share * token_budget)`` tokens of the budget are
reserved for it (inference gets the rest); during its backward, at least one
layer runs per iteration (a layer's backward covers the whole sequence and
cannot be split). A floor of 0 restores the strict SLO-first behaviour.

Baselines beside it, through the same :class:`~flexc.runtime.scheduler.SchedulingPolicy`
interface:

* ``temporal``: the paper's temporal sharing: inference iterations, with a
  finetuning-only iteration (a full token budget of forward, or the whole
  backward) after every ``interval`` of them and whenever inference is idle;
* ``inference_only``: finetuning never runs;
* ``finetune_only``: only finetuning runs, at the full token budget.

The finetuning jobs come from the scheduler's :class:`~flexc.runtime.finetune.FinetuneQueue`
(first come first served; one job's sequence is in flight at a time).
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Optional

from flexc.runtime.batch import ScheduledSequence
from flexc.runtime.latency import IterationWork, LatencyModel, forward_work
from flexc.runtime.scheduler import DecodeFirstPolicy

if TYPE_CHECKING:
    from flexc.runtime.finetune import FinetuneJob
    from flexc.runtime.scheduler import Scheduler
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["CoServePolicy", "TemporalPolicy", "InferenceOnlyPolicy", "FinetuneOnlyPolicy", "POLICIES", "make_policy"]


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
                 min_finetune_share: float = 0.05):
        if tpot_slo <= 0:
            raise ValueError(f"tpot_slo must be positive seconds, got {tpot_slo}")
        if not 0 <= min_finetune_share <= 1:
            raise ValueError(f"min_finetune_share must be a fraction in [0, 1], got {min_finetune_share}")
        self.latency = latency
        self.min_finetune_share = min_finetune_share
        """Floor of finetuning tokens per iteration, as a fraction of the token budget (see the module docstring)."""
        self.budget_s = tpot_slo * headroom
        """Iteration time the policy fills up to (a margin below the TPOT SLO for prediction error)."""
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

    def floor_tokens(self, sched: "Scheduler") -> int:
        """Finetuning forward tokens every iteration carries at least (0 without a floor)."""
        return math.ceil(self.min_finetune_share * sched.config.token_budget) if self.min_finetune_share else 0

    def schedule(self, sched: "Scheduler") -> list[ScheduledSequence]:
        act = sched.finetune.active() if sched.finetune is not None else None
        floor = min(self.floor_tokens(sched), act[1].forward_remaining) if act is not None else 0
        # NOTE: the floor's tokens are reserved before inference takes the budget (finetuning never starves)
        seqs = self._inference.schedule(sched, budget=sched.config.token_budget - floor)
        if act is None:
            return seqs
        job, fs = act
        base = forward_work(seqs)
        idle = not seqs
        if fs.forward_remaining > 0:
            limit = min(_tokens_left(sched, seqs), fs.forward_remaining)
            start = fs.forward_pos
            segment = int(job.adapter_name not in {s.adapter_id for s in seqs})     # its adapter's LoRA branch
            # NOTE: the chunk's attention (its tokens x the context it sees) grows with its position
            n = self.latency.max_fit(base, self.fill_s, lambda m: IterationWork(
                ft_forward_tokens=m, attention_pairs=m * (start + m), lora_segments=segment), limit)
            if idle:
                n = limit          # NOTE: no request to protect: as much as finetune_only would run
            n = max(n, floor)
            if n > 0:
                _add_forward(sched, job, fs, n, seqs)
        elif fs.in_backward and not fs.done:
            left = fs.next_backward_layer + 1
            loss = 0 if fs.head_done else fs.length           # NOTE: the first window runs the loss head too
            k = self.latency.max_fit(base, self.fill_s, lambda m: IterationWork(
                ft_backward_layer_tokens=m * fs.length, ft_backward_layers=m, ft_loss_tokens=loss), left)
            if idle:
                k = left
            elif self.min_finetune_share > 0:
                k = max(k, 1)
            sched.schedule_finetune_backward(fs, min(k, left))
        return seqs


POLICIES = ("coserve", "temporal", "inference_only", "finetune_only")


def make_policy(name: str, latency: Optional[LatencyModel] = None, tpot_slo: float = 0.1, interval: int = 4,
                min_finetune_share: float = 0.05):
    """A policy by name (``coserve`` needs the latency model; ``min_finetune_share`` is its floor)."""
    if name == "coserve":
        if latency is None:
            raise ValueError("the coserve policy needs a latency model")
        return CoServePolicy(latency, tpot_slo, min_finetune_share=min_finetune_share)
    if name == "temporal":
        return TemporalPolicy(interval)
    if name == "inference_only":
        return InferenceOnlyPolicy()
    if name == "finetune_only":
        return FinetuneOnlyPolicy()
    raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
