"""``/v1/feedback``: a user's choices, stored, folded into what they teach, listed and deleted.

Feedback (``POST /v1/feedback``), safe against retries, replicas, floods and a killed process:

1. an id this key already recorded returns the stored item (200) when the content matches,
   409 when it does not;
2. the pair is resolved (texts, or recorded completions of this key; a chosen completion alone is
   paired with the ``base`` method's greedy reply to the same messages) and bounded: every text and
   every sequence to score is checked against the limits before any model work (400);
3. the item is stored unfolded and queued for folding (``server.folding``; 429 when ``max_folds``
   items wait). The engine scores it within the rounds' folding budget, and the merge into the
   user's Drift profile runs in order of acknowledgement, in one transaction with marking it folded;
   A user with no profile yet gets one, created with their first valid item (as ``personalign
   feedback`` creates a profile file): chat works for any user id, and so does feedback;
4. ``wait: true`` (default) answers 201 once folded; ``wait: false`` answers 202 at once, and
   ``GET /v1/feedback/{id}`` shows ``folded`` when it is.

Ids of users and feedback are ``schemas.ID_RULE`` (1-``max_id_chars`` characters), so every stored row
stays addressable in a URL and erasable; error bodies never echo more than 64 characters of an id.
Lists paginate OpenAI-style (``limit``, ``after``; ``has_more``, ``first_id``, ``last_id``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from personalign.decoding.sampling import SamplingConfig
from personalign.learners import state_fields
from personalign.records import ChoiceError, choice_pairs
from personalign.server.context import ServerContext, list_limit, page
from personalign.server.errors import APIError, error_body
from personalign.server.events import EventReader
from personalign.server.folding import (
    EngineStopped,
    FoldQueueFull,
    FoldRejected,
    PreferencePair,
    feedback_pairs,
)
from personalign.server.schemas import FeedbackBody, shown
from personalign.server.store import ChoiceConflict, FeedbackConflict, ProfileConflict, StoredFeedback
from personalign.server.worker import Failed, Job, QueueFull
from personalign.types import Request as GenRequest

__all__ = ["add"]

_RETRIES = 8


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/feedback")
    async def post_feedback(body: FeedbackBody, request: Request) -> JSONResponse:
        return await _post(ctx, body, request)

    @app.get("/v1/feedback")
    async def list_feedback(request: Request, user: str | None = None, limit: int = 100,
                            after: str | None = None) -> dict[str, Any]:
        owner = await ctx.owner(request)
        rows, more = await ctx.db(ctx.store.list_feedback, owner, ctx.query_id(user, "user"), list_limit(limit),
                                  ctx.query_id(after, "after"))
        return page([f.to_dict() for f in rows], more)

    @app.delete("/v1/feedback/{fid}")
    async def delete_feedback(fid: str, request: Request) -> dict[str, Any]:
        return await _delete(ctx, fid, request)

    @app.get("/v1/feedback/{fid}")
    async def get_feedback(fid: str, request: Request) -> dict[str, Any]:
        owner = await ctx.owner(request)
        f = await ctx.db(ctx.store.get_feedback, owner, fid)
        if f is None:
            raise APIError(404, f"unknown feedback {shown(fid)}.", param="id", code="feedback_not_found")
        return f.to_dict()


async def _post(ctx: ServerContext, body: FeedbackBody, request: Request) -> JSONResponse:
    """Store one feedback item and fold it (module docstring, steps 1-4)."""
    owner = await ctx.owner(request)
    ctx.valid_id(body.id, "id")
    old = await ctx.db(ctx.store.get_feedback, owner, body.id)
    if body.completion_id is not None or body.chosen_index is not None:
        fb = await _resolve_choice(ctx, owner, body)
        ctx.valid_id(fb.user_id, "user")
    else:
        if body.user is None:
            raise APIError(400, "`user` is required: the id of the user whose feedback this is.", param="user")
        ctx.valid_id(body.user, "user")
        pair, completion_id = await _resolve_pair(ctx, owner, body, old)
        fb = StoredFeedback(body.id, body.user, _as_messages(pair.prompt), pair.chosen, pair.rejected,
                            completion_id, False, time.time())
    profile = await ctx.db(ctx.store.get_profile, owner, fb.user_id)
    new_user = profile is None  # created with its first feedback (once the item is valid), as the CLI does
    if new_user:
        profile = {"user": fb.user_id, "method": None, "pdpo_user_id": None, "learner": None, "learner_params": {},
                   **{f: None for f in state_fields()}}
    if old is not None:
        return _replay(old, fb)
    pairs = feedback_pairs(fb)
    try:
        ctx.folds.check_chars(pairs)  # before any tokenizing
        plan = await ctx.db(ctx.folds.prepare, pairs, profile)
    except FoldRejected as e:
        raise APIError(400, str(e), param=e.field, code="feedback_rejected") from None
    async with ctx.folds.user_lock(owner, fb.user_id):  # stored and queued in one order
        try:
            ctx.folds.check_capacity()
        except FoldQueueFull as e:
            raise APIError(429, f"the server is busy folding feedback: {e} Retry later.",
                           code="fold_queue_full") from None
        if new_user:  # None: another request created it meanwhile, which is as good
            await ctx.db(ctx.store.create_profile, owner, fb.user_id, {})
        try:
            stored, created = await ctx.db(ctx.store.add_feedback, owner, fb)
        except FeedbackConflict:
            raise APIError(409, f"feedback id {shown(body.id)} was already used for different content.",
                           param="id", code="feedback_id_reused") from None
        except ChoiceConflict as e:
            raise APIError(409, f"completion {shown(fb.completion_id or '')} was already judged: feedback "
                           f"{shown(e.feedback_id)} chose choice {e.chosen_index}, not {fb.chosen_index}.",
                           param="chosen_index", code="completion_already_judged") from None
        if not created:
            if stored.feedback_id != fb.feedback_id:  # the same choice under another id: the first stands
                return JSONResponse(stored.to_dict(), status_code=200)
            return _replay(stored, fb)
        ticket = ctx.folds.start(owner, stored, plan)
    if not body.wait:
        return JSONResponse(stored.to_dict(), status_code=202)
    stopped = ("the server stopped before this feedback was folded; it is stored and is folded when the server "
               "starts again.")
    try:
        final = await asyncio.shield(ticket.merged)
    except EngineStopped:
        raise APIError(503, stopped, code="shutting_down") from None
    except asyncio.CancelledError:
        # SIGTERM past --drain-seconds cancels the requests still running: this one is answered as the
        # API's drain promises (JSON 503; the item stays stored), not with a bare 500 and a traceback
        return JSONResponse(error_body(503, stopped, code="shutting_down"), status_code=503,
                            headers={"Retry-After": "5"})
    if final is None:  # deleted while it was folding
        raise APIError(404, f"feedback {shown(body.id)} was deleted while it was folded.", param="id",
                       code="feedback_not_found")
    return JSONResponse(final.to_dict(), status_code=201)


async def _delete(ctx: ServerContext, fid: str, request: Request) -> dict[str, Any]:
    """Forget one feedback item and take back what it taught, in one transaction: each learner's
    ``undo`` (Drift's rows; the P-DPO embedding put back to the one before it, the later items refitted
    by ``FoldManager.replay``; the in-context hypothesis inferred again when it read the item). A fold
    still running for it stops before it merges."""
    owner = await ctx.owner(request)
    await ctx.folds.settle(owner, fid)
    for _ in range(_RETRIES):
        f = await ctx.db(ctx.store.get_feedback, owner, fid)
        if f is None:
            raise APIError(404, f"unknown feedback {shown(fid)}.", param="id", code="feedback_not_found")
        profile = await ctx.db(ctx.store.get_profile, owner, f.user_id)
        update: dict[str, Any] = {}
        replay: list[str] = []
        if f.folded and profile is not None:
            items = await ctx.db(ctx.store.folded_items, owner, f.user_id)
            update, replay = await ctx.db(ctx.folds.undo, profile, f, items)
        try:
            async with ctx.folds.user_lock(owner, f.user_id):
                if not await ctx.db(ctx.store.delete_feedback, owner, fid, update or None,
                                    profile["version"] if profile else None, stale_after=bool(replay)):
                    raise APIError(404, f"unknown feedback {shown(fid)}.", param="id",
                                   code="feedback_not_found")
                if replay:
                    ctx.folds.replay(owner, f.user_id, f.pk)
        except ProfileConflict:
            continue
        return {"id": fid, "object": "feedback", "deleted": True, "unfolded": bool(update)}
    raise APIError(409, "the profile kept changing while this feedback was removed; retry.", code="profile_busy")


def _replay(old: StoredFeedback, new: StoredFeedback) -> JSONResponse:
    if old.content() != new.content():
        raise APIError(409, f"feedback id {shown(old.feedback_id)} was already used for different content.",
                       param="id", code="feedback_id_reused")
    return JSONResponse(old.to_dict(), status_code=200)


def _as_messages(prompt: str | list) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


_PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_completion_id", "rejected_completion_id")


async def _resolve_choice(ctx: ServerContext, owner: str, body: FeedbackBody) -> StoredFeedback:
    """The item a choice states: ``completion_id``'s choice ``chosen_index`` over each of its other choices."""
    if body.completion_id is None or body.chosen_index is None:
        missing, given = (("completion_id", "chosen_index") if body.completion_id is None
                          else ("chosen_index", "completion_id"))
        raise APIError(400, f"`{missing}` is required with `{given}`: a choice names the completion and the index "
                       "of the choice kept.", param=missing)
    given = [f for f in _PAIR_FIELDS if getattr(body, f) is not None]
    if given:
        raise APIError(400, f"a choice (`completion_id`, `chosen_index`) takes its texts from the completion; leave "
                       f"out `{given[0]}`.", param=given[0])
    c = await ctx.db(ctx.store.get_completion, owner, body.completion_id)
    if c is None:
        raise APIError(404, f"unknown completion {shown(body.completion_id)}.", param="completion_id",
                       code="completion_not_found")
    user = body.user if body.user is not None else c["user"]
    if user is None:
        raise APIError(400, "`user` is required: the completion was made without a `user`.", param="user")
    if c["user"] is not None and c["user"] != user:
        raise APIError(400, f"completion {shown(body.completion_id)} was made for user {shown(c['user'])}, not "
                       f"{shown(user)}.", param="user")
    texts = [ch["text"] for ch in sorted(c["choices"], key=lambda ch: ch["index"])]
    try:
        pairs = choice_pairs(c["messages"], texts, body.chosen_index)
    except ChoiceError as e:
        raise APIError(400, str(e), param=e.field, code="invalid_choice") from None
    return StoredFeedback(body.id, user, [dict(m) for m in c["messages"]], pairs[0].chosen, pairs[0].rejected,
                          body.completion_id, False, time.time(), chosen_index=body.chosen_index,
                          also_rejected=tuple(p.rejected for p in pairs[1:]))


async def _resolve_pair(ctx: ServerContext, owner: str, body: FeedbackBody, old: StoredFeedback | None
                        ) -> tuple[PreferencePair, str | None]:
    """The (prompt, chosen, rejected) the feedback states, from texts or recorded completions."""
    if body.chosen_completion_id is None:
        if body.rejected_completion_id is not None:
            raise APIError(400, "`rejected_completion_id` needs `chosen_completion_id`.", param="chosen_completion_id")
        for name in ("prompt", "chosen", "rejected"):
            v = getattr(body, name)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise APIError(400, f"`{name}` must be a non-empty text (or give `chosen_completion_id`).",
                               param=name)
        if body.chosen == body.rejected:
            raise APIError(400, "`chosen` and `rejected` are the same text; a preference needs two replies.",
                           param="rejected")
        prompt = body.prompt if isinstance(body.prompt, str) else [
            {"role": m.role, "content": m.text()} for m in body.prompt]
        return PreferencePair(prompt=prompt, chosen=body.chosen, rejected=body.rejected), None
    if body.prompt is not None or body.chosen is not None:
        raise APIError(400, "with `chosen_completion_id`, the prompt and the chosen text come from the completion; "
                       "leave out `prompt` and `chosen`.", param="chosen_completion_id")
    if body.rejected is not None and body.rejected_completion_id is not None:
        raise APIError(400, "give `rejected` or `rejected_completion_id`, not both.", param="rejected")
    chosen = await _completion(ctx, owner, body.chosen_completion_id, "chosen_completion_id", body.user)
    if body.rejected_completion_id is not None:
        rejected = await _completion(ctx, owner, body.rejected_completion_id, "rejected_completion_id", body.user)
        if rejected["messages"] != chosen["messages"]:
            raise APIError(400, "the two completions answer different messages.", param="rejected_completion_id")
        rejected_text = rejected["text"]
    elif body.rejected is not None:
        rejected_text = body.rejected
    elif old is not None:
        rejected_text = old.rejected  # a retry: the reference reply was generated already
    else:
        rejected_text = await _reference_reply(ctx, chosen["messages"])
    if rejected_text == chosen["text"]:
        raise APIError(400, "the chosen and the rejected reply are the same text.", param="chosen_completion_id")
    return PreferencePair(prompt=chosen["messages"], chosen=chosen["text"], rejected=rejected_text), chosen["id"]


async def _completion(ctx: ServerContext, owner: str, cid: str, param: str, user: str) -> dict[str, Any]:
    c = await ctx.db(ctx.store.get_completion, owner, cid)
    if c is None:
        raise APIError(404, f"unknown completion {shown(cid)}.", param=param, code="completion_not_found")
    if c["user"] is not None and c["user"] != user:
        raise APIError(400, f"completion {cid!r} was made for user {c['user']!r}, not {user!r}.", param=param)
    return c


async def _reference_reply(ctx: ServerContext, messages: list[dict[str, str]], max_tokens: int = 64) -> str:
    """The ``base`` method's greedy reply: what the user chose the completion over."""
    loop = asyncio.get_running_loop()
    job = Job(method="base", request=GenRequest(prompt=messages), max_tokens=max_tokens,
              sampling=SamplingConfig(temperature=0.0), stop=[], loop=loop, events=asyncio.Queue())
    try:
        ctx.engine.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e} Retry later.", code="queue_full") from None
    reader = EventReader([job])
    while (event := await reader.next()) is not None:
        if isinstance(event, Failed):
            raise APIError(event.status, event.message, param=event.param)
    return reader.text(0)
