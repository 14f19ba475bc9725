"""``create_app(engine, store)``: the OpenAI-compatible personalized chat API.

Routes:

* ``POST /v1/chat/completions`` — OpenAI's chat schema plus an optional ``personalization``
  object (``method``, ``preference``, ``profile_id``, method parameters). Without it, the profile
  named by ``user`` (if the key has one) supplies the default method, preference and parameters;
  with neither, ``base``. ``stream: true`` answers Server-Sent Events in OpenAI's chunk format.
* ``GET /v1/models``, ``GET /health``.
* ``/v1/profiles`` CRUD, ``/v1/feedback`` (see ``server.routes``), ``/v1/keys`` (admin).
* ``GET /playground`` (and ``/`` redirecting to it): the browser playground (``server.pages``).

State lives in ``store`` only; ``engine`` (an ``EngineWorker``) decodes. An API key
(``Authorization: Bearer ...``) owns its users; the admin key (``PERSONALIGN_ADMIN_KEY``, read when
the app is created) manages keys and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from personalign.decoding.loop import PromptTooLong, RequestPlan, plan_request
from personalign.decoding.sampling import SamplingConfig
from personalign.server.errors import APIError, BodyLimit, install_error_handlers
from personalign.server.folding import FoldManager, steering_model_key
from personalign.server.pages import add_playground
from personalign.server.personalize import resolve
from personalign.server.routes import add_routes
from personalign.server.schemas import ChatRequest, Limits, check_id
from personalign.server.store import Store, StoreBusy
from personalign.server.worker import Delta, Done, EngineWorker, Event, Failed, Job, QueueFull
from personalign.training.pdpo.user_fit import EmbeddingFitConfig
from personalign.types import Request as GenRequest

__all__ = ["create_app", "ServerContext"]

DEFAULT_EMBEDDING_FIT = EmbeddingFitConfig()


@dataclass
class ServerContext:
    engine: EngineWorker
    store: Store
    limits: Limits
    model_id: str
    admin_key: str | None
    unavailable: dict[str, str]
    folds: FoldManager | None = None

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

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


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`.", code="missing_api_key")
    if not key.isascii() or not key.strip().isprintable():  # keys are ASCII; compare_digest takes nothing else
        raise APIError(401, "invalid API key: keys are printable ASCII.", code="invalid_api_key")
    return key.strip()


def create_app(engine: EngineWorker, store: Store, *, limits: Limits | None = None, model_id: str = "personalign",
               admin_key: str | None = None, unavailable: dict[str, str] | None = None,
               embedding_fit: EmbeddingFitConfig | None = DEFAULT_EMBEDDING_FIT) -> FastAPI:
    """The FastAPI app over a (not yet started) engine worker and a store.

    Args:
        engine: decodes; started and stopped with the app.
        store: keys, profiles, completions, feedback.
        limits: request bounds (defaults: ``Limits()``).
        model_id: the name clients pass as ``model`` (listed by ``/v1/models``).
        admin_key: the admin key; default: the ``PERSONALIGN_ADMIN_KEY`` environment variable.
        unavailable: methods registered but not served here, with the reason (shown by ``/health``).
        embedding_fit: where ``pdpo`` is served, how feedback fits the P-DPO embedding of a user its
            checkpoint never saw (``server.folding``); None: such users keep the generic embedding.
    """

    if admin_key is None:
        admin_key = os.environ.get("PERSONALIGN_ADMIN_KEY") or None
    limits = limits or Limits()
    if limits.max_n > engine.max_batch:
        raise ValueError(f"`max_n` ({limits.max_n}) must be <= the engine's `max_batch` ({engine.max_batch}): a "
                         "request's choices decode as rows of one batch.")
    ctx = ServerContext(engine=engine, store=store, limits=limits, model_id=model_id,
                        admin_key=admin_key, unavailable=dict(unavailable or {}))
    ctx.folds = FoldManager(engine, store, ctx.limits, steer_key=steering_model_key(engine.methods, engine.backend),
                            chat_template=engine.chat_template, run_sync=ctx.db, embedding_fit=embedding_fit)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            await ctx.folds.recover()  # items a stopped server stored but did not fold
            yield
        finally:
            engine.stop()

    # /openapi.json is public (the API's schema, no data); the /docs and /redoc pages are off: they load
    # their scripts from another origin, which the server's pages never do
    app = FastAPI(title="personalign", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=ctx.limits.max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """``status``: ``ok``, ``starting``, or ``degraded`` while the store is failing (``store_health``
        names the fault; it is probed for recovery)."""
        store_health = await ctx.db(store.health)
        status = "starting" if not engine.alive else "ok" if store_health["ok"] else "degraded"
        return {"status": status, "model": ctx.model_id,
                "methods": sorted(engine.methods), "unavailable_methods": ctx.unavailable,
                "queue": {**engine.load(), **ctx.folds.load()}, "store": store.dialect, "store_health": store_health}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await ctx.owner(request)
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": 0,
                                            "owned_by": "personalign", "methods": sorted(engine.methods)}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        owner = await ctx.owner(request)
        jobs, meta = await _prepare_jobs(ctx, owner, body)
        try:
            engine.submit_group(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e} Retry later.", code="queue_full") from None
        first = await _next_event(jobs, request)
        if first is None:
            return JSONResponse({}, status_code=499)
        if isinstance(first, Failed):
            raise APIError(first.status, first.message, param=first.param)
        if body.stream:
            return StreamingResponse(_sse(ctx, owner, jobs, meta, first, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts: list[list[str]] = [[] for _ in jobs]
        done: dict[int, Done] = {}
        event: Event | None = first
        while True:
            if event is None:
                return JSONResponse({}, status_code=499)
            if isinstance(event, Failed):
                raise APIError(event.status, event.message, param=event.param)
            if isinstance(event, Delta):
                texts[event.index].append(event.text)
            else:
                done[event.index] = event
                if len(done) == len(jobs):
                    break
            event = await _next_event(jobs, request)
        choices = [{"index": i, "text": "".join(texts[i]), "method": meta["methods"][i],
                    "finish_reason": done[i].finish_reason} for i in range(len(jobs))]
        await ctx.db(store.record_completion, owner, meta["id"], meta["user"], meta["messages"], choices)
        # StoreBusy -> 503 with Retry-After (errors.py)
        return {"id": meta["id"], "object": "chat.completion", "created": meta["created"], "model": ctx.model_id,
                "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["finish_reason"], "logprobs": None, "method": c["method"],
                             "personalization": meta["infos"][c["index"]]} for c in choices],
                "usage": _usage(done.values()),
                "personalization": meta["infos"][0]}

    add_routes(app, ctx)
    add_playground(app)
    return app


def _usage(done: Any) -> dict[str, int]:
    """OpenAI's usage of ``n`` choices: the prompt counted once, every choice's tokens summed."""
    done = list(done)
    n_prompt = max(d.prompt_tokens for d in done)
    n_completion = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


async def _next_event(jobs: list[Job], request: Request, poll: float = 0.5) -> Event | None:
    """The next event of a request's jobs (its choices share one queue); None (and the jobs cancelled)
    when the client has gone away.

    The client is checked every ``poll`` seconds whether or not events arrive: a non-streamed request
    that keeps receiving tokens must still stop decoding when its client leaves."""
    loop = asyncio.get_running_loop()
    lead = jobs[0]
    while True:
        now = loop.time()
        if now - lead.checked_at >= poll:
            lead.checked_at = now
            if await request.is_disconnected():
                for job in jobs:
                    job.cancelled = True
                return None
        try:
            return await asyncio.wait_for(lead.events.get(), timeout=max(0.01, lead.checked_at + poll - now))
        except asyncio.TimeoutError:
            continue


async def _sse(ctx: ServerContext, owner: str, jobs: list[Job], meta: dict[str, Any], first: Event,
               request: Request) -> AsyncIterator[str]:
    """OpenAI's chunk stream: per choice a role chunk, its content chunks (``index`` says whose, choices
    interleaved as they decode) and its finish chunk; then the usage chunk if asked, then ``[DONE]``."""
    base = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"], "model": ctx.model_id}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
        data = {**base, "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}],
                **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    texts: list[list[str]] = [[] for _ in jobs]
    done: dict[int, Done] = {}
    finished = False
    try:
        for i in range(len(jobs)):
            yield chunk(i, {"role": "assistant", "content": ""}, personalization=meta["infos"][i])
        event: Event | None = first
        while True:
            if event is None:
                return
            if isinstance(event, Failed):
                err = {"error": {"message": event.message, "type": "server_error", "param": event.param,
                                 "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            if isinstance(event, Delta):
                texts[event.index].append(event.text)
                yield chunk(event.index, {"content": event.text})
            else:
                done[event.index] = event
                yield chunk(event.index, {}, event.finish_reason)
                if len(done) == len(jobs):
                    break
            event = await _next_event(jobs, request)
        finished = True
        choices = [{"index": i, "text": "".join(texts[i]), "method": meta["methods"][i],
                    "finish_reason": done[i].finish_reason} for i in range(len(jobs))]
        try:
            await ctx.db(ctx.store.record_completion, owner, meta["id"], meta["user"], meta["messages"], choices)
        except StoreBusy as e:  # the reply was streamed; say that it was not recorded, then end the stream
            err = {"error": {"message": f"{e} The reply above was not recorded (it cannot be used as feedback).",
                             "type": "service_unavailable", "param": None, "code": "store_busy"}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        if meta["include_usage"]:  # OpenAI's usage chunk: no choices
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(done.values())})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            for job in jobs:
                job.cancelled = True


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index``: the request's own for choice 0 (so ``n = 1`` and the first
    of ``n`` choices sample alike), a distinct one derived from it for the others; None without a seed."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


async def _prepare_jobs(ctx: ServerContext, owner: str, body: ChatRequest) -> tuple[list[Job], dict[str, Any]]:
    """Check limits, resolve the user's personalization and build the engine jobs, one per choice (4xx on
    bad input)."""
    lim = ctx.limits
    if body.model != ctx.model_id:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {ctx.model_id!r}.",
                       param="model", code="model_not_found")
    if len(body.messages) > lim.max_messages:
        raise APIError(400, f"`messages` holds {len(body.messages)} messages; the limit is {lim.max_messages}.",
                       param="messages", code="too_many_messages")
    if body.user is not None and (msg := check_id(body.user, "user", lim.max_id_chars)):
        raise APIError(400, msg, param="user", code="invalid_id")
    messages = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if len(text) > lim.max_message_chars:
            raise APIError(400, f"`messages[{i}].content` is {len(text)} characters; the limit is "
                           f"{lim.max_message_chars}.", param=f"messages[{i}].content", code="message_too_long")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise APIError(400, "`messages` needs at least one non-empty user message.", param="messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = lim.default_max_tokens
    if not 1 <= max_tokens <= lim.max_tokens:
        raise APIError(400, f"`{param}` must be an integer in [1, {lim.max_tokens}], got {max_tokens}.", param=param)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > lim.max_stop or any(not s for s in stop) or any(len(s) > 200 for s in stop):
        raise APIError(400, f"`stop` must be at most {lim.max_stop} non-empty strings of at most 200 characters.",
                       param="stop")
    try:
        sampling = SamplingConfig(temperature=float(1.0 if body.temperature is None else body.temperature),
                                  top_p=float(1.0 if body.top_p is None else body.top_p))
    except ValueError as e:
        raise APIError(400, str(e), param="temperature" if "temperature" in str(e) else "top_p") from None

    resolved = await resolve(ctx, owner, body)
    n = body.n if body.n is not None else len(resolved)
    if len(resolved) > 1 and n != len(resolved):
        raise APIError(400, f"`n` is {n} but `personalization.methods` names {len(resolved)} methods (one choice "
                       "each); leave `n` out or make them equal.", param="n")
    if n > lim.max_n:
        raise APIError(400, f"`n` must be an integer in [1, {lim.max_n}], got {n}.", param="n", code="too_many_choices")
    per_choice = resolved if len(resolved) > 1 else resolved * n
    plans: dict[str, RequestPlan] = {}
    jobs: list[Job] = []
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, (method, preference, params, user, _) in enumerate(per_choice):
        request = GenRequest(prompt=messages, preference=preference, params=params, seed=choice_seed(body.seed, i),
                             user=user)
        if method not in plans:
            try:  # validated and encoded ONCE per method: the engine and the loop reuse the plan
                plans[method] = await ctx.db(plan_request, ctx.engine.methods[method], request, ctx.engine.backend,
                                             ctx.engine.chat_template)
            except PromptTooLong as e:
                raise APIError(400, f"{e} Shorten `messages`.", param="messages",
                               code="context_length_exceeded") from None
            except ValueError as e:
                where = "personalization.preference" if "`preference`" in str(e) else "personalization"
                raise APIError(400, f"method {method!r}: {e}", param=where) from None
        plan = dataclasses.replace(plans[method], request=request)  # the same views; this choice's seed
        jobs.append(Job(method=method, request=request, max_tokens=max_tokens, sampling=sampling, stop=stop,
                        loop=loop, events=events, plan=plan))
    meta = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "user": per_choice[0][3],
            "messages": messages, "methods": [r[0] for r in per_choice], "infos": [r[4] for r in per_choice],
            "include_usage": body.stream_options is not None and body.stream_options.include_usage}
    return jobs, meta
