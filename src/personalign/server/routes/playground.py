"""The browser playground, served from the package (``server/playground/``).

* ``GET /`` redirects to ``/playground``; ``GET /playground`` is the page; ``GET /playground/{name}``
  its scripts, style sheet and icon (a fixed allow-list, nothing else is read from disk);
  ``/favicon.ico`` is the icon. Each answers ``HEAD`` too.
* Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only,
  requests to this origin only, no frames, no inline code. The page talks to the public API with the
  key the user pastes (kept in the tab's ``sessionStorage``, never sent anywhere else).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from personalign.server.context import ServerContext
from personalign.server.errors import APIError

__all__ = ["add"]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
FILES = {"index.html": "text/html; charset=utf-8", "api.js": "text/javascript; charset=utf-8",
         "chart.js": "text/javascript; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}


def _asset(name: str) -> Response:
    data = resources.files("personalign.server").joinpath("playground", name).read_bytes()
    return Response(data, media_type=FILES[name], headers=HEADERS)


def add(app: FastAPI, ctx: ServerContext) -> None:  # noqa: ARG001 - the pages need no state
    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground", status_code=307)

    @app.api_route("/playground", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return _asset("index.html")

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def favicon() -> Response:
        return _asset("favicon.svg")

    @app.api_route("/playground/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES or name == "index.html":
            raise APIError(404, f"no playground file {name!r}; the page is /playground.", param="name",
                           code="not_found")
        return _asset(name)
