"""Which adapters the server knows, which are resident in the engine, and their versions.

Runs in the engine worker's thread (it calls the engine). An adapter is
*known* under a name (from ``--lora-modules``, ``POST /v1/load_lora_adapter``
or a fine-tuning job) and *resident* when it holds one of the engine's
``max_adapters`` slots. A known adapter with a directory can leave memory and
come back: a request for it loads it, and when every slot is taken the least
recently used adapter with nothing in flight (no request, no training) gives
its slot up. The adapter a job is training lives only in its slot (no path)
until the job succeeds; then its final checkpoint is its path.

``version`` counts how often the weights served under a name changed: 1 for an
adapter loaded once, +1 per ``load_inplace``; for a job's model, the optimizer
steps taken (0 before the first). Responses carry it as ``system_fingerprint``.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import TYPE_CHECKING, Optional

from flexc.runtime.server.errors import APIError
from flexc.runtime.server.protocol import model_object, now

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine

logger = logging.getLogger(__name__)

__all__ = ["AdapterCatalog", "KnownAdapter"]


@dataclasses.dataclass(kw_only=True)
class KnownAdapter:
    """One name a request's ``model`` may use besides the base model."""

    name: str
    path: Optional[str]
    """PEFT directory it (re)loads from; None while a job trains it (it lives in its slot only)."""
    kind: str
    """``module`` (--lora-modules), ``loaded`` (POST /v1/load_lora_adapter) or ``job`` (a fine-tuned model)."""
    version: int = 1
    created: int = dataclasses.field(default_factory=now)
    training: bool = False
    """A job is training it right now (it cannot be evicted, replaced or unloaded)."""


class AdapterCatalog:
    """Known adapters over the engine's resident ones (engine-thread only)."""

    def __init__(self, engine: "Engine", base_name: str):
        self.engine = engine
        self.base_name = base_name
        self.known: dict[str, KnownAdapter] = {}
        self.in_flight: dict[str, int] = {}
        """Unfinished requests per adapter name."""
        self._used: dict[str, int] = {}
        self._clock = itertools.count()

    @property
    def lora_enabled(self) -> bool:
        return self.engine.compiled.lora is not None

    def require_lora(self) -> None:
        if not self.lora_enabled:
            raise APIError(400, "This server was started without LoRA (--max-lora-rank 0): it serves no adapters "
                           "and runs no fine-tuning jobs.", code="lora_disabled")

    # ------------------------------------------------------------------ residency
    def resident(self, name: str) -> bool:
        return name in self.engine.adapters

    def touch(self, name: str) -> None:
        self._used[name] = next(self._clock)

    def make_room(self) -> None:
        """Free one slot if all are taken, evicting the least recently used idle adapter; 503 if none is idle."""
        reg = self.engine.adapters
        if len(reg.names()) < reg.max_adapters:
            return
        idle = [n for n in reg.names() if not self.in_flight.get(n) and n in self.known
                and not self.known[n].training and self.known[n].path is not None]
        if not idle:
            raise APIError(503, f"All {reg.max_adapters} adapter slots are busy (requests in flight or training); "
                           "retry later.", code="adapter_slots_busy")
        victim = min(idle, key=lambda n: self._used.get(n, -1))
        self.engine.unload_adapter(victim)
        logger.info("adapter %s evicted to make room", victim)

    def ensure_resident(self, name: str) -> None:
        """Load a known adapter that left memory (a request for it arrived)."""
        if self.resident(name):
            return
        entry = self.known[name]
        if entry.path is None:
            raise APIError(503, f"Adapter {name!r} is not resident and has no saved weights.", code="adapter_gone")
        self.make_room()
        self.engine.load_adapter(name, entry.path)

    def resolve(self, model: str) -> Optional[str]:
        """The adapter a request's ``model`` names (None for the base model); 404 if unknown."""
        if model == self.base_name:
            return None
        if model not in self.known:
            raise APIError(404, f"The model {model!r} does not exist. GET /v1/models lists the base model "
                           f"{self.base_name!r} and the adapters.", param="model", code="model_not_found")
        self.ensure_resident(model)
        self.touch(model)
        return model

    # ------------------------------------------------------------------ changes
    def load(self, name: str, path: str, *, inplace: bool, kind: str = "loaded") -> KnownAdapter:
        """Register and load adapter ``name`` from the PEFT directory ``path`` (already checked by the caller)."""
        self.require_lora()
        if name == self.base_name:
            raise APIError(400, f"{name!r} is the base model's name.", param="lora_name")
        old = self.known.get(name)
        if old is not None and not inplace:
            raise APIError(400, f"Adapter {name!r} is already loaded; pass load_inplace=true to replace its weights.",
                           param="lora_name", code="adapter_exists")
        if old is not None and old.training:
            raise APIError(400, f"Adapter {name!r} is being trained by a fine-tuning job.", param="lora_name")
        if not self.resident(name):
            self.make_room()
        try:
            self.engine.load_adapter(name, path)        # NOTE: in place: same slot, the next iteration reads it
        except ValueError as e:
            raise APIError(400, f"Cannot load adapter {name!r}: {e}", param="lora_path", code="invalid_adapter") \
                from None
        entry = KnownAdapter(name=name, path=path, kind=kind, version=(old.version + 1) if old else 1,
                             created=old.created if old else now())
        self.known[name] = entry
        self.touch(name)
        return entry

    def unload(self, name: str) -> None:
        if name not in self.known:
            raise APIError(404, f"No adapter named {name!r} is loaded.", param="lora_name", code="adapter_not_found")
        entry = self.known[name]
        if entry.kind == "job":
            raise APIError(400, f"{name!r} is a fine-tuned model: it stays available and leaves memory by itself "
                           "when its slot is needed.", param="lora_name")
        if self.in_flight.get(name):
            raise APIError(400, f"Adapter {name!r} has {self.in_flight[name]} requests in flight; retry when they "
                           "have finished.", param="lora_name", code="adapter_busy")
        if self.resident(name):
            self.engine.unload_adapter(name)
        del self.known[name]

    def add_job_model(self, name: str, path: Optional[str], version: int, training: bool) -> None:
        """A fine-tuned model: live while its job trains (``training``, no path), from its final checkpoint after."""
        entry = self.known.get(name)
        if entry is None:
            self.known[name] = KnownAdapter(name=name, path=path, kind="job", version=version, training=training)
        else:
            entry.path, entry.version, entry.training = path, version, training

    def forget(self, name: str) -> None:
        """Drop a job's model (cancelled or failed); its slot is freed once nothing is in flight on it."""
        self.known.pop(name, None)

    def drop_forgotten(self) -> None:
        """Free the slots of resident adapters no longer known (after their last request finished)."""
        for name in list(self.engine.adapters.names()):
            if name not in self.known and not self.in_flight.get(name):
                self.engine.unload_adapter(name)

    # ------------------------------------------------------------------ listing
    def model_list(self, base_created: int, max_model_len: int) -> list[dict]:
        out = [model_object(self.base_name, base_created, max_model_len=max_model_len)]
        for e in self.known.values():
            out.append(model_object(e.name, e.created, root=e.path or e.name, parent=self.base_name,
                                    version=e.version, max_model_len=max_model_len))
        return out
