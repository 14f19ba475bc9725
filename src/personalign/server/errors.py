"""OpenAI-style errors: every failure answers ``{"error": {"message", "type", "param", "code"}}``.

Bad input is a 4xx with a message that names the field; only a real server fault is a 500.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personalign.server.store import StoreBusy, StoreUnavailable

__all__ = ["APIError", "install_error_handlers", "error_body", "BodyLimit"]

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    t = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": t, "param": param, "code": code}}


def _response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(error_body(e.status, e.message, param=e.param, code=e.code, type=e.type),
                        status_code=e.status, headers=headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[a-z_-]+\[.*\]|[A-Z]\w*)$")


def _loc(loc: tuple) -> str:
    """``("body", "messages", 0, "content", "str")`` -> ``messages[0].content`` (union tags dropped)."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        p = str(p)
        if p.isdigit():
            out += f"[{p}]"
        elif not _TYPE_TAG.match(p):
            out += f".{p}" if out else p
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"malformed JSON in the request body: {ctx.get('error', 'could not parse')}.", None
    param = _loc(tuple(first.get("loc", ())))
    if not param:  # the body itself: missing, or not a JSON object (never echoed back)
        return "the request body must be a JSON object (Content-Type: application/json).", None
    if first.get("type") == "missing":
        return f"`{param}` is required.", param
    # a union field fails once per alternative: say all of them at once
    same = [e for e in errors if _loc(tuple(e.get("loc", ()))) == param]
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same))
    got = first.get("input")
    try:
        shown = json.dumps(got)[:80]
    except (TypeError, ValueError):
        shown = repr(got)[:80]
    rest = len(errors) - len(same)
    more = f" ({rest} more problem(s))" if rest else ""
    where = f"`{param}`: " if param else ""
    return f"{where}{'; or '.join(msgs)}; got {shown}.{more}", param or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return _response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(e)
        return _response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = str(e.detail) if e.status_code != 404 else "no such route; see /openapi.json for the API."
        return _response(APIError(e.status_code, msg))


    @app.exception_handler(StoreBusy)
    async def _busy(_: Request, e: StoreBusy) -> JSONResponse:
        return _response(APIError(503, str(e), code="store_busy"))

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, e: StoreUnavailable) -> JSONResponse:
        return _response(APIError(503, str(e), code="store_unavailable"))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 before the app parses it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = False
        try:
            too_big = declared is not None and int(declared) > self.limit
        except ValueError:
            too_big = False
        if not too_big:
            # a body without a (truthful) length: count while reading
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.limit:
                    too_big = True
                    break
            if not too_big:
                sent = False

                async def replay() -> dict:
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send)
                return
        resp = _response(APIError(413, f"the request body exceeds {self.limit} bytes.", code="body_too_large"))
        await resp(scope, receive, send)
