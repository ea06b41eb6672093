"""The engine side of fine-tuning jobs: start them one at a time, report every optimizer step.

:class:`JobRunner` lives in the engine worker's thread (it calls the engine).
The engine trains one job at a time, first come first served, so the runner
keeps the queued :class:`JobSpec` objects and starts the next one when none
runs (waiting while every adapter slot is busy). It reports each change of the
running job (a step, the end) through the spec's ``on_update`` and publishes
the job's model in the adapter catalog: ``ft:{base}:flexc:{suffix}:{id}``
serves the adapter being trained (its current version) while the job runs and
the final checkpoint after it succeeded.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

from flexc.runtime.server.errors import APIError

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine
    from flexc.runtime.finetune import FinetuneJob
    from flexc.runtime.server.catalog import AdapterCatalog
    from flexc.runtime.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

__all__ = ["JobSpec", "JobRunner"]


@dataclasses.dataclass(kw_only=True)
class JobSpec:
    """What the engine needs to run one job (built by the manager after validation)."""

    job_id: str
    model_name: str
    """The fine-tuned model's name: the adapter the job trains."""
    sequences: list
    """Tokenized training examples (``TrainingSequence``)."""
    init_adapter: Optional[str]
    """PEFT directory the adapter starts from (fine-tuning a fine-tuned model), or None: a fresh adapter."""
    epochs: int
    batch_size: int
    lr: float
    seed: int
    checkpoint_dir: str
    checkpoint_every: int
    on_update: Callable[[dict], None]
    """Called in the worker thread with a progress snapshot (the manager forwards it to its loop)."""


def _snapshot(state: str, job: Optional["FinetuneJob"] = None, **extra: Any) -> dict:
    out = {"state": state, "step": 0, "total_steps": 0, "loss": None, "trained_tokens": 0,
           "tokens_per_second": 0.0, "version": 0, "error": None}
    if job is not None:
        out.update(step=job.step, total_steps=job.total_steps,
                   loss=job.loss_history[-1] if job.loss_history else None, trained_tokens=job.tokens_trained,
                   tokens_per_second=round(job.tokens_per_second, 2), version=job.version, error=job.error)
    out.update(extra)
    return out


class JobRunner:
    """The engine side of fine-tuning jobs (engine-thread only)."""

    def __init__(self, engine: "Engine", catalog: "AdapterCatalog", metrics: "ServerMetrics"):
        self.engine = engine
        self.catalog = catalog
        self.metrics = metrics
        self.pending: collections.deque[JobSpec] = collections.deque()
        self.active: Optional[tuple[JobSpec, "FinetuneJob"]] = None
        self._reported: Optional[tuple] = None

    def enqueue(self, spec: JobSpec) -> None:
        self.catalog.require_lora()
        self.pending.append(spec)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if the runner does not hold it."""
        for spec in list(self.pending):
            if spec.job_id == job_id:
                self.pending.remove(spec)
                spec.on_update(_snapshot("cancelled"))
                return True
        if self.active is not None and self.active[0].job_id == job_id:
            spec, job = self.active
            self.engine.cancel_finetune(job)
            self.catalog.forget(spec.model_name)
            spec.on_update(_snapshot("cancelled", job, error=None))
            self.active = None
            return True
        return False

    def _start(self, spec: JobSpec) -> None:
        if spec.model_name not in self.engine.adapters:
            self.catalog.make_room()                 # APIError 503 when every slot is busy: retried later
        self.catalog.add_job_model(spec.model_name, None, 0, training=True)
        try:
            job = self.engine.finetune(spec.sequences, adapter=spec.model_name, init_adapter=spec.init_adapter,
                                       optimizer="adamw", lr=spec.lr, epochs=spec.epochs, grad_accum=spec.batch_size,
                                       seed=spec.seed, shuffle=True, checkpoint_dir=spec.checkpoint_dir,
                                       checkpoint_every=spec.checkpoint_every)
        except ValueError as e:
            self.catalog.forget(spec.model_name)
            spec.on_update(_snapshot("failed", error=str(e)))
            return
        self.active = (spec, job)
        self._reported = None
        spec.on_update(_snapshot("running", job, resumed_from=job.step or None))

    def advance(self) -> bool:
        """Start the next job when none runs; report the running one's progress. True when the model list
        (names, versions) changed."""
        changed = False
        if self.active is None and self.pending:
            spec = self.pending.popleft()
            try:
                self._start(spec)
            except APIError:
                self.pending.appendleft(spec)         # no free adapter slot yet
                return False
            changed = True
        if self.active is None:
            return changed
        spec, job = self.active
        key = (job.step, job.status)
        if key == self._reported:
            return changed
        self._reported = key
        self.metrics.job_progress(spec.job_id, step=job.step, total_steps=job.total_steps,
                                  loss=job.loss_history[-1] if job.loss_history else None,
                                  tokens_per_second=job.tokens_per_second, trained_tokens=job.tokens_trained)
        if job.status == "completed":
            with open(os.path.join(spec.checkpoint_dir, "latest")) as f:     # the final checkpoint's directory
                latest = os.path.join(spec.checkpoint_dir, f.read().strip())
            self.catalog.add_job_model(spec.model_name, latest, job.version, training=False)
            spec.on_update(_snapshot("succeeded", job, adapter_path=latest))
            self.active = None
        elif job.status == "failed":
            self.engine.cancel_finetune(job, job.error or "failed")
            self.catalog.forget(spec.model_name)
            spec.on_update(_snapshot("failed", job))
            self.active = None
        else:
            self.catalog.add_job_model(spec.model_name, None, job.version, training=True)
            spec.on_update(_snapshot("running", job))
        return True
