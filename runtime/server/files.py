"""Uploaded files (``/v1/files``): checked JSONL training data kept under ``DATA_DIR/files``.

An upload is accepted only as ``purpose=fine-tune`` JSONL whose every line is a
JSON object in one of the formats ``runtime/dataset.py`` trains on (chat
``messages``, ``prompt``+``completion``, ``text`` or ``input_ids``); the
tokenizing checks (chat template, lengths) run when a job uses the file. The
client's filename is kept as metadata only.
"""
from __future__ import annotations

import logging
import threading
from typing import IO, Optional

from flexc.runtime.dataset import FORMATS, check_line
from flexc.runtime.server.errors import APIError, not_found
from flexc.runtime.server.protocol import file_object, now
from flexc.runtime.server.store import Store, new_id

logger = logging.getLogger(__name__)

__all__ = ["FileRegistry", "PURPOSES", "check_jsonl"]

PURPOSES = ("fine-tune",)
_MAX_LINE = 1 << 22


def check_jsonl(src: IO[bytes]) -> int:
    """Check an uploaded JSONL stream line by line (UTF-8, JSON objects, a known format with the right
    structure: ``runtime/dataset.py``'s checks without a tokenizer); the number of examples. A 400 names the
    first bad line and what was expected."""
    n = 0
    for lineno, raw in enumerate(src, 1):
        if len(raw) > _MAX_LINE:
            raise APIError(400, f"line {lineno}: longer than {_MAX_LINE} bytes", param="file", code="invalid_file")
        line = raw.strip()
        if not line:
            continue
        try:
            text = line.decode("utf-8-sig")      # NOTE: a BOM before the first line is dropped
        except UnicodeDecodeError as e:
            raise APIError(400, f"line {lineno}: not UTF-8 text (byte {e.start})", param="file",
                           code="invalid_file") from None
        try:                                    # the same structural checks as a local dataset file
            check_line(text, f"line {lineno}")
        except ValueError as e:
            raise APIError(400, str(e), param="file", code="invalid_file") from None
        n += 1
    if n == 0:
        raise APIError(400, f"the file has no examples; expected one JSON object per line: {FORMATS}", param="file",
                       code="invalid_file")
    return n


class FileRegistry:
    """The uploaded files of one server (event-loop thread)."""

    def __init__(self, store: Store, max_files: int):
        self.store = store
        self.max_files = max_files
        self.files: dict[str, dict] = {m["id"]: m for m in store.load_files()}
        self._lock = threading.Lock()           # NOTE: uploads are written on a thread-pool thread

    def add(self, src: IO[bytes], filename: str, purpose: str) -> dict:
        """Check and keep an upload (``src`` readable from its start); the file object. Blocking file I/O: the
        route runs it on a thread-pool thread."""
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not supported; allowed: {list(PURPOSES)}", param="purpose")
        src.seek(0)
        lines = check_jsonl(src)
        size = src.tell()
        src.seek(0)
        name = (filename or "upload.jsonl")[:255]
        meta = {**file_object(new_id("file"), size, now(), name, purpose), "lines": lines}
        with self._lock:
            if len(self.files) >= self.max_files:
                raise APIError(400, f"{len(self.files)} files are stored, the server's limit; delete some first.",
                               code="too_many_files")
            self.store.add_file(src, meta)
            self.files[meta["id"]] = meta
        logger.info("file %s stored (%d bytes, %d examples)", meta["id"], size, lines)
        return self.public(meta)

    @staticmethod
    def public(meta: dict) -> dict:
        return {k: v for k, v in meta.items() if k != "lines"}

    def get(self, file_id: str, param: Optional[str] = None) -> dict:
        meta = self.files.get(file_id)
        if meta is None:
            raise not_found("file", file_id, param=param)
        return meta

    def list(self, purpose: Optional[str] = None) -> list[dict]:
        out = [self.public(m) for m in list(self.files.values()) if purpose is None or m["purpose"] == purpose]
        return sorted(out, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete(self, file_id: str, in_use: bool) -> dict:
        self.get(file_id)
        if in_use:
            raise APIError(400, f"File {file_id} is the training data of a job that has not ended (a restart "
                           "re-reads it); cancel the job or wait for it.", code="file_in_use")
        with self._lock:
            self.store.delete_file(file_id)
            del self.files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def path(self, file_id: str) -> str:
        """Where the server keeps the file's bytes (an id it generated: never a client string)."""
        self.get(file_id)
        return self.store.content_path(file_id)

