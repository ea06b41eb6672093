"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Routes and the engine worker raise :class:`APIError` (or let a ``ValueError``
from the engine through); FastAPI's own failures (malformed JSON, a field of the
wrong type, an unknown route or method) arrive as its exceptions. ONE handler,
:func:`handle_exception`, turns all of them into the body the ``openai`` client
parses into ``BadRequestError``, ``NotFoundError``, ``AuthenticationError`` ...
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

__all__ = ["APIError", "error_response", "install_error_handler", "handle_exception", "not_found"]

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request that ends with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")


def not_found(what: str, ident: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """404 for an unknown id or name."""
    return APIError(404, f"No such {what}: {ident!r}", param=param, code=code or f"{what.replace(' ', '_')}_not_found")


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
               type: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                   type: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    """The JSON response of one error (also what the guard middleware sends for 401 and 413)."""
    return JSONResponse(error_body(status, message, param=param, code=code, type=type), status_code=status,
                        headers=headers)


def _validation(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "We could not parse the JSON body of your request: "
                              f"{first.get('ctx', {}).get('error', 'invalid JSON')}. The body must be a JSON "
                              "object.", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        msg = f"Missing required parameter: {param!r}"
    elif param:
        msg = f"Invalid value for {param!r}: {msg}"
    return error_response(400, msg, param=param, code="missing_required_parameter" if first.get("type") == "missing"
                          else "invalid_value")


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """THE handler: every exception a route lets out becomes an OpenAI error body."""
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)
    if isinstance(exc, RequestValidationError):
        return _validation(exc)
    if isinstance(exc, StarletteHTTPException):
        message = {404: f"Unknown route {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None),
                              code={413: "request_too_large"}.get(exc.status_code))
    if isinstance(exc, ValueError):           # the engine's refusals name the bad value and what is allowed
        return error_response(400, str(exc))
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error: {type(exc).__name__}", code="internal_error")


def install_error_handler(app: FastAPI) -> None:
    """Route every error class through :func:`handle_exception`."""
    for cls in (APIError, RequestValidationError, StarletteHTTPException, ValueError, Exception):
        app.add_exception_handler(cls, handle_exception)
