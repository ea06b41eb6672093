"""Finetuning jobs: data order, gradient accumulation, optimizer, checkpoints, failure handling.

A :class:`FinetuneJob` turns a dataset into :class:`FinetuneSequence` objects
one at a time (the scheduler runs their chunks and backward windows inside
co-serving iterations), accumulates their LoRA gradients in fp32, and steps an
optimizer (AdamW or SGD) on fp32 master copies of the adapter weights every
``grad_accum`` sequences. The live adapter tensors (what inference requests for
that adapter read) are updated in place right after each step, so the next
iteration sees the new version; ``version`` counts the steps.

The loss of a step is the mean over its sequences of each sequence's mean token
loss (Hugging Face Trainer semantics at batch size 1 with accumulation).

Checkpoints (PEFT format + optimizer state + data position) are written
atomically every ``checkpoint_every`` steps; a job constructed with the same
config over a checkpoint directory resumes from the latest one and ends with the
same adapter as an uninterrupted run. A NaN/inf loss or gradient skips that step
and is recorded; ``max_nonfinite`` in a row fail the job (inference continues).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import random
import time
from typing import Any, Callable, Optional, Sequence

import torch

from flexc.runtime.checkpoint import Checkpoint, read_latest_checkpoint, write_checkpoint
from flexc.runtime.sequence import SequenceProgress, WindowResult

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneJob", "FinetuneQueue", "JobStatus"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    """How to train one adapter."""

    optimizer: str = "adamw"
    """``adamw`` (default) or ``sgd``."""
    lr: float = 1e-4
    """Peak learning rate."""
    schedule: str = "constant"
    """``constant``, ``linear`` (decay to 0) or ``cosine``; after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    """SGD momentum."""
    grad_accum: int = 1
    """Sequences per optimizer step."""
    epochs: int = 1
    steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides ``epochs`` when set)."""
    seed: int = 0
    """Data order: the dataset is shuffled per epoch with this seed; 0 keeps the file order in epoch 0."""
    shuffle: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0: only at the end, when checkpoint_dir is set)."""
    max_nonfinite: int = 3
    """Fail the job after this many non-finite steps in a row."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("grad_accum", "epochs", "max_nonfinite"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1 or None, got {self.steps!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


class JobStatus(str, enum.Enum):
    """Where a finetuning job is in its life."""

    QUEUED = "queued"
    """Waiting for the jobs before it."""
    RUNNING = "running"
    """Its sequences are being trained."""
    COMPLETED = "completed"
    """Every step taken (and the final checkpoint written)."""
    FAILED = "failed"
    """Stopped by an error or too many non-finite steps in a row (``error`` says why)."""

    def __str__(self) -> str:          # printed and formatted as its value ("completed"), as the summary shows it
        return self.value

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


class FinetuneJob:
    """One adapter being trained on one dataset; the scheduler feeds it iterations."""

    def __init__(self, job_id: str, sequences: Sequence[Any], params: dict[str, torch.Tensor], config: FinetuneConfig,
                 make_sequence: Callable[[Any, float, str], SequenceProgress], adapter_name: str = "default",
                 peft_config: Any = None, all_ranks: Optional[Callable[[bool], bool]] = None):
        """``params``: the live adapter tensors (at tp > 1 this rank's shards, trained as such; empty for a job
        that only counts sequences and steps, as the simulator's); ``make_sequence(item, loss_scale, seq_id)``
        builds the sequence the scheduler runs (a :class:`~flexc.runtime.sequence.SequenceProgress`); ``all_ranks``
        (tp > 1): whether a flag holds on every rank, so that all ranks skip the same non-finite steps."""
        if not sequences:
            raise ValueError(f"job {job_id}: the dataset is empty")
        self.job_id = job_id
        self.adapter_name = adapter_name
        self.peft_config = peft_config
        self.config = config
        self.data = list(sequences)
        self.params = params
        self._make_sequence = make_sequence
        self._all_ranks = all_ranks
        self.master = {n: p.detach().to(torch.float32).clone().requires_grad_(True) for n, p in params.items()}
        self.grad_acc = {n: torch.zeros_like(m) for n, m in self.master.items()}
        self.optimizer = self._build_optimizer()   # None for a job without tensors (the simulator's)
        self.total_steps = config.steps or (config.epochs * len(self.data)) // config.grad_accum
        if self.total_steps < 1:
            raise ValueError(f"job {job_id}: {len(self.data)} sequences with grad_accum {config.grad_accum} "
                             "make no optimizer step; lower grad_accum or raise epochs")
        self.lr_schedule = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
                            if self.optimizer is not None else None)
        self.status = JobStatus.QUEUED
        self.error: Optional[str] = None
        self.step = 0
        self.version = 0
        self.position = 0            # sequences consumed (over all epochs)
        self.loss_history: list[float] = []
        self.skipped_steps: list[int] = []
        self._nonfinite_in_row = 0
        self._step_losses: list[float] = []
        self._step_sequences = 0
        self._step_finite = True
        self.current: Optional[SequenceProgress] = None
        self.tokens_trained = 0
        self._started: Optional[float] = None
        if config.checkpoint_dir:
            self._maybe_resume()

    # ---- data ----------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.data)))
        if self.config.shuffle:
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def _sequence_at(self, position: int) -> Any:
        epoch, i = divmod(position, len(self.data))
        return self.data[self._order(epoch)[i]]

    @property
    def finished(self) -> bool:
        return self.status.finished

    def next_sequence(self) -> Optional[SequenceProgress]:
        """The sequence in flight, or a new one when the previous is done; None when the job has finished."""
        if self.finished:
            return None
        if self.current is not None and not self.current.done:
            return self.current
        if self.step >= self.total_steps:
            self._finish()
            return None
        if self.status == JobStatus.QUEUED:
            self.status = JobStatus.RUNNING
            self._started = time.perf_counter()
        seq = self._sequence_at(self.position)
        scale = 1.0 / (max(seq.num_loss_tokens, 1) * self.config.grad_accum)
        self.current = self._make_sequence(seq, scale, f"{self.job_id}/{self.position}")
        self.position += 1
        return self.current

    # ---- gradients and steps -------------------------------------------------------------------------
    def on_window(self, result: WindowResult) -> None:
        """Accumulate one backward window's gradients; step when the accumulation is complete."""
        for name, g in result.grads.items():
            g32 = g.to(torch.float32)
            if not torch.isfinite(g32).all():
                self._step_finite = False
            self.grad_acc[name].add_(g32)
        if result.loss_sum is not None:
            seq = self.current
            n = max(seq.seq.num_loss_tokens, 1) if seq is not None else 1
            loss = result.loss_sum / n
            if not math.isfinite(loss):
                self._step_finite = False
            self._step_losses.append(loss)
        if self.current is not None and self.current.done:
            self.tokens_trained += self.current.length
            self._step_sequences += 1
            if self._step_sequences == self.config.grad_accum:
                self._optimizer_step()

    def _optimizer_step(self) -> None:
        loss = sum(self._step_losses) / max(len(self._step_losses), 1)
        if self._all_ranks is not None:          # NOTE: each rank saw only its gradient shards
            self._step_finite = self._all_ranks(self._step_finite)
        if self._step_finite:
            if self.optimizer is not None:       # NOTE: a job without tensors only counts its steps
                for name, m in self.master.items():
                    m.grad = self.grad_acc[name]
                self.optimizer.step()
                self.lr_schedule.step()          # a skipped step does not advance the learning-rate schedule
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for name, p in self.params.items():      # publish the new version to inference
                        p.copy_(self.master[name].to(p.dtype))
            self.version += 1
            self.loss_history.append(loss)
            self._nonfinite_in_row = 0
        else:
            self.skipped_steps.append(self.step)
            self._nonfinite_in_row += 1
            logger.warning("job %s: non-finite loss/gradient at step %d, step skipped", self.job_id, self.step)
        self.step += 1
        for g in self.grad_acc.values():
            g.zero_()
        self._step_losses, self._step_sequences, self._step_finite = [], 0, True
        if self._nonfinite_in_row >= self.config.max_nonfinite:
            self.fail(f"{self._nonfinite_in_row} non-finite steps in a row (last at step {self.step - 1})")
            return
        every = self.config.checkpoint_every
        if self.config.checkpoint_dir and (every and self.step % every == 0):
            self.save_checkpoint()
        if self.step >= self.total_steps:
            self._finish()

    def fail(self, reason: str) -> None:
        self.status = JobStatus.FAILED
        self.error = reason
        self.current = None
        logger.error("job %s failed: %s", self.job_id, reason)

    def _finish(self) -> None:
        if self.finished:
            return
        if self.config.checkpoint_dir and not (self.config.checkpoint_every
                                               and self.step % self.config.checkpoint_every == 0):
            self.save_checkpoint()
        self.status = JobStatus.COMPLETED
        self.current = None

    @property
    def tokens_per_second(self) -> float:
        if self._started is None:
            return 0.0
        return self.tokens_trained / max(time.perf_counter() - self._started, 1e-9)

    def summary(self) -> dict:
        return {"job_id": self.job_id, "adapter": self.adapter_name, "status": self.status.value, "step": self.step,
                "total_steps": self.total_steps, "loss": self.loss_history[-1] if self.loss_history else None,
                "skipped_steps": list(self.skipped_steps), "tokens_per_second": round(self.tokens_per_second, 2),
                "error": self.error}

    # ---- optimizer -----------------------------------------------------------------------------------
    def _build_optimizer(self) -> Optional[torch.optim.Optimizer]:
        c = self.config
        params = list(self.master.values())
        if not params:
            return None
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        span = max(self.total_steps - c.warmup_steps, 1)
        frac = min(max(step - c.warmup_steps, 0) / span, 1.0)
        return 1.0 - frac if c.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write ``checkpoint_dir/step-N`` (atomically; see :mod:`flexc.runtime.checkpoint`); returns its path."""
        assert self.config.checkpoint_dir is not None
        tensors = {"master": self.master, "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.lr_schedule.state_dict()}
        state = {"version": self.version, "position": self.position, "loss_history": self.loss_history,
                 "skipped_steps": self.skipped_steps, "nonfinite_in_row": self._nonfinite_in_row,
                 "tokens_trained": self.tokens_trained,
                 "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "checkpoint_dir"}}
        adapter = (self.master, self.adapter_name, self.peft_config) if self.peft_config is not None else None
        path = write_checkpoint(self.config.checkpoint_dir, Checkpoint(step=self.step, tensors=tensors, state=state),
                                adapter)
        logger.info("job %s: checkpoint %s", self.job_id, path)
        return path

    def _maybe_resume(self) -> None:
        try:
            ck = read_latest_checkpoint(self.config.checkpoint_dir)
        except ValueError as e:
            raise ValueError(f"job {self.job_id}: {e}") from e
        if ck is None:
            return
        if set(ck.tensors["master"]) != set(self.master):
            raise ValueError(f"job {self.job_id}: checkpoint {ck.path} holds a different adapter")
        with torch.no_grad():
            for n, m in self.master.items():
                m.copy_(ck.tensors["master"][n])
            for n, p in self.params.items():
                p.copy_(self.master[n].to(p.dtype))
        self.optimizer.load_state_dict(ck.tensors["optimizer"])
        self.lr_schedule.load_state_dict(ck.tensors["scheduler"])
        st = ck.state
        self.step, self.version, self.position = ck.step, st["version"], st["position"]
        self.loss_history, self.skipped_steps = st["loss_history"], st["skipped_steps"]
        self._nonfinite_in_row = st["nonfinite_in_row"]
        self.tokens_trained = st["tokens_trained"]
        logger.info("job %s: resumed from %s at step %d", self.job_id, ck.path, self.step)
        if self.step >= self.total_steps:
            self.status = JobStatus.COMPLETED


class FinetuneQueue:
    """Finetuning jobs in submission order; the first unfinished one is active."""

    def __init__(self) -> None:
        self.jobs: list["FinetuneJob"] = []
        self.sequences: dict[str, "SequenceProgress"] = {}
        """Sequences with work in flight, by id (what the executor records into)."""
        self._job_of: dict[str, "FinetuneJob"] = {}

    def add(self, job: "FinetuneJob") -> None:
        self.jobs.append(job)

    def active(self) -> Optional[tuple["FinetuneJob", "SequenceProgress"]]:
        """(job, its current sequence) of the first job with work left, or None."""
        for job in self.jobs:
            fs = job.next_sequence()
            if fs is not None:
                self.sequences[fs.seq_id] = fs
                self._job_of[fs.seq_id] = job
                return job, fs
        return None

    def job_of(self, seq_id: str) -> "FinetuneJob":
        """The job a sequence handed out by :meth:`active` belongs to."""
        return self._job_of[seq_id]

    def release(self, seq_id: str) -> None:
        """Forget a sequence whose work is done (or whose job stopped)."""
        self.sequences.pop(seq_id, None)
        self._job_of.pop(seq_id, None)

    def drop(self, job: "FinetuneJob") -> list[str]:
        """Forget ``job`` and its sequences in flight; their ids (the caller frees their KV blocks)."""
        sids = [sid for sid, j in self._job_of.items() if j is job and sid in self.sequences]
        for sid in sids:
            self.release(sid)
        if job in self.jobs:
            self.jobs.remove(job)
        return sids

    @property
    def has_work(self) -> bool:
        return any(not j.finished for j in self.jobs)
