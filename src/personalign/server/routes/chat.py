"""``POST /v1/chat/completions``: OpenAI's chat schema plus an optional ``personalization`` object
(``method``, ``methods``, ``preference``, ``profile_id``, method parameters).

Without ``personalization``, the profile named by ``user`` (if the key has one) supplies the default
method, preference and parameters; with neither, ``base`` (``server.personalize``). ``n`` choices
decode as rows of one batch, one engine job each; ``stream: true`` answers Server-Sent Events in
OpenAI's chunk format. The finished reply is recorded (``GET /v1/chat/completions/{id}``), so a user's
choice among its choices can become feedback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from personalign.decoding.loop import PromptTooLong, RequestPlan, plan_request
from personalign.decoding.sampling import SamplingConfig
from personalign.learners.drift import thompson_profile
from personalign.server.context import ChatMeta, Choice, ServerContext
from personalign.server.errors import APIError
from personalign.server.events import EventReader, usage
from personalign.server.personalize import resolve
from personalign.server.schemas import ChatRequest, check_id
from personalign.server.store import StoreBusy
from personalign.server.worker import Delta, Event, Failed, Job, QueueFull
from personalign.types import Request as GenRequest

__all__ = ["add", "choice_seed"]


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        owner = await ctx.owner(request)
        jobs, meta = await _prepare_jobs(ctx, owner, body)
        try:
            ctx.engine.submit_group(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e} Retry later.", code="queue_full") from None
        reader = EventReader(jobs, request)
        first = await reader.next()
        if first is None:
            return JSONResponse({}, status_code=499)
        if isinstance(first, Failed):
            raise APIError(first.status, first.message, param=first.param)
        if body.stream:
            return StreamingResponse(_sse(ctx, owner, reader, meta, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while await reader.next() is not None:
            pass
        if reader.gone:
            return JSONResponse({}, status_code=499)
        if reader.failed is not None:
            raise APIError(reader.failed.status, reader.failed.message, param=reader.failed.param)
        choices = reader.choices(meta.methods)
        await ctx.db(ctx.store.record_completion, owner, meta.id, meta.user, meta.messages, choices)
        # StoreBusy -> 503 with Retry-After (errors.py)
        infos = [c.info for c in meta.choices]
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": ctx.model_id,
                "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["finish_reason"], "logprobs": None, "method": c["method"],
                             "personalization": infos[c["index"]]} for c in choices],
                "usage": usage(reader.done.values()),
                "personalization": infos[0]}


async def _sse(ctx: ServerContext, owner: str, reader: EventReader, meta: ChatMeta, first: Event
               ) -> AsyncIterator[str]:
    """OpenAI's chunk stream: per choice a role chunk, its content chunks (``index`` says whose, choices
    interleaved as they decode) and its finish chunk (which also says the choice's ``completion_tokens``);
    then the usage chunk if asked, then ``[DONE]``."""
    base = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": ctx.model_id}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None, tokens: int | None = None,
              **extra: Any) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        if tokens is not None:  # our extension on a choice's finish chunk: the tokens that choice wrote
            choice["completion_tokens"] = tokens
        data = {**base, "choices": [choice], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    finished = False
    try:
        for i, c in enumerate(meta.choices):
            yield chunk(i, {"role": "assistant", "content": ""}, personalization=c.info)
        event: Event | None = first
        while event is not None:
            if isinstance(event, Failed):
                err = {"error": {"message": event.message, "type": "server_error", "param": event.param,
                                 "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            if isinstance(event, Delta):
                yield chunk(event.index, {"content": event.text})
            else:
                yield chunk(event.index, {}, event.finish_reason, tokens=event.completion_tokens)
            event = await reader.next()
        if reader.gone:
            return
        finished = True
        try:
            await ctx.db(ctx.store.record_completion, owner, meta.id, meta.user, meta.messages,
                         reader.choices(meta.methods))
        except StoreBusy as e:  # the reply was streamed; say that it was not recorded, then end the stream
            err = {"error": {"message": f"{e} The reply above was not recorded (it cannot be used as feedback).",
                             "type": "service_unavailable", "param": None, "code": "store_busy"}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        if meta.include_usage:  # OpenAI's usage chunk: no choices
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(reader.done.values())})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            reader.cancel()


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index``: the request's own for choice 0 (so ``n = 1`` and the first
    of ``n`` choices sample alike), a distinct one derived from it for the others; None without a seed."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _messages(ctx: ServerContext, body: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as the engine reads them, within the limits (400 naming the field)."""
    lim = ctx.limits
    messages = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if len(text) > lim.max_message_chars:
            raise APIError(400, f"`messages[{i}].content` is {len(text)} characters; the limit is "
                           f"{lim.max_message_chars}.", param=f"messages[{i}].content", code="message_too_long")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise APIError(400, "`messages` needs at least one non-empty user message.", param="messages")
    return messages


def _decoding(ctx: ServerContext, body: ChatRequest) -> tuple[int, list[str], SamplingConfig]:
    """``(max_tokens, stop, sampling)`` of the request, checked."""
    lim = ctx.limits
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
    return max_tokens, stop, sampling


def _explore(per_choice: list[Choice], seed: int | None) -> list[Choice]:
    """``alternatives: explore``: the first choice decodes with the user's Drift estimate, each other one
    with a draw of it (``thompson_profile``, seeded by the request's ``seed`` and the choice's index)."""
    first = per_choice[0]
    where = "personalization.alternatives"
    if len(per_choice) < 2 or any(c.method != first.method for c in per_choice):
        raise APIError(400, "`alternatives: explore` needs `n` >= 2 choices of one method.", param=where)
    state = first.params.get("profile") if first.method == "drift" else None
    if not isinstance(state, dict):
        raise APIError(400, "`alternatives: explore` draws from the user's learned Drift weights: it needs method "
                       "`drift` and a profile with feedback.", param=where)
    base = secrets.randbits(31) if seed is None else seed
    out = [first]
    for i in range(1, len(per_choice)):
        try:
            draw = thompson_profile(state, base * 1009 + i)
        except ValueError as e:
            raise APIError(400, f"`alternatives: explore` {e}", param=where) from None
        info = {**first.info, "alternative": "draw of the Drift weights"}
        info["drift"] = {"num_pairs": draw.get("num_pairs"),
                         "selected": {a["name"]: a["weight"] for a in draw.get("selected", [])}}
        out.append(dataclasses.replace(first, params={**first.params, "profile": draw}, info=info))
    return out


async def _prepare_jobs(ctx: ServerContext, owner: str, body: ChatRequest) -> tuple[list[Job], ChatMeta]:
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
    messages = _messages(ctx, body)
    max_tokens, stop, sampling = _decoding(ctx, body)
    resolved = await resolve(ctx, owner, body)
    n = body.n if body.n is not None else len(resolved)
    if len(resolved) > 1 and n != len(resolved):
        raise APIError(400, f"`n` is {n} but `personalization.methods` names {len(resolved)} methods (one choice "
                       "each); leave `n` out or make them equal.", param="n")
    if n > lim.max_n:
        raise APIError(400, f"`n` must be an integer in [1, {lim.max_n}], got {n}.", param="n", code="too_many_choices")
    per_choice = resolved if len(resolved) > 1 else resolved * n
    explore = body.personalization is not None and body.personalization.alternatives == "explore"
    if explore:
        per_choice = _explore(per_choice, body.seed)
    plans: dict[str, RequestPlan] = {}
    jobs: list[Job] = []
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, choice in enumerate(per_choice):
        request = GenRequest(prompt=messages, preference=choice.preference, params=choice.params,
                             seed=choice_seed(body.seed, i), user=choice.user)
        method = choice.method
        key = f"{method}/{i}" if explore else method  # a draw of the weights is a view set of its own
        if key not in plans:
            try:  # validated and encoded ONCE per method: the engine and the loop reuse the plan
                plans[key] = await ctx.db(plan_request, ctx.engine.methods[method], request, ctx.engine.backend,
                                          ctx.engine.chat_template)
            except PromptTooLong as e:
                raise APIError(400, f"{e} Shorten `messages`.", param="messages",
                               code="context_length_exceeded") from None
            except ValueError as e:
                where = "personalization.preference" if "`preference`" in str(e) else "personalization"
                raise APIError(400, f"method {method!r}: {e}", param=where) from None
        plan = dataclasses.replace(plans[key], request=request)  # the same views; this choice's seed
        jobs.append(Job(method=method, request=request, max_tokens=max_tokens, sampling=sampling, stop=stop,
                        loop=loop, events=events, plan=plan))
    meta = ChatMeta(id="chatcmpl-" + secrets.token_hex(12), created=int(time.time()), user=per_choice[0].user,
                    messages=messages, choices=list(per_choice),
                    include_usage=body.stream_options is not None and body.stream_options.include_usage)
    return jobs, meta
