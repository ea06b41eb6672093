"""The FastAPI application: OpenAI's inference and fine-tuning routes over the engine worker.

Routes parse and validate (``protocol.py``), hand work to the one thread that
owns the engine (``worker.py``) and shape the answer; every error goes through
the one handler of ``errors.py``; the guard of ``security.py`` checks the API
key and body sizes before routing. :func:`serve` builds the engine (in the
worker thread), then runs uvicorn until SIGINT/SIGTERM.

    GET  /health                               200 {} while the engine runs (no key needed)
    GET  /metrics                              Prometheus text (metrics.py)
    GET  /v1/models, /v1/models/{id}           the base model and every adapter (parent, version)
    POST /v1/completions, /v1/chat/completions text or SSE (data: {chunk} ... data: [DONE])
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    POST /v1/files; GET /v1/files[/{id}[/content]]; DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs; GET /v1/fine_tuning/jobs[/{id}[/events|/checkpoints]]; POST .../{id}/cancel
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from flexc.runtime.server.errors import APIError, error_body, install_error_handler
from flexc.runtime.server.files import FileRegistry
from flexc.runtime.server.jobs import JobManager
from flexc.runtime.server.metrics import CONTENT_TYPE, ServerMetrics
from flexc.runtime.server.protocol import (ChatCompletionRequest, CompletionRequest, FineTuningJobCreate,
                                           LoadLoraAdapterRequest, UnloadLoraAdapterRequest, now, usage_object)
from flexc.runtime.server.security import GuardMiddleware, resolve_lora_path
from flexc.runtime.server.settings import ADAPTER_NAME_RE
from flexc.runtime.server.store import Store
from flexc.runtime.server.worker import Delta, End, EngineWorker, Failed, GenerationRequest

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine
    from flexc.runtime.server.settings import ServerSettings

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve"]

_DISCONNECT_POLL_S = 1.0


def create_app(settings: "ServerSettings", worker: EngineWorker, metrics: ServerMetrics,
               on_ready: Optional[Callable[[], None]] = None) -> FastAPI:
    """The application over a started worker (its engine is ready); ``on_ready`` runs when it starts serving."""
    store = Store(settings.data_dir)
    files = FileRegistry(store, settings.max_files)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        jobs = JobManager(store, files, worker, settings, asyncio.get_running_loop())
        jobs.restore()
        state["jobs"] = jobs
        if on_ready is not None:
            on_ready()
        yield
        jobs.close()
        # NOTE: here, not after uvicorn returns: it re-raises SIGTERM/SIGINT once it has shut down, and a
        # tensor-parallel group must get its STOP before this process goes
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="flexc", summary="OpenAI-compatible inference and fine-tuning on one engine",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handler(app)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)

    def jobs() -> JobManager:
        return state["jobs"]

    _inference_routes(app, worker, metrics)
    _adapter_routes(app, worker, settings)
    _file_routes(app, files, jobs)
    _job_routes(app, jobs)
    return app


def _inference_routes(app: FastAPI, worker: EngineWorker, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if worker.broken is not None:
            return JSONResponse(error_body(503, worker.broken, code="engine_unavailable"), status_code=503)
        return JSONResponse({})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": list(worker.models)}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        for m in worker.models:
            if m["id"] == model_id:
                return m
        raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(worker, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _generate(worker, request, body, chat=True)



def _adapter_routes(app: FastAPI, worker: EngineWorker, settings: "ServerSettings") -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        if not ADAPTER_NAME_RE.fullmatch(body.lora_name):
            raise APIError(400, f"lora_name {body.lora_name!r} is not allowed: 1-64 of letters, digits and ._-, "
                           "starting with a letter or digit", param="lora_name")
        path = resolve_lora_path(body.lora_path, settings.allowed_dirs_real)
        # NOTE: the /v1/models snapshot is rebuilt in the same worker call, before the reply: a client listing the
        # models right after this call sees the new version
        await asyncio.wrap_future(worker.call(_then_refresh(worker, worker.catalog.load), body.lora_name, path,
                                              inplace=body.load_inplace))
        verb = "replaced" if body.load_inplace else "added"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb} successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        if settings.tp > 1:
            raise APIError(400, f"Unloading adapters is not supported at tp={settings.tp} yet.", code="unsupported")
        await asyncio.wrap_future(worker.call(_then_refresh(worker, worker.catalog.unload), body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")



def _then_refresh(worker: EngineWorker, change: Callable[..., Any]) -> Callable[..., Any]:
    """``change`` followed, in the same worker call, by a rebuild of the ``GET /v1/models`` snapshot."""
    def run(*args: Any, **kwargs: Any) -> Any:
        result = change(*args, **kwargs)
        worker.refresh_models()
        return result
    return run


def _file_routes(app: FastAPI, files: FileRegistry, jobs: Callable[[], JobManager]) -> None:
    @app.post("/v1/files")
    async def upload_file(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        return await run_in_threadpool(files.add, file.file, file.filename or "", purpose)

    @app.get("/v1/files")
    async def list_files(purpose: Optional[str] = None) -> dict:
        return {"object": "list", "data": files.list(purpose), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict:
        return files.public(files.get(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        return FileResponse(files.path(file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict:
        return files.delete(file_id, in_use=jobs().file_in_use(file_id))



def _job_routes(app: FastAPI, jobs: Callable[[], JobManager]) -> None:
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(body: FineTuningJobCreate) -> dict:
        return jobs().create(body)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)) -> dict:
        return jobs().list(after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return jobs().public(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> dict:
        fut = jobs().cancel(job_id)
        if not await asyncio.wrap_future(fut):       # still validating: it ends cancelled right here
            jobs().mark_cancelled(job_id)
        return jobs().public(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: Optional[str] = None,
                         limit: int = Query(20, ge=1, le=1000)) -> dict:
        return jobs().list_events(job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: Optional[str] = None,
                              limit: int = Query(10, ge=1, le=100)) -> dict:
        return jobs().checkpoints(job_id, after, limit)


# ---------------------------------------------------------------------------------------------- generation
async def _generate(worker: EngineWorker, request: Request, body: Union[CompletionRequest, ChatCompletionRequest],
                    chat: bool) -> Response:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    req = GenerationRequest(request_id=rid, model=body.model, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos,
                            max_tokens=body.output_limit if chat else body.max_tokens,
                            messages=body.template_messages() if chat else None,
                            prompt=None if chat else body.prompt)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    admitted = await asyncio.wrap_future(worker.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait,
                                                                                                   ev)))
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": body.model, "system_fingerprint": f"v{admitted.version}" if admitted.version is not None
            else None}
    if body.stream:
        return StreamingResponse(_sse(worker, rid, head, events, chat, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts: list[str] = []
    end: Optional[End] = None
    try:
        while end is None:
            try:
                ev = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    worker.abort(rid)
                    return Response(status_code=499)
                continue
            if isinstance(ev, Failed):
                raise APIError(500, ev.message, code="engine_error")
            parts.append(ev.text)
            end = ev if isinstance(ev, End) else None
    except asyncio.CancelledError:
        worker.abort(rid)
        raise
    text = "".join(parts)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": end.finish_reason,
               "logprobs": None} if chat else
              {"index": 0, "text": text, "finish_reason": end.finish_reason, "logprobs": None})
    return JSONResponse({**head, "choices": [choice], "usage": usage_object(end.prompt_tokens,
                                                                              end.completion_tokens)})


def _chunk(head: dict, chat: bool, text: Optional[str], finish: Optional[str], usage: bool,
           role: bool = False) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    obj = {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
    if usage:
        obj["usage"] = None
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(worker: EngineWorker, rid: str, head: dict, events: asyncio.Queue, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """The SSE lines of one streamed request; if the client goes away (the generator is cancelled or closed
    before the end), the request is aborted and its KV blocks freed."""
    done = False
    try:
        if chat:
            yield _chunk(head, chat, None, None, include_usage, role=True)
        while True:
            ev = await events.get()
            if isinstance(ev, Failed):
                done = True
                yield f"data: {json.dumps(error_body(500, ev.message, code='engine_error'))}\n\n"
                break
            if isinstance(ev, Delta):
                yield _chunk(head, chat, ev.text, None, include_usage)
                continue
            done = True
            if ev.text:
                yield _chunk(head, chat, ev.text, None, include_usage)
            yield _chunk(head, chat, None if chat else "", ev.finish_reason, include_usage)
            if include_usage:
                obj = {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                       "usage": usage_object(ev.prompt_tokens, ev.completion_tokens)}
                yield f"data: {json.dumps(obj)}\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            worker.abort(rid)


# ---------------------------------------------------------------------------------------------- serving
def serve(settings: "ServerSettings", launch: Callable[[Callable[["Engine"], None]], Any], *, tpot_slo: float,
          ttft_slo: float, log_level: str = "warning", on_ready: Optional[Callable[[], None]] = None) -> None:
    """Build the engine (``launch(drive)`` in the worker thread), serve HTTP until SIGINT/SIGTERM, stop the
    engine. ``on_ready`` runs when the application has started."""
    import uvicorn
    metrics = ServerMetrics(settings.model_name, tpot_slo, ttft_slo)
    worker = EngineWorker(launch, settings, metrics)
    t0 = time.perf_counter()
    worker.start()
    logger.info("engine ready in %.1f s", time.perf_counter() - t0)
    app = create_app(settings, worker, metrics, on_ready)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        worker.stop()                      # (a no-op when the application's shutdown already stopped it)
