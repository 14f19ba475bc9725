"""``/v1/chat/completions/{id}``: the stored replies of a key's chat requests (what a choice among
them names as feedback), read and deleted."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from personalign.server.context import ServerContext
from personalign.server.errors import APIError
from personalign.server.schemas import shown

__all__ = ["add"]


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/v1/chat/completions/{cid}")
    async def get_completion(cid: str, request: Request) -> dict[str, Any]:
        owner = await ctx.owner(request)
        c = await ctx.db(ctx.store.get_completion, owner, cid)
        if c is None:
            raise APIError(404, f"unknown completion {shown(cid)}.", param="id", code="completion_not_found")
        return {"object": "chat.completion.stored", **c}

    @app.delete("/v1/chat/completions/{cid}")
    async def delete_completion(cid: str, request: Request) -> dict[str, Any]:
        owner = await ctx.owner(request)
        if not await ctx.db(ctx.store.delete_completion, owner, cid):
            raise APIError(404, f"unknown completion {shown(cid)}.", param="id", code="completion_not_found")
        return {"id": cid, "object": "chat.completion.deleted", "deleted": True}
