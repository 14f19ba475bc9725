"""``GET /health`` (public: the engine's and the folds' queues, the store's health) and
``GET /v1/models`` (the served model and its methods)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from personalign.server.context import ServerContext

__all__ = ["add"]


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        """``status``: ``ok``, ``starting``, or ``degraded`` while the store is failing (``store_health``
        names the fault; it is probed for recovery)."""
        store_health = await ctx.db(ctx.store.health)
        status = "starting" if not ctx.engine.alive else "ok" if store_health["ok"] else "degraded"
        return {"status": status, "model": ctx.model_id,
                "methods": sorted(ctx.engine.methods), "unavailable_methods": ctx.unavailable,
                "learners": sorted(ctx.folds.learners), "unavailable_learners": ctx.folds.unavailable,
                "queue": {**ctx.engine.load(), **ctx.folds.load()}, "store": ctx.store.dialect,
                "store_health": store_health}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await ctx.owner(request)
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": 0,
                                            "owned_by": "personalign", "methods": sorted(ctx.engine.methods)}]}
