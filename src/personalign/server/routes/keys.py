"""``/v1/keys``: API keys, created, listed and revoked with the admin key (``PERSONALIGN_ADMIN_KEY``);
a key owns its users' profiles, feedback and completions."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from personalign.server.context import ServerContext
from personalign.server.errors import APIError
from personalign.server.schemas import KeyBody, shown

__all__ = ["add"]


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/keys", status_code=201)
    async def create_key(body: KeyBody, request: Request) -> dict[str, Any]:
        await ctx.require_admin(request)
        kid, key = await ctx.db(ctx.store.create_key, body.name)
        return {"id": kid, "object": "api_key", "name": body.name, "key": key}

    @app.get("/v1/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        await ctx.require_admin(request)
        return {"object": "list", "data": await ctx.db(ctx.store.list_keys)}

    @app.delete("/v1/keys/{kid}")
    async def revoke_key(kid: str, request: Request) -> dict[str, Any]:
        await ctx.require_admin(request)
        if not await ctx.db(ctx.store.revoke_key, kid):
            raise APIError(404, f"no live key {shown(kid)}.", param="id", code="key_not_found")
        return {"id": kid, "object": "api_key", "deleted": True}
