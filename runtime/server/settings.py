"""What the operator decides about one server: address, key, limits, adapters, data directory.

One frozen dataclass, filled by ``flexc serve``'s flags (``flexc/serve.py``) or
by a test; every limit a client could push against has a default here, so a
server started with no flags is safe to leave running on a laptop: it listens
on 127.0.0.1 only, bodies, uploads and prompts are bounded, and no adapter is
read from a path the operator did not allow.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

__all__ = ["ServerSettings", "MODEL_NAME_RE", "ADAPTER_NAME_RE", "SUFFIX_RE"]

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
"""What a ``model`` field may look like (base model, adapter or ``ft:...`` name)."""
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Names a client or the operator may give an adapter (``lora_name``, ``--lora-modules name=``); ``ft:`` names
are the server's own."""
SUFFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A fine-tuning job's ``suffix`` (it becomes part of the ``ft:`` model name, so no ``:``)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class ServerSettings:
    """Everything ``flexc serve`` decides once at start-up."""

    model_name: str
    """The id the base model is served under: what ``model`` must say to get it (``GET /v1/models`` lists it)."""
    data_dir: str
    """Directory of the durable state: uploaded files, fine-tuning jobs, their checkpoints and events."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless the operator says otherwise."""
    port: int = 8000
    api_key: Optional[str] = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    lora_modules: tuple[tuple[str, str], ...] = ()
    """``(name, PEFT directory)`` adapters served from the start (the operator's paths: always allowed)."""
    allowed_lora_dirs: tuple[str, ...] = ()
    """Directories under which ``POST /v1/load_lora_adapter`` may read a ``lora_path`` (checked after
    ``realpath``); empty: runtime loading from paths is refused."""
    max_body_bytes: int = 1 << 20
    """Largest JSON request body (413 above it)."""
    max_upload_bytes: int = 64 << 20
    """Largest ``POST /v1/files`` body."""
    max_prompt_tokens: Optional[int] = None
    """Longest prompt in tokens (default: the model's context minus one)."""
    max_pending_requests: int = 1024
    """Generation requests admitted and unfinished at once; above it a request gets 429."""
    max_files: int = 1000
    """Uploaded files kept at once."""
    finetune_lr: float = 1e-4
    """AdamW learning rate of a job with ``learning_rate_multiplier`` 1 (``auto``)."""
    finetune_checkpoint_every: int = 10
    """Steps between a running job's checkpoints (what a restart resumes from; the last step always writes one)."""
    finetune_max_sequences: int = 100_000
    """Longest training file, in examples."""
    tp: int = 1
    """Tensor-parallel degree of the engine (fine-tuning jobs and unloading adapters need tp=1 for now)."""

    def __post_init__(self) -> None:
        if not MODEL_NAME_RE.fullmatch(self.model_name or ""):
            raise ValueError(f"served model name {self.model_name!r} is not allowed; use letters, digits and "
                             "._:/@+- (at most 256 characters)")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string when given")
        for name, path in self.lora_modules:
            if not ADAPTER_NAME_RE.fullmatch(name):
                raise ValueError(f"--lora-modules name {name!r} is not allowed; use letters, digits and ._- "
                                 "(at most 64 characters, starting with a letter or digit)")
            if not os.path.isdir(path):
                raise ValueError(f"--lora-modules {name}={path}: not a directory")
        for d in self.allowed_lora_dirs:
            if not os.path.isdir(d):
                raise ValueError(f"--allowed-lora-dir {d}: not a directory")
        for name in ("max_body_bytes", "max_upload_bytes", "max_pending_requests", "max_files",
                     "finetune_checkpoint_every", "finetune_max_sequences", "tp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be a positive integer, got {self.max_prompt_tokens!r}")
        if not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise ValueError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")

    @property
    def allowed_dirs_real(self) -> tuple[str, ...]:
        """The allowed directories, resolved (symlinks followed)."""
        return tuple(os.path.realpath(d) for d in self.allowed_lora_dirs)
