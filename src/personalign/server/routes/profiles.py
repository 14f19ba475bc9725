"""``/v1/profiles``: each user's stored preference, method, parameters, learner and learned state (one
field per learner: Drift weights, the P-DPO embedding, the in-context hypothesis), created, read,
changed and deleted by the key that owns them."""

from __future__ import annotations

import difflib
from typing import Any

from fastapi import FastAPI, Request

from personalign.config import config_from_mapping
from personalign.server.context import ServerContext, list_limit, page
from personalign.server.errors import APIError
from personalign.server.personalize import check_method, check_params, check_text_params, learned
from personalign.server.schemas import ProfileBody, shown

__all__ = ["add", "get_owned", "check_profile_fields"]


async def get_owned(ctx: ServerContext, owner: str, user: str) -> dict[str, Any]:
    """The profile ``user`` of key ``owner`` (404 when it has none)."""
    p = await ctx.db(ctx.store.get_profile, owner, user)
    if p is None:
        raise APIError(404, f"unknown profile {shown(user)}.", param="user", code="profile_not_found")
    return p


def check_profile_fields(ctx: ServerContext, fields: dict[str, Any], method: str | None,
                         current: dict[str, Any] | None = None) -> None:
    """400 naming the field when a profile's fields do not hold (limits, forms, the method's parameters,
    the learner: known, learning on this server, read by the profile's method, its parameters)."""
    lim = ctx.limits
    pref = fields.get("preference")
    if pref is not None and len(pref) > lim.max_preference_chars:
        raise APIError(400, f"`preference` is {len(pref)} characters; the limit is {lim.max_preference_chars}.",
                       param="preference", code="preference_too_long")
    for lr in ctx.folds.registered.values():
        if fields.get(lr.field) is not None:
            try:
                lr.check_state(fields[lr.field])
            except ValueError as e:
                msg = str(e)
                raise APIError(400, msg if msg.startswith(f"`{lr.field}") else f"`{lr.field}`: {msg}",
                               param=lr.field) from None
    if method is not None:
        check_method(ctx, method, "method")
        if fields.get("params"):
            check_params(ctx.engine.methods[method], fields["params"], "params")
            check_text_params(ctx, fields["params"], "params")
            try:
                config_from_mapping(type(ctx.engine.methods[method].config), fields["params"])
            except ValueError as e:
                raise APIError(400, f"`params` for {method}: {e}", param="params") from None
    elif fields.get("params"):
        raise APIError(400, "`params` needs a `method` they belong to.", param="params")
    _check_learner(ctx, fields, method, current or {})


def _check_learner(ctx: ServerContext, fields: dict[str, Any], method: str | None, current: dict[str, Any]) -> None:
    learner = fields["learner"] if "learner" in fields else current.get("learner")
    if learner is None:
        if fields.get("learner_params"):
            raise APIError(400, "`learner_params` needs a `learner` they belong to.", param="learner_params")
        return
    if learner not in ctx.folds.registered:
        known = ", ".join(sorted(ctx.folds.registered))
        close = difflib.get_close_matches(learner, sorted(ctx.folds.registered), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise APIError(400, f"unknown learner {shown(learner)}; valid learners: {known}.{hint}", param="learner",
                       code="unknown_learner")
    if learner in ctx.folds.unavailable:
        raise APIError(400, f"learner {learner!r} does not learn on this server: {ctx.folds.unavailable[learner]}.",
                       param="learner", code="learner_unavailable")
    lr = ctx.folds.learners[learner]
    method = method if method is not None else current.get("method")
    if method is not None and method in ctx.engine.methods:
        why = lr.usable(ctx.engine.methods[method])
        if why:
            raise APIError(400, f"learner {learner!r} cannot teach method {method!r}: {why}.", param="learner",
                           code="learner_not_usable")
    params = fields["learner_params"] if "learner_params" in fields else current.get("learner_params")
    try:
        lr.check_params(params or {})
    except ValueError as e:
        raise APIError(400, f"`learner_params` for {learner}: {e}", param="learner_params") from None


def add(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/profiles", status_code=201)
    async def create_profile(body: ProfileBody, request: Request) -> dict[str, Any]:
        owner = await ctx.owner(request)
        if not body.user:
            raise APIError(400, "`user` is required: the id this key uses for the user.", param="user")
        ctx.valid_id(body.user, "user")
        fields = body.model_dump(exclude={"user"}, exclude_none=True)
        check_profile_fields(ctx, fields, body.method)
        out = await ctx.db(ctx.store.create_profile, owner, body.user, fields)
        if out is None:
            raise APIError(409, f"profile {shown(body.user)} exists; change it with PATCH /v1/profiles/{{user}}.",
                           param="user", code="profile_exists")
        return out

    @app.get("/v1/profiles")
    async def list_profiles(request: Request, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        owner = await ctx.owner(request)
        rows, more = await ctx.db(ctx.store.list_profiles, owner, list_limit(limit), ctx.query_id(after, "after"))
        return page(rows, more)

    @app.get("/v1/profiles/{user}")
    async def get_profile(user: str, request: Request) -> dict[str, Any]:
        return await get_owned(ctx, await ctx.owner(request), user)

    @app.get("/v1/profiles/{user}/learned")
    async def learned_for(user: str, request: Request, prompt: str = "", method: str | None = None
                          ) -> dict[str, Any]:
        """What the user's learners would give a request with ``prompt`` decoding with ``method`` (default:
        the method a chat of this user gets): the preference text (the in-context learner's hypothesis and
        the examples it picks for this prompt, after the stated preference) and what each learner shows."""
        owner = await ctx.owner(request)
        profile = await get_owned(ctx, owner, user)
        if len(prompt) > ctx.limits.max_message_chars:
            raise APIError(400, f"`prompt` is {len(prompt)} characters; the limit is {ctx.limits.max_message_chars}.",
                           param="prompt")
        if method is None:
            method = profile.get("method") or ("preference_prompting" if (
                profile.get("preference") or profile.get("learner") == "incontext")
                and "preference_prompting" in ctx.engine.methods else "base")
        check_method(ctx, method, "method")
        got = await learned(ctx, owner, method, profile, [{"role": "user", "content": prompt}],
                            profile.get("preference"))
        return {"object": "profile.learned", "user": user, "method": method, "learner": profile.get("learner"),
                "preference": got.preference, **got.info}

    @app.patch("/v1/profiles/{user}")
    async def update_profile(user: str, body: ProfileBody, request: Request) -> dict[str, Any]:
        owner = await ctx.owner(request)
        fields = body.model_dump(exclude={"user"}, exclude_unset=True)
        if body.user is not None and body.user != user:
            raise APIError(400, "a profile's `user` cannot change; create a new profile.", param="user")
        current = await get_owned(ctx, owner, user)
        check_profile_fields(ctx, fields, fields.get("method", current["method"]) if "params" in fields or "method" in
                             fields else None, current)
        out = await ctx.db(ctx.store.update_profile, owner, user, fields)
        if out is None:
            raise APIError(404, f"unknown profile {shown(user)}.", param="user", code="profile_not_found")
        return out

    @app.delete("/v1/profiles/{user}")
    async def delete_profile(user: str, request: Request, keep_history: bool = False) -> dict[str, Any]:
        """Delete a profile and, unless ``keep_history=true``, the user's feedback and completions."""
        owner = await ctx.owner(request)
        if not keep_history:
            rows, _ = await ctx.db(ctx.store.list_feedback, owner, user, 100_000, None)
            for f in rows:  # folds still running for this user stop before they merge
                await ctx.folds.settle(owner, f.feedback_id)
        out = await ctx.db(lambda: ctx.store.delete_profile(owner, user, keep_history=keep_history))
        if out is None:
            raise APIError(404, f"unknown profile {shown(user)}.", param="user", code="profile_not_found")
        return {"id": user, "object": "profile", "deleted": True, "deleted_feedback": out["feedback"],
                "deleted_completions": out["completions"]}
