"""Durable state under ``--data-dir``: uploaded files and fine-tuning jobs, written so a crash leaves no torn record.

Layout::

    DATA_DIR/files/file-<24 hex>.json       metadata (id, bytes, filename, purpose, created_at)
    DATA_DIR/files/file-<24 hex>.jsonl      the uploaded bytes
    DATA_DIR/jobs/ftjob-<24 hex>/job.json   the job object (status, hyperparameters, ...)
    DATA_DIR/jobs/ftjob-<24 hex>/events.jsonl   one event per line, appended
    DATA_DIR/jobs/ftjob-<24 hex>/checkpoints/   step-NNNNNN/ (PEFT adapter + optimizer state), latest

Every path is built from an id the server generated and checked against its
pattern here; no client string (a filename, a suffix) ever becomes a path.
JSON records are written to a temporary file, fsynced and renamed over the old
one (atomic on POSIX); events are appended as whole lines and a torn last line
(a kill mid-write) is skipped on reading. Uploads are copied to a temporary
file and renamed once complete, so a listed file is always whole.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from typing import IO, Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = ["Store", "new_id", "FILE_ID_RE", "JOB_ID_RE", "atomic_write_json"]

FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")
JOB_ID_RE = re.compile(r"ftjob-[0-9a-f]{24}")


def new_id(prefix: str) -> str:
    """``prefix-`` + 24 random hex digits (96 bits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def atomic_write_json(path: str, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("skipping unreadable record %s: %s", path, e)
        return None
    return obj if isinstance(obj, dict) else None


class Store:
    """Files and jobs under one data directory (used from the server's event-loop thread)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.files_dir = os.path.join(self.root, "files")
        self.jobs_dir = os.path.join(self.root, "jobs")
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.jobs_dir, exist_ok=True)
        for name in os.listdir(self.files_dir):          # uploads a crash left half-written
            if name.endswith(".part"):
                os.remove(os.path.join(self.files_dir, name))

    # ------------------------------------------------------------------ files
    def _file_path(self, file_id: str, ext: str) -> str:
        if not FILE_ID_RE.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return os.path.join(self.files_dir, file_id + ext)

    def add_file(self, src: IO[bytes], meta: dict) -> dict:
        """Copy the upload ``src`` in under ``meta['id']``; the record is written last (its presence = complete)."""
        part = self._file_path(meta["id"], ".jsonl.part")
        with open(part, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self._file_path(meta["id"], ".jsonl"))
        atomic_write_json(self._file_path(meta["id"], ".json"), meta)
        return meta

    def content_path(self, file_id: str) -> str:
        return self._file_path(file_id, ".jsonl")

    def delete_file(self, file_id: str) -> None:
        os.remove(self._file_path(file_id, ".json"))       # NOTE: the record first: then it is no longer listed
        try:
            os.remove(self._file_path(file_id, ".jsonl"))
        except FileNotFoundError:
            pass

    def load_files(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.files_dir)):
            stem, ext = os.path.splitext(name)
            if ext == ".json" and FILE_ID_RE.fullmatch(stem) and os.path.isfile(self._file_path(stem, ".jsonl")):
                meta = _read_json(os.path.join(self.files_dir, name))
                if meta is not None and meta.get("id") == stem:
                    out.append(meta)
        return out

    # ------------------------------------------------------------------ jobs
    def job_dir(self, job_id: str) -> str:
        if not JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.jobs_dir, job_id)

    def checkpoint_dir(self, job_id: str) -> str:
        return os.path.join(self.job_dir(job_id), "checkpoints")

    def save_job(self, job: dict) -> None:
        d = self.job_dir(job["id"])
        os.makedirs(d, exist_ok=True)
        atomic_write_json(os.path.join(d, "job.json"), job)

    def load_jobs(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.jobs_dir)):
            if JOB_ID_RE.fullmatch(name):
                job = _read_json(os.path.join(self.jobs_dir, name, "job.json"))
                if job is not None and job.get("id") == name:
                    out.append(job)
        return out

    def append_event(self, job_id: str, event: dict) -> None:
        with open(os.path.join(self.job_dir(job_id), "events.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def events(self, job_id: str) -> list[dict]:
        path = os.path.join(self.job_dir(job_id), "events.jsonl")
        if not os.path.isfile(path):
            return []
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:       # a line torn by a kill mid-write
                    continue
        return out

    def checkpoints(self, job_id: str) -> Iterator[tuple[int, str]]:
        """(step, directory) of every complete checkpoint of the job, oldest first."""
        root = self.checkpoint_dir(job_id)
        if not os.path.isdir(root):
            return iter(())
        steps = []
        for name in os.listdir(root):
            m = re.fullmatch(r"step-(\d{6,})", name)
            if m and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
                steps.append((int(m.group(1)), os.path.join(root, name)))
        return iter(sorted(steps))
