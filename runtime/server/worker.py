"""The one thread that owns the engine: requests come in through a queue, tokens go out as events.

FastAPI's routes run on the asyncio loop; the engine is not thread-safe and a
step takes tens to hundreds of milliseconds, so it lives in ONE thread,
:class:`EngineWorker`, and nothing else touches it (nor its tokenizer). The
loop thread hands work over with :meth:`EngineWorker.call` (a callable put on
a ``queue.SimpleQueue``; its result or exception comes back as a
``concurrent.futures.Future`` the route awaits). The worker thread runs::

    while running:
        run the queued calls (block when the engine has nothing to do)
        engine.step()                 # inference and finetuning tokens in one iteration
        hand each new token to its request's sink; advance the fine-tuning jobs

A request's *sink* is a callable the route made (it forwards the event onto the
loop with ``call_soon_threadsafe``); events are :class:`Delta` (new text),
:class:`End` (finish reason, the rest of the text, usage) and :class:`Failed`.
Text is decoded here, holding back what could still become a stop string or an
incomplete UTF-8 character, so a stream never shows text the final answer cuts.
A client that goes away calls :meth:`abort`: the engine drops the request and
its KV blocks before the next iteration.

The engine is built inside this thread by ``launch(drive)``: ``drive(engine)``
is the worker loop (``launch = lambda drive: drive(build())``, or
``run_tp(drive, build, tp)`` for a tensor-parallel group whose rank 0 is here).
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from flexc.runtime.server.catalog import AdapterCatalog
from flexc.runtime.server.errors import APIError
from flexc.runtime.server.job_runner import JobRunner
from flexc.runtime.server.protocol import now

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine, TokenEvent
    from flexc.runtime.server.metrics import ServerMetrics
    from flexc.runtime.server.settings import ServerSettings

logger = logging.getLogger(__name__)

__all__ = ["EngineWorker", "GenerationRequest", "Admitted", "Delta", "End", "Failed"]

_RECORDER_RESET = 4096
"""Iterations after which the engine's own per-iteration history is dropped (a server runs for days)."""


@dataclasses.dataclass(kw_only=True)
class GenerationRequest:
    """One completion or chat completion, as validated by the route."""

    request_id: str
    model: str
    prompt: Union[str, list[int], None] = None
    """Completions: text or token ids."""
    messages: Optional[list[dict]] = None
    """Chat: ``[{"role", "content"}]``, rendered with the model's chat template."""
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    ignore_eos: bool = False
    arrival: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass(frozen=True)
class Admitted:
    """What the route learns when the engine has accepted a request."""

    prompt_tokens: int
    max_tokens: int
    version: Optional[int]
    """The adapter's version at admission (None for the base model)."""


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class End:
    text: str
    """Text not sent in a Delta yet."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


@dataclasses.dataclass
class _Live:
    sink: Callable[[Any], None]
    adapter: Optional[str]
    prompt_tokens: int
    arrival: float
    hold: int
    """Characters held back: the longest stop string minus one."""
    last: float = 0.0
    first_token: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""


class EngineWorker:
    """Owns the engine in its own thread; every other thread talks to it through :meth:`call`."""

    def __init__(self, launch: Callable[[Callable[["Engine"], None]], Any], settings: "ServerSettings",
                 metrics: "ServerMetrics"):
        self._launch = launch
        self.settings = settings
        self.metrics = metrics
        self._calls: "queue.SimpleQueue[tuple[Callable, tuple, concurrent.futures.Future]]" = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: Optional[BaseException] = None
        self.broken: Optional[str] = None
        """Why the engine loop stopped unexpectedly (the server then answers 503)."""
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._main, name="flexc-engine", daemon=True)
        self.engine: Optional["Engine"] = None
        self.catalog: Optional[AdapterCatalog] = None
        self.jobs: Optional[JobRunner] = None
        self.started = now()
        self.max_model_len = 0
        self.validation_tokenizer: Any = None
        """A copy of the tokenizer for the job validator's thread (the engine's own is this thread's)."""
        self.models: tuple = ()
        """The ``GET /v1/models`` entries, replaced whole whenever they change (read from any thread)."""

    # ------------------------------------------------------------------ life cycle (loop thread)
    def start(self, timeout: Optional[float] = None) -> None:
        """Build the engine in the worker thread and wait until it serves; re-raises a build failure."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the engine was not ready after {timeout} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Leave the loop after the current iteration (at tp > 1 the other ranks are sent STOP); idempotent."""
        self._stopping.set()
        self._calls.put((lambda: None, (), concurrent.futures.Future()))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` in the worker thread between two iterations; its result or exception."""
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.broken is not None or self._stopping.is_set():
            fut.set_exception(APIError(503, f"The engine is not running: {self.broken or 'shutting down'}",
                                       code="engine_unavailable"))
        else:
            self._calls.put((fn, args, fut))
        return fut

    # ------------------------------------------------------------------ the API the routes use
    def submit(self, req: GenerationRequest, sink: Callable[[Any], None]) -> concurrent.futures.Future:
        """Admit ``req`` (Future of :class:`Admitted`; APIError 400/404/429 if refused); events go to ``sink``."""
        return self.call(self._submit, req, sink)

    def abort(self, request_id: str) -> None:
        """The client went away: drop the request and free its KV blocks (no-op once it has finished)."""
        self.call(self._abort, request_id)

    # ------------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            self._launch(self._drive)
        except BaseException as e:                     # NOTE: a build failure is re-raised by start()
            if not self._ready.is_set():
                self._error = e
                self._ready.set()
            else:
                logger.exception("the engine loop stopped")
                self._break(f"the engine loop stopped: {type(e).__name__}: {e}")

    def _drive(self, engine: "Engine") -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.validation_tokenizer = copy.deepcopy(engine.tokenizer)
        self.catalog = AdapterCatalog(engine, self.settings.model_name)
        for name, path in self.settings.lora_modules:
            self.catalog.load(name, path, inplace=False, kind="module")
        self.jobs = JobRunner(engine, self.catalog, self.metrics)
        self.refresh_models()
        self._ready.set()
        logger.info("engine worker ready: %s, context %d", self.settings.model_name, self.max_model_len)
        self._loop()

    def _loop(self) -> None:
        engine = self.engine
        iterations = 0
        while not self._stopping.is_set():
            self._run_calls(block=not engine.has_work())
            if engine.has_work():
                try:
                    events = engine.step()
                except Exception as e:
                    logger.exception("engine step failed; the server stops serving")
                    self._break(f"engine step failed: {type(e).__name__}: {e}")
                    return
                self._dispatch(events)
                iterations += 1
                if iterations % _RECORDER_RESET == 0:
                    engine.recorder.reset()
            if self.jobs.advance():
                self.refresh_models()
            self.catalog.drop_forgotten()
            self.metrics.engine_state(engine.scheduler.num_running, engine.scheduler.num_waiting,
                                      engine.kv.pool.usage, len(engine.adapters.names()))

    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=1.0) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:             # NOTE: a bad call never stops the loop
                    fut.set_exception(e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def refresh_models(self) -> None:
        """Rebuild the ``GET /v1/models`` snapshot (worker thread)."""
        self.models = tuple(self.catalog.model_list(self.started, self.max_model_len))

    def _break(self, message: str) -> None:
        """The engine cannot go on: fail every request in flight and every queued call; /health says 503."""
        self.broken = message
        for live in self._live.values():
            live.sink(Failed(message))
        self._live.clear()
        while True:
            try:
                _fn, _args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(APIError(503, f"The engine is not running: {message}", code="engine_unavailable"))

    # ------------------------------------------------------------------ requests (worker thread)
    def _tokens(self, req: GenerationRequest) -> list[int]:
        tok = self.engine.tokenizer
        if req.messages is not None:
            if tok is None or getattr(tok, "chat_template", None) is None:
                raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages")
            try:
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:                     # the template's own checks (role order, ...)
                raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return [int(t) for t in ids]
        if isinstance(req.prompt, str):
            if tok is None:
                raise APIError(400, "This model has no tokenizer; send the prompt as token ids.", param="prompt")
            return [int(t) for t in tok.encode(req.prompt)]
        bad = [t for t in req.prompt if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size}).",
                           param="prompt")
        return list(req.prompt)

    def _submit(self, req: GenerationRequest, sink: Callable[[Any], None]) -> Admitted:
        if len(self._live) >= self.settings.max_pending_requests:
            raise APIError(429, f"{len(self._live)} requests are in flight, the server's limit; retry later.",
                           code="too_many_requests")
        adapter = self.catalog.resolve(req.model)
        ids = self._tokens(req)
        limit = min(self.settings.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)
        if len(ids) > limit:
            raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at most {limit}.",
                           param="messages" if req.messages is not None else "prompt",
                           code="context_length_exceeded")
        room = self.max_model_len - len(ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                           f"has {len(ids)} and {req.max_tokens} more were requested.", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = req.max_tokens or room
        self.engine.submit(ids, max_new_tokens=max_tokens, adapter=adapter, temperature=req.temperature,
                           top_p=req.top_p, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                           request_id=req.request_id)
        hold = max((len(s) for s in req.stop or ()), default=1) - 1
        self._live[req.request_id] = _Live(sink=sink, adapter=adapter, prompt_tokens=len(ids), arrival=req.arrival,
                                           hold=hold)
        if adapter is not None:
            self.catalog.in_flight[adapter] = self.catalog.in_flight.get(adapter, 0) + 1
        self.metrics.request_admitted(len(ids))
        version = self.catalog.known[adapter].version if adapter is not None else None
        return Admitted(prompt_tokens=len(ids), max_tokens=max_tokens, version=version)

    def _abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is None:
            return
        self.engine.release(request_id)                # aborts it and drops the engine's record
        self._finish(request_id, live, "abort")

    def _finish(self, request_id: str, live: _Live, reason: str) -> None:
        del self._live[request_id]
        if live.adapter is not None:
            self.catalog.in_flight[live.adapter] -= 1
        n = len(live.tokens)
        tpot = (live.last - live.first_token) / (n - 1) if n > 1 else 0.0
        self.metrics.request_finished(reason, live.last - live.arrival, live.first_token - live.arrival, tpot)

    def _dispatch(self, events: list["TokenEvent"]) -> None:
        now_t = time.perf_counter()
        tok = self.engine.tokenizer
        for ev in events:
            live = self._live.get(ev.request_id)
            if live is None:
                continue
            first = not live.tokens
            self.metrics.token(first, now_t - (live.arrival if first else live.last))
            if first:
                live.first_token = now_t
            live.last = now_t
            live.tokens.append(ev.token_id)
            if ev.finished:
                res = self.engine.result(ev.request_id, release=True)
                rest = res.text[len(live.sent):] if res.text.startswith(live.sent) else ""
                self._finish(ev.request_id, live, res.finish_reason)
                live.sink(End(text=rest, finish_reason=res.finish_reason, prompt_tokens=live.prompt_tokens,
                              completion_tokens=len(res.token_ids)))
                continue
            if tok is None:
                continue
            text = tok.decode(live.tokens, skip_special_tokens=True).rstrip("\ufffd")
            safe = text[:max(len(text) - live.hold, 0)]
            if len(safe) > len(live.sent) and safe.startswith(live.sent):
                live.sink(Delta(safe[len(live.sent):]))
                live.sent = safe
