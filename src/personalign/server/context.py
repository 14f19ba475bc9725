"""What every route shares: ``ServerContext`` (the engine, the store, the limits, the folds; who is
asking), the records a chat request is resolved into (``Choice``, ``ChatMeta``), and the small
helpers of ids and list pages. Below the routes (``server.routes``), above the engine and the store."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from personalign.server.errors import APIError
from personalign.server.folding import FoldManager
from personalign.server.schemas import Limits, check_id
from personalign.server.store import Store
from personalign.server.worker import EngineWorker

__all__ = ["ServerContext", "Choice", "ChatMeta", "page", "list_limit", "run_sync"]

R = TypeVar("R")


async def run_sync(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Run a blocking call (the store, tokenizing) on the server's thread pool."""
    return await run_in_threadpool(fn, *args, **kwargs)


@dataclass
class ServerContext:
    """One server's shared state; every route module receives it (``routes.add_routes``)."""

    engine: EngineWorker
    store: Store
    limits: Limits
    model_id: str
    admin_key: str | None
    unavailable: dict[str, str]
    folds: FoldManager

    async def db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return await run_sync(fn, *args, **kwargs)

    async def owner(self, request: Request) -> str:
        """The id of the key in the ``Authorization`` header (401 when missing or unknown)."""
        key = _bearer(request)
        if self.admin_key is not None and secrets.compare_digest(key, self.admin_key):
            raise APIError(403, "the admin key manages keys only (POST /v1/keys); use a key it created.")
        owner = await self.db(self.store.owner_of, key)
        if owner is None:
            raise APIError(401, "invalid or revoked API key.", code="invalid_api_key")
        return owner

    async def require_admin(self, request: Request) -> None:
        """401 unless the request carries a key; 403 unless it is the admin key."""
        if self.admin_key is None:
            raise APIError(403, "key management is disabled: start the server with PERSONALIGN_ADMIN_KEY set.")
        key = _bearer(request)
        if not secrets.compare_digest(key, self.admin_key):
            if await self.db(self.store.owner_of, key) is None:  # not a key at all: authentication failed
                raise APIError(401, "invalid or revoked API key.", code="invalid_api_key")
            raise APIError(403, "this route needs the admin key.")

    def valid_id(self, value: str, field: str) -> str:
        """``value`` when it is a valid id (``schemas.ID_RULE``); 400 naming ``field`` otherwise."""
        msg = check_id(value, field, self.limits.max_id_chars)
        if msg:
            raise APIError(400, msg, param=field, code="invalid_id")
        return value

    def query_id(self, value: str | None, field: str) -> str | None:
        """An id from the query string: form decoding turns an unencoded ``+`` into a space, which no id
        holds, so a space is read back as the ``+`` it was (``?user=a+b`` is the user ``a+b``)."""
        return None if value is None else self.valid_id(value.replace(" ", "+"), field)


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`.", code="missing_api_key")
    if not key.isascii() or not key.strip().isprintable():  # keys are ASCII; compare_digest takes nothing else
        raise APIError(401, "invalid API key: keys are printable ASCII.", code="invalid_api_key")
    return key.strip()


@dataclass(frozen=True)
class Choice:
    """How one choice of a chat request decodes (``personalize.resolve``)."""

    method: str
    preference: str | None
    params: dict[str, Any]
    user: str | None  # the profile's user id, or the request's ``user``
    info: dict[str, Any]  # what the reply's ``personalization`` says


@dataclass
class ChatMeta:
    """A chat request's record beside its engine jobs (one job per choice)."""

    id: str
    created: int
    user: str | None
    messages: list[dict[str, str]]
    choices: list[Choice] = field(default_factory=list)
    include_usage: bool = False

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.choices]


def page(rows: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """An OpenAI-style list page."""
    return {"object": "list", "data": rows, "has_more": has_more,
            "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}


def list_limit(limit: int) -> int:
    """A list's ``limit`` query parameter, checked."""
    if not 1 <= limit <= 1000:
        raise APIError(400, f"`limit` must lie in [1, 1000], got {limit}.", param="limit")
    return limit
