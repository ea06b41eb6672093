"""Fine-tuning jobs, OpenAI's lifecycle on top of ``engine.finetune``.

Two halves, one per thread:

* :class:`JobManager` (here; the event loop's thread) owns the job objects the
  API returns: it creates a job (``validating_files``), tokenizes its training
  file on a helper thread with its own tokenizer copy, queues it (``queued``),
  turns the worker's progress reports into status changes, events and
  checkpoints, persists every change under ``DATA_DIR/jobs/<id>/`` and, after a
  restart, queues the jobs that had not ended again: the engine's job resumes
  from the newest checkpoint of its directory (``runtime/finetune.py``).
* ``job_runner.JobRunner`` (the engine worker's thread) starts the queued jobs
  one at a time, reports each optimizer step, and publishes the job's model in
  the adapter catalog: ``ft:{base}:flexc:{suffix}:{id}`` serves the adapter
  being trained (its current version) while the job runs and the final
  checkpoint after.

Statuses: ``validating_files`` -> ``queued`` -> ``running`` -> ``succeeded`` |
``failed`` | ``cancelled``. Unlike OpenAI, ``fine_tuned_model`` is set as soon
as the job runs (the live adapter is usable); it is null again if the job
fails or is cancelled.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
from typing import TYPE_CHECKING, Optional

from flexc.runtime.server.errors import APIError, not_found
from flexc.runtime.server.job_runner import JobSpec
from flexc.runtime.server.protocol import now
from flexc.runtime.server.settings import SUFFIX_RE
from flexc.runtime.server.store import new_id

if TYPE_CHECKING:
    from flexc.runtime.server.files import FileRegistry
    from flexc.runtime.server.protocol import FineTuningJobCreate
    from flexc.runtime.server.settings import ServerSettings
    from flexc.runtime.server.store import Store
    from flexc.runtime.server.worker import EngineWorker

logger = logging.getLogger(__name__)

__all__ = ["JobManager", "JOB_STATES", "TERMINAL"]

JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


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
                    seqs = load_jsonl(path, self.worker.validation_tokenizer, self.worker.max_model_len, param)
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
