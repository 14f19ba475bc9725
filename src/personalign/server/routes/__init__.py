"""The server's routes, one module per resource; each has ``add(app, ctx)``:

* ``health``: ``GET /health``, ``GET /v1/models``
* ``chat``: ``POST /v1/chat/completions``
* ``completions``: ``GET``/``DELETE /v1/chat/completions/{id}`` (the stored replies)
* ``profiles``: ``/v1/profiles``
* ``feedback``: ``/v1/feedback``
* ``keys``: ``/v1/keys`` (admin)
* ``playground``: ``GET /``, ``/playground`` and its files

A route reads and writes through ``ServerContext`` (``server.context``): the engine, the store, the
limits, the folds, and who is asking. A new resource is one module here and one line below.
"""

from __future__ import annotations

from fastapi import FastAPI

from personalign.server.context import ServerContext
from personalign.server.routes import chat, completions, feedback, health, keys, playground, profiles

__all__ = ["add_routes"]


def add_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Mount every resource's routes on ``app``."""
    for module in (health, chat, completions, profiles, feedback, keys, playground):
        module.add(app, ctx)
