"""The server's safety rules in one place: the API key, body size limits, allowed adapter paths.

:class:`GuardMiddleware` runs before routing (pure ASGI, so it also bounds what
multipart parsing reads): every route but ``/health`` needs the key when one is
set (compared in constant time on SHA-256 digests, so neither the key's length
nor its prefix leaks through timing), and a body larger than its route's limit
is refused with 413: at once when ``Content-Length`` says so, else as soon as
the streamed bytes pass it. :func:`resolve_lora_path` is the only way a
client's string reaches the filesystem: resolved with ``realpath`` and accepted
only inside a directory the operator allowed.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Awaitable, Callable, Optional

from fastapi import HTTPException

from flexc.runtime.server.errors import APIError, error_response

__all__ = ["GuardMiddleware", "resolve_lora_path", "PUBLIC_PATHS", "UPLOAD_PATHS"]

PUBLIC_PATHS = frozenset({"/health"})
"""Routes served without the API key (load balancers probe them)."""
UPLOAD_PATHS = frozenset({"/v1/files"})
"""Routes whose body limit is the upload limit."""

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its limit (FastAPI re-raises HTTPExceptions that come
    out of body reading, so the error handler turns it into the 413 body)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_message(limit))


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class GuardMiddleware:
    """API key and body-size checks in front of the app."""

    def __init__(self, app: Any, *, api_key: Optional[str], max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self._key = _digest(api_key) if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None or scope["path"] in PUBLIC_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        ok = hmac.compare_digest(_digest(token.strip()), self._key)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            has = b"authorization" in dict(scope.get("headers") or [])
            msg = ("Incorrect API key provided." if has else
                   "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
            await error_response(401, msg, code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        limit = self.max_upload_bytes if scope["path"] in UPLOAD_PATHS else self.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return msg

        await self.app(scope, counted_receive, send)


def _too_large_message(limit: int) -> str:
    return f"Request body too large: the limit for this route is {limit} bytes."


def _too_large(limit: int) -> Any:
    return error_response(413, _too_large_message(limit), code="request_too_large")


def resolve_lora_path(path: str, allowed_real_dirs: tuple[str, ...]) -> str:
    """``path`` resolved (symlinks followed) if it lies inside one of ``allowed_real_dirs``; else 403."""
    if not allowed_real_dirs:
        raise APIError(403, "Loading adapters from a path is disabled on this server; the operator allows it "
                       "with --allowed-lora-dir DIR.", param="lora_path", code="lora_path_not_allowed")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise APIError(400, "lora_path must be a non-empty path string.", param="lora_path")
    real = os.path.realpath(path)
    for d in allowed_real_dirs:
        if os.path.commonpath([real, d]) == d and real != d:
            return real
    raise APIError(403, f"lora_path {path!r} is outside the directories this server may read adapters from.",
                   param="lora_path", code="lora_path_not_allowed")
