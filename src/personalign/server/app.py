"""``create_app(engine, store)``: the OpenAI-compatible personalized chat API.

The routes live in ``server.routes``, one module per resource (chat, stored completions, profiles,
feedback, keys, health and models, the playground); they share one ``ServerContext``
(``server.context``). This module wires them: the context, the folds (``server.folding``), the
engine's start and stop with the app, the error handlers and the body limit.

State lives in ``store`` only; ``engine`` (an ``EngineWorker``) decodes. An API key
(``Authorization: Bearer ...``) owns its users; the admin key (``PERSONALIGN_ADMIN_KEY``, read when
the app is created) manages keys and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from personalign.server.context import ServerContext, run_sync
from personalign.server.errors import BodyLimit, install_error_handlers
from personalign.server.folding import FoldManager, steering_model_key
from personalign.server.routes import add_routes
from personalign.server.schemas import Limits
from personalign.server.store import Store
from personalign.server.worker import EngineWorker

__all__ = ["create_app", "ServerContext"]


def create_app(engine: EngineWorker, store: Store, *, limits: Limits | None = None, model_id: str = "personalign",
               admin_key: str | None = None, unavailable: dict[str, str] | None = None,
               learners: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app over a (not yet started) engine worker and a store.

    Args:
        engine: decodes; started and stopped with the app.
        store: keys, profiles, completions, feedback.
        limits: request bounds (defaults: ``Limits()``).
        model_id: the name clients pass as ``model`` (listed by ``/v1/models``).
        admin_key: the admin key; default: the ``PERSONALIGN_ADMIN_KEY`` environment variable.
        unavailable: methods registered but not served here, with the reason (shown by ``/health``).
        learners: settings per learner (``personalign.learners``: ``{"drift": DriftLearnerConfig(...),
            "pdpo": EmbeddingFitConfig(...), "incontext": InContextConfig(...)}``; ``False`` turns one off,
            e.g. ``{"pdpo": False}``: new P-DPO users keep the generic embedding). Default: each one's.
    """

    if admin_key is None:
        admin_key = os.environ.get("PERSONALIGN_ADMIN_KEY") or None
    limits = limits or Limits()
    if limits.max_n > engine.max_batch:
        raise ValueError(f"`max_n` ({limits.max_n}) must be <= the engine's `max_batch` ({engine.max_batch}): a "
                         "request's choices decode as rows of one batch.")
    folds = FoldManager(engine, store, limits, steer_key=steering_model_key(engine.methods, engine.backend),
                        chat_template=engine.chat_template, run_sync=run_sync, learners=learners)
    ctx = ServerContext(engine=engine, store=store, limits=limits, model_id=model_id, admin_key=admin_key,
                        unavailable=dict(unavailable or {}), folds=folds)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            await folds.recover()  # items a stopped server stored but did not fold
            yield
        finally:
            engine.stop()

    # /openapi.json is public (the API's schema, no data); the /docs and /redoc pages are off: they load
    # their scripts from another origin, which the server's pages never do
    app = FastAPI(title="personalign", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    add_routes(app, ctx)
    return app
