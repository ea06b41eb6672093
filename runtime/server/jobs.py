"""Fine-tuning jobs, OpenAI's lifecycle on top of ``engine.finetune``.

Two halves, one per thread:

* :class:`JobManager` (the event loop's thread) owns the job objects the API
  returns: it creates a job (``validating_files``), tokenizes its training file
  on a helper thread with its own tokenizer copy, queues it (``queued``), turns
  the worker's progress reports into status changes, events and checkpoints,
  persists every change under ``DATA_DIR/jobs/<id>/`` and, after a restart,
  queues the jobs that had not ended again: the engine's job resumes from the
  newest checkpoint of its directory (bit for bit, ``runtime/finetune.py``).
* :class:`JobRunner` (the engine worker's thread) starts the queued jobs one
  at a time (the engine trains one job at a time, first come first served),
  reports each optimizer step, and publishes the job's model in the adapter
  catalog: ``ft:{base}:flexc:{suffix}:{id}`` serves the adapter being trained
  (its current version) while the job runs and the final checkpoint after.

Statuses: ``validating_files`` -> ``queued`` -> ``running`` -> ``succeeded`` |
``failed`` | ``cancelled``. Unlike OpenAI, ``fine_tuned_model`` is set as soon
as the job runs (the live adapter is usable); it is null again if the job
fails or is cancelled.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any, Callable, Optional

from flexc.runtime.server.errors import APIError, not_found
from flexc.runtime.server.protocol import now
from flexc.runtime.server.settings import SUFFIX_RE
from flexc.runtime.server.store import new_id

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine
    from flexc.runtime.server.files import FileRegistry
    from flexc.runtime.server.protocol import FineTuningJobCreate
    from flexc.runtime.server.settings import ServerSettings
    from flexc.runtime.server.store import Store
    from flexc.runtime.server.worker import EngineWorker
    from flexc.runtime.finetune import FinetuneJob
    from flexc.runtime.server.catalog import AdapterCatalog
    from flexc.runtime.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

__all__ = ["JobSpec", "JobRunner", "JobManager", "JOB_STATES", "TERMINAL"]

JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


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
            latest = os.path.join(spec.checkpoint_dir, open(os.path.join(spec.checkpoint_dir, "latest")).read()
                                  .strip())
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


class JobManager:
    """The API side of fine-tuning jobs (event-loop thread): objects, events, persistence, restarts."""

    def __init__(self, store: "Store", files: "FileRegistry", worker: "EngineWorker", settings: "ServerSettings",
                 loop: "asyncio.AbstractEventLoop"):
        self.store = store
        self.files = files
        self.worker = worker
        self.settings = settings
        self.loop = loop
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self._internal: dict[str, dict] = {}
        self._validator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flexc-validate")

    # ------------------------------------------------------------------ restart
    def restore(self) -> None:
        """Load the jobs of the data directory; queue again those that had not ended; serve the models of the
        succeeded ones."""
        for rec in self.store.load_jobs():
            job_id = rec["id"]
            self._internal[job_id] = rec.pop("_internal", {})
            self.jobs[job_id] = rec
            self.events[job_id] = self.store.events(job_id)
            if rec["status"] == "succeeded" and self._internal[job_id].get("adapter_path"):
                self.worker.call(self.worker.catalog.add_job_model, rec["fine_tuned_model"],
                                 self._internal[job_id]["adapter_path"], self._internal[job_id].get("version", 0),
                                 False)
            elif rec["status"] not in TERMINAL:
                ckpts = list(self.store.checkpoints(job_id))
                if rec["fine_tuned_model"] and ckpts:      # NOTE: serves its last checkpoint until it runs again
                    self.worker.call(self.worker.catalog.add_job_model, rec["fine_tuned_model"], ckpts[-1][1],
                                     ckpts[-1][0], False)
                self._event(job_id, "The server restarted; the job continues from its last checkpoint.")
                self._set_status(job_id, "validating_files")
                self._validator.submit(self._validate, job_id)
        self.worker.call(self.worker.refresh_models)

    # ------------------------------------------------------------------ API
    def create(self, req: "FineTuningJobCreate") -> dict:
        if self.settings.tp > 1:
            raise APIError(400, f"Fine-tuning jobs need checkpoints, which tp={self.settings.tp} does not write "
                           "yet; start the server with --tp 1 to fine-tune.", code="unsupported")
        if req.suffix is not None and not SUFFIX_RE.fullmatch(req.suffix):
            raise APIError(400, f"suffix {req.suffix!r} is not allowed: 1-64 of letters, digits and ._-",
                           param="suffix")
        base = self.settings.model_name
        init = None
        if req.model != base:
            entry = next((m for m in self.worker.models if m["id"] == req.model), None)
            if entry is None:
                raise APIError(404, f"The model {req.model!r} does not exist.", param="model",
                               code="model_not_found")
            init = self._adapter_dir(req.model)
        for param in ("training_file", "validation_file"):
            fid = getattr(req, param)
            if fid is not None and fid not in self.files.files:
                raise APIError(400, f"invalid {param}: {fid!r} (no such file)", param=param, code="invalid_file")
        job_id = new_id("ftjob")
        hyper = req.hyper().resolved()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        name = f"ft:{base}:flexc:{req.suffix or ''}:{job_id[-8:]}"
        rec = {"id": job_id, "object": "fine_tuning.job", "created_at": now(), "finished_at": None, "model": req.model,
               "fine_tuned_model": None, "organization_id": "flexc", "status": "validating_files",
               "hyperparameters": hyper, "training_file": req.training_file, "validation_file": req.validation_file,
               "result_files": [], "trained_tokens": None, "error": None, "seed": seed, "estimated_finish": None,
               "integrations": [], "metadata": req.metadata, "user_provided_suffix": req.suffix,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}
        self.jobs[job_id] = rec
        self.events[job_id] = []
        self._internal[job_id] = {"model_name": name, "init_adapter": init}
        self._save(job_id)
        self._event(job_id, f"Validating training file: {req.training_file}")
        self._validator.submit(self._validate, job_id)
        return self.public(job_id)

    def public(self, job_id: str) -> dict:
        return dict(self.get(job_id))

    def get(self, job_id: str) -> dict:
        rec = self.jobs.get(job_id)
        if rec is None:
            raise not_found("fine-tuning job", job_id, code="job_not_found")
        return rec

    def list(self, after: Optional[str], limit: int) -> dict:
        ordered = sorted(self.jobs.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return _page([dict(r) for r in ordered], after, limit)

    def list_events(self, job_id: str, after: Optional[str], limit: int) -> dict:
        self.get(job_id)
        return _page(list(reversed(self.events[job_id])), after, limit)

    def checkpoints(self, job_id: str, after: Optional[str], limit: int) -> dict:
        rec = self.get(job_id)
        losses = {e["data"]["step"]: e["data"]["train_loss"] for e in self.events[job_id]
                  if e.get("type") == "metrics"}
        name = rec["fine_tuned_model"] or self._internal[job_id]["model_name"]
        out = [{"id": f"ftckpt-{job_id[6:]}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(os.path.getmtime(path)), "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                "fine_tuning_job_id": job_id, "step_number": step,
                "metrics": {"step": step, "train_loss": losses.get(step)}}
               for step, path in self.store.checkpoints(job_id)]
        return _page(list(reversed(out)), after, limit)

    def cancel(self, job_id: str) -> "concurrent.futures.Future | None":
        rec = self.get(job_id)
        if rec["status"] in TERMINAL:
            raise APIError(400, f"Job {job_id} has already {rec['status']}; only a job that has not ended can be "
                           "cancelled.", code="job_ended")
        self._internal[job_id]["cancel"] = True
        return self.worker.call(self.worker.jobs.cancel, job_id)

    def mark_cancelled(self, job_id: str) -> None:
        """A job cancelled before the engine had it (still validating)."""
        self._apply(job_id, {"state": "cancelled"})

    def file_in_use(self, file_id: str) -> bool:
        return any(r["status"] not in TERMINAL and file_id in (r["training_file"], r["validation_file"])
                   for r in self.jobs.values())

    # ------------------------------------------------------------------ validation (helper thread)
    def _validate(self, job_id: str) -> None:
        from flexc.runtime.dataset import load_jsonl
        rec = self.jobs[job_id]
        try:
            data = []
            for param in ("training_file", "validation_file"):
                fid = rec[param]
                if fid is None:
                    continue
                path = self.files.path(fid)
                try:
                    seqs = load_jsonl(path, self.worker.validation_tokenizer, self.worker.max_model_len)
                except ValueError as e:
                    raise APIError(400, str(e).replace(path, fid), param=param, code="invalid_file") from None
                if len(seqs) > self.settings.finetune_max_sequences:
                    raise APIError(400, f"{fid} has {len(seqs)} examples; the limit is "
                                   f"{self.settings.finetune_max_sequences}", param=param, code="invalid_file")
                data.append(seqs)
        except APIError as e:
            self.loop.call_soon_threadsafe(self._apply, job_id, {"state": "failed", "error": e.message,
                                                                 "error_code": e.code, "error_param": e.param})
            return
        self.loop.call_soon_threadsafe(self._enqueue, job_id, data[0])

    def _enqueue(self, job_id: str, sequences: list) -> None:
        rec, internal = self.jobs[job_id], self._internal[job_id]
        if internal.get("cancel"):
            self._apply(job_id, {"state": "cancelled"})
            return
        self._event(job_id, "Files validated, moving job to queued state")
        self._set_status(job_id, "queued")
        hyper = rec["hyperparameters"]
        spec = JobSpec(job_id=job_id, model_name=internal["model_name"], sequences=sequences,
                       init_adapter=internal["init_adapter"], epochs=hyper["n_epochs"], batch_size=hyper["batch_size"],
                       lr=self.settings.finetune_lr * hyper["learning_rate_multiplier"], seed=rec["seed"],
                       checkpoint_dir=self.store.checkpoint_dir(job_id),
                       checkpoint_every=self.settings.finetune_checkpoint_every,
                       on_update=lambda snap: self.loop.call_soon_threadsafe(self._apply, job_id, snap))
        fut = self.worker.call(self.worker.jobs.enqueue, spec)
        fut.add_done_callback(lambda f: f.exception() and self.loop.call_soon_threadsafe(
            self._apply, job_id, {"state": "failed", "error": str(f.exception())}))

    # ------------------------------------------------------------------ progress (loop thread)
    def _apply(self, job_id: str, snap: dict) -> None:
        """A report from the validator or the engine worker: status, events, the fine-tuned model, on disk."""
        rec, internal = self.jobs[job_id], self._internal[job_id]
        if rec["status"] in TERMINAL:
            return                                   # e.g. the progress report that raced a cancel
        state = snap["state"]
        step = snap.get("step", 0)
        if step > internal.get("step", 0):
            self._event(job_id, f"Step {step}/{snap['total_steps']}: training loss={snap['loss']:.4f}"
                        if snap["loss"] is not None else f"Step {step}/{snap['total_steps']}",
                        data={"step": step, "train_loss": snap["loss"], "total_steps": snap["total_steps"],
                              "trained_tokens": snap["trained_tokens"], "version": snap["version"]})
            every = self.settings.finetune_checkpoint_every
            if step % every == 0 or state == "succeeded":
                self._event(job_id, f"Checkpoint created at step {step}")
        if "step" in snap:
            internal.update(step=max(step, internal.get("step", 0)), version=snap["version"])
            rec["trained_tokens"] = snap["trained_tokens"]
        if state == "running" and rec["status"] != "running":
            rec["fine_tuned_model"] = internal["model_name"]
            resumed = snap.get("resumed_from")
            self._event(job_id, f"Fine-tuning job resumed from the checkpoint at step {resumed}" if resumed
                        else "Fine-tuning job started")
            rec["status"] = "running"
        elif state == "succeeded":
            internal["adapter_path"] = snap["adapter_path"]
            rec["fine_tuned_model"] = internal["model_name"]
            self._event(job_id, f"New fine-tuned model created: {internal['model_name']}")
            self._event(job_id, "The job has successfully completed")
        elif state == "failed":
            rec["error"] = {"code": snap.get("error_code") or "training_failed", "message": snap.get("error") or "",
                            "param": snap.get("error_param")}
            self._event(job_id, f"Fine-tuning job failed: {rec['error']['message']}", level="error")
        elif state == "cancelled":
            self._event(job_id, "Fine-tuning job cancelled")
        if state in TERMINAL:
            rec["status"] = state
            rec["finished_at"] = now()
            if state != "succeeded":
                rec["fine_tuned_model"] = None
        self._save(job_id)

    def _set_status(self, job_id: str, status: str) -> None:
        self.jobs[job_id]["status"] = status
        self._save(job_id)

    def _event(self, job_id: str, message: str, level: str = "info", data: Optional[dict] = None) -> None:
        ev = {"id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": now(), "level": level,
              "message": message, "type": "metrics" if data else "message", "data": data or {}}
        self.events[job_id].append(ev)
        self.store.append_event(job_id, ev)

    def _save(self, job_id: str) -> None:
        self.store.save_job({**self.jobs[job_id], "_internal": self._internal[job_id]})

    def _adapter_dir(self, model: str) -> str:
        entry = next(m for m in self.worker.models if m["id"] == model)
        if entry["root"] == model or not os.path.isdir(entry["root"]):
            raise APIError(400, f"{model!r} has no saved weights yet (its job is still running); fine-tune it "
                           "once its job has succeeded.", param="model")
        return entry["root"]

    def close(self) -> None:
        self._validator.shutdown(wait=False, cancel_futures=True)


def _page(items: list[dict], after: Optional[str], limit: int) -> dict:
    """OpenAI's cursor pagination: the ``limit`` items after the one whose id is ``after``."""
    start = 0
    if after is not None:
        idx = next((i for i, x in enumerate(items) if x["id"] == after), None)
        if idx is None:
            raise APIError(400, f"after={after!r} is not an id of this list", param="after")
        start = idx + 1
    return {"object": "list", "data": items[start:start + limit], "has_more": start + limit < len(items)}
