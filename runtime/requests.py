"""What the engine keeps per inference request: prompt checks, stop conditions, token times, the result.

:class:`RequestTracker` turns a prompt (text, chat message or token ids) into
a scheduler :class:`~flexc.runtime.scheduler.Request`, records when each of
its tokens came out, cuts the text at a stop string, and builds the
:class:`GenerationResult` a caller reads (as often as it likes, until it
releases the request).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Sequence, Union

import torch

from flexc.runtime.batch import SamplingParams
from flexc.runtime.scheduler import Request

__all__ = ["GenerationResult", "TokenEvent", "TrackedRequest", "RequestTracker", "Prompt", "Stop"]

Prompt = Union[str, Sequence[int]]
Stop = Union[None, str, int, Sequence[Union[str, int]]]


@dataclasses.dataclass(kw_only=True)
class GenerationResult:
    """One finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens (EOS / the stop token included when it ended the request)."""
    text: str
    """Decoded generated text (cut before a stop string); '' without a tokenizer."""
    finish_reason: str
    """``stop`` (EOS, stop token or string), ``length`` (max_new_tokens or context), ``abort`` or ``error``."""
    ttft: float
    """Time to first token in seconds, from submission (queueing included)."""
    tpot: float
    """Time per output token after the first, in seconds (0 for a single token)."""
    adapter: Optional[str] = None
    num_preemptions: int = 0
    error: Optional[str] = None
    """Why the request failed while running (then token_ids may be short or empty)."""


@dataclasses.dataclass(kw_only=True)
class TokenEvent:
    """A token produced for a request by one step."""

    request_id: str
    token_id: int
    finished: bool
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class TrackedRequest:
    """A submitted request and what the engine observed of it."""

    req: Request
    submitted: float
    stop_strings: tuple[str, ...]
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    text_cut: Optional[int] = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submitted if self.token_times else 0.0

    @property
    def tpot(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0


class RequestTracker:
    """Builds requests from prompts and keeps their records until released."""

    def __init__(self, *, tokenizer: Any, vocab_size: int, max_model_len: int, eos_token_ids: frozenset,
                 clock: Callable[[], float]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.clock = clock
        self._records: dict[str, TrackedRequest] = {}
        self._ids = itertools.count()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def get(self, request_id: str) -> TrackedRequest:
        t = self._records.get(request_id)
        if t is None:
            raise ValueError(f"unknown request id {request_id!r} (never submitted, or released)")
        return t

    def new_request(self, prompt: Prompt, *, max_new_tokens: int, adapter: Optional[str], sampling: SamplingParams,
                    stop: Stop, chat: bool, ignore_eos: bool,
                    request_id: Optional[str]) -> tuple[Request, tuple[str, ...]]:
        """Check everything about one request and build it with its stop strings (not yet tracked: :meth:`track`
        once queued). Raises ``ValueError`` naming what is wrong."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._records:
            raise ValueError(f"request id {rid!r} is already in use; release it first or pick another")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"request {rid}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids = self._tokenize(prompt, chat, rid)
        if not ids:
            raise ValueError(f"request {rid}: the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {rid}: the prompt has {len(ids)} tokens; the model's context is "
                             f"{self.max_model_len}, so prompts may have at most {self.max_model_len - 1}")
        stops = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        bad = [s for s in stops if not isinstance(s, (str, int)) or s == ""]
        if bad:
            raise ValueError(f"request {rid}: stop entries must be non-empty strings or token ids, got {bad[0]!r}")
        stop_ids = frozenset(s for s in stops if isinstance(s, int)) | (frozenset() if ignore_eos
                                                                          else self.eos_token_ids)
        req = Request(req_id=rid, prompt_token_ids=ids, max_new_tokens=max_new_tokens, adapter_id=adapter,
                      sampling=sampling, stop_token_ids=stop_ids)
        return req, tuple(s for s in stops if isinstance(s, str))

    def track(self, req: Request, stop_strings: tuple[str, ...]) -> None:
        self._records[req.req_id] = TrackedRequest(req=req, submitted=self.clock(), stop_strings=stop_strings)

    def _tokenize(self, prompt: Prompt, chat: bool, rid: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {rid}: a text prompt needs a tokenizer and this model has none; "
                                 "pass token ids")
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = self.tokenizer.encode(prompt) if prompt else []
            return [int(t) for t in ids]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"request {rid}: prompt must be a string or a list of token ids, "
                             f"got {type(prompt).__name__}")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {rid}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return list(prompt)

    def hit_stop_string(self, t: TrackedRequest) -> bool:
        """Whether the text so far contains a stop string (and where the text is then cut)."""
        if self.tokenizer is None or not t.stop_strings:
            return False
        text = self.tokenizer.decode(t.req.output_token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in t.stop_strings if s in text]
        if cuts:
            t.text_cut = min(cuts)
            return True
        return False

    def result(self, request_id: str) -> GenerationResult:
        t = self.get(request_id)
        if t.finish_reason is None:
            raise ValueError(f"request {request_id} has not finished")
        toks = list(t.req.output_token_ids)
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if t.text_cut is not None:
                text = text[:t.text_cut]
        return GenerationResult(request_id=request_id, prompt_token_ids=list(t.req.prompt_token_ids),
                                token_ids=toks, text=text, finish_reason=t.finish_reason, ttft=t.ttft, tpot=t.tpot,
                                adapter=t.req.adapter_id, num_preemptions=t.req.num_preemptions)

    def release(self, request_id: str) -> None:
        """Forget a request's record (a no-op for an unknown id)."""
        self._records.pop(request_id, None)

    def unfinished(self, request_ids: Sequence[str]) -> bool:
        return any(self._records[r].finish_reason is None for r in request_ids)
