"""Captured regions kept on disk, so that compiling what was compiled before skips the capture.

Capturing one decoder layer (Dynamo, then the joint forward+backward trace on FakeTensors with a symbolic
token count) takes 5-8 s on a 2-core CPU whatever the layer's size; loading it back takes well under a
second. A region is stored under ``$FLEXC_CACHE_DIR/captures/`` (default ``~/.cache/flexc``, as the
converted embedded model) by a key that holds everything its capture depends on:

* the region (name, kind), the model config, the LoRA spec, the dtype, whether it trains, and the example
  inputs (shapes, dtypes, which dims are symbolic; the token count is the same for every ``seq_len``, so one
  entry serves them all);
* the versions of torch, transformers and peft, and a digest of flexc's own capture code (the ``flexc``,
  ``flexc.ir`` and ``flexc.kernels`` sources): an edited op or region captures again.

Beside a model's regions a small JSON entry keeps its facts (which layers share a template, parameter counts):
with it and every region in the cache, a compile builds no model at all.

Entries are written whole (a private file renamed into place), so concurrent compiles (test workers, tensor-
parallel ranks) never read half an entry; an unreadable entry is captured again and overwritten. The files are
pickles: the cache directory must be the user's own. ``flexc.compile(..., cache=False)``, ``flexc compile
--no-cache`` or ``FLEXC_CAPTURE_CACHE=0`` capture afresh and leave the cache alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from flexc.gguf_cache import cache_root
from flexc.ir.artifact import write_whole
from flexc.ir.capture import dump_captured, load_captured
from flexc.ir.vocab import CapturedRegion

logger = logging.getLogger(__name__)

__all__ = ["CaptureCache", "capture_key"]

_CODE_PACKAGES = ("flexc", "flexc.ir", "flexc.kernels")
"""Packages whose sources a capture depends on (their top-level ``.py`` files)."""


def _code_digest() -> str:
    import importlib
    h = hashlib.sha256()
    for name in _CODE_PACKAGES:
        pkg_dir = os.path.dirname(importlib.import_module(name).__file__)
        for fname in sorted(os.listdir(pkg_dir)):
            if fname.endswith(".py"):
                with open(os.path.join(pkg_dir, fname), "rb") as f:
                    h.update(fname.encode() + b"\0" + f.read())
    return h.hexdigest()


def capture_key(parts: dict[str, Any]) -> str:
    """A hex key for a capture described by ``parts`` (JSON-able values) under this code and these libraries."""
    from importlib.metadata import version     # NOTE: not the packages themselves: importing peft takes 1.6 s
    full = {**parts, **{lib: version(lib) for lib in ("torch", "transformers", "peft")}, "code": _code_digest()}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _json_object(data: bytes) -> dict:
    facts = json.loads(data)
    if not isinstance(facts, dict):
        raise ValueError(f"expected a JSON object, got {type(facts).__name__}")
    return facts


@dataclass
class CaptureCache:
    """Where captured regions are kept; ``directory=None`` keeps nothing."""

    directory: Optional[str]

    @classmethod
    def default(cls, enabled: bool = True) -> "CaptureCache":
        """``$FLEXC_CACHE_DIR/captures`` unless disabled here or by ``FLEXC_CAPTURE_CACHE=0``."""
        if not enabled or os.environ.get("FLEXC_CAPTURE_CACHE", "1") == "0":
            return cls(None)
        return cls(os.path.join(cache_root(), "captures"))

    def _path(self, key: str, suffix: str = ".pkl") -> str:
        return os.path.join(self.directory, f"{key}{suffix}")

    def load(self, key: str) -> Optional[CapturedRegion]:
        """The region stored under ``key``, or None (nothing stored, or an entry that does not load)."""
        return self._read(key, ".pkl", load_captured)

    def load_facts(self, key: str) -> Optional[dict]:
        """The JSON facts stored under ``key`` (what capture learned of a model besides its graphs), or None."""
        return self._read(key, ".json", _json_object)

    def _read(self, key: str, suffix: str, parse: Callable[[bytes], Any]) -> Any:
        if self.directory is None or not os.path.isfile(self._path(key, suffix)):
            return None
        try:
            with open(self._path(key, suffix), "rb") as f:
                return parse(f.read())
        except Exception as e:     # NOTE: a damaged or foreign entry costs a capture, never a compile
            logger.warning("capture cache: ignoring %s (%s: %s)", self._path(key, suffix), type(e).__name__, e)
            return None

    def store_facts(self, key: str, facts: dict) -> None:
        """Keep JSON-able ``facts`` under ``key``."""
        self._write(key, ".json", lambda: json.dumps(facts).encode())

    def store(self, key: str, captured: CapturedRegion) -> None:
        """Keep ``captured`` under ``key`` (a cache that cannot be written is skipped with a warning)."""
        self._write(key, ".pkl", lambda: dump_captured(captured))

    def _write(self, key: str, suffix: str, data: Callable[[], bytes]) -> None:
        if self.directory is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_whole(self._path(key, suffix), data())
        except Exception as e:
            logger.warning("capture cache: cannot keep %s (%s: %s)", key, type(e).__name__, e)
