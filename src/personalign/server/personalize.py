"""Which method, preference and parameters a chat request decodes with (per method, for a request
that asks for ``personalization.methods``: one choice each).

Precedence, field by field: the request's ``personalization`` > the user's stored profile > the
server default (``base``; ``preference_prompting`` when only a preference is known).

* the profile is ``personalization.profile_id`` (404 when this key has no such profile) or else
  the OpenAI ``user`` field (a user without a profile simply gets the defaults);
* stored parameters apply only when the request decodes with the profile's own method;
* what the user's learners hold gives the request (``learned``, each learner's ``request``): the Drift
  weights and the P-DPO user id or fitted embedding as method parameters, the in-context learner's
  hypothesis and examples as the preference text (after the stated one); a ``pdpo`` request of a
  profile without a ``pdpo_user_id`` decodes as the user of the same id (the ``user`` field or
  ``profile_id``), a user the checkpoint never saw getting the generic user embedding;
* a profile whose learner is ``incontext`` and names no method decodes with ``preference_prompting`` once
  that learner holds something (``base`` before); a method that reads a preference, for such a user with
  nothing learned and nothing stated, is a 400 (``nothing_learned_yet``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from personalign.decoding.method import Method
from personalign.learners import Contribution, RequestView
from personalign.server.context import Choice, ServerContext
from personalign.server.errors import APIError
from personalign.server.schemas import ChatRequest

__all__ = ["resolve", "learned", "check_method", "check_params", "check_text_params", "check_drift_state"]


def check_method(ctx: ServerContext, method: str, param: str) -> None:
    """400 listing the served methods when ``method`` is not one of them."""
    if method in ctx.engine.methods:
        return
    served = ", ".join(sorted(ctx.engine.methods))
    why = ctx.unavailable.get(method)
    if why:
        raise APIError(400, f"method {method!r} is not served here: {why}. Served methods: {served}.", param=param,
                       code="method_unavailable")
    close = difflib.get_close_matches(method, sorted(ctx.engine.methods), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise APIError(400, f"unknown method {method!r}; valid methods: {served}.{hint}", param=param,
                   code="unknown_method")


def check_params(method_obj: Method, params: dict[str, Any], param: str) -> None:
    """400 naming the method's valid parameters when ``params`` holds another key."""
    names = [f.name for f in dataclasses.fields(method_obj.Config) if f.init]
    for k in params:
        if k not in names:
            valid = ", ".join(names) if names else "none (it takes no parameters)"
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise APIError(400, f"unknown parameter {k!r} for method {method_obj.name!r}; valid: {valid}.{hint}",
                           param=f"{param}.{k}", code="unknown_parameter")


def check_text_params(ctx: ServerContext, params: dict[str, Any], param: str) -> None:
    """400 when a string method parameter (a text a model reads, e.g. P-DPO's ``user_text``) is longer
    than ``max_preference_chars`` or holds an unpaired surrogate."""
    lim = ctx.limits.max_preference_chars
    for k, v in params.items():
        if isinstance(v, str):
            if len(v) > lim:
                raise APIError(400, f"`{param}.{k}` is {len(v)} characters; the limit is {lim}.",
                               param=f"{param}.{k}", code="parameter_too_long")
            if any("\ud800" <= ch <= "\udfff" for ch in v):
                raise APIError(400, f"`{param}.{k}` contains an unpaired surrogate; send valid Unicode.",
                               param=f"{param}.{k}")


def check_drift_state(ctx: ServerContext, method: str, profile: dict[str, Any] | None) -> None:
    """400 when ``drift`` would decode a user with no Drift profile and the server has no default one."""
    if method != "drift" or profile is None or profile.get("drift_profile") is not None:
        return
    if getattr(getattr(ctx.engine.methods[method], "config", None), "profile", None) is not None:
        return
    raise APIError(400, f"user {profile['user']!r} has no Drift profile yet: post pairwise feedback "
                   "(POST /v1/feedback) or set `drift_profile` on the profile.", param="personalization.method",
                   code="no_drift_profile")


async def learned(ctx: ServerContext, owner: str, method: str, profile: dict[str, Any] | None,
                  messages: list[dict[str, str]], stated: str | None) -> Contribution:
    """What the user's learners give a request decoding with ``method``: method parameters (the Drift
    weights, the P-DPO user or embedding) and a preference text (what the in-context learner learned,
    after the stated preference), merged over every learner in registration order."""
    out = Contribution(preference=stated)
    if profile is None:
        return out

    async def history(limit: int) -> list[Any]:
        return await ctx.db(ctx.store.recent_feedback, owner, profile["user"], limit)
    view = RequestView(method=method, method_obj=ctx.engine.methods[method], messages=messages, stated=stated,
                       profile=profile, history=history)
    for lr in ctx.folds.registered.values():
        c = await lr.request(profile.get(lr.field), view)
        out.params.update(c.params)
        out.info.update(c.info)
        if c.preference is not None:
            out.preference = c.preference
    return out


async def resolve(ctx: ServerContext, owner: str, body: ChatRequest) -> list[Choice]:
    """How one chat request decodes, once per method it asks for: ``personalization.methods`` (one
    choice each, in order), else the one resolved method."""
    pers = body.personalization
    profile_id = pers.profile_id if pers is not None and pers.profile_id else body.user
    profile = await ctx.db(ctx.store.get_profile, owner, profile_id) if profile_id else None
    if pers is not None and pers.profile_id and profile is None:
        raise APIError(404, f"unknown profile {pers.profile_id!r}: create it with POST /v1/profiles.",
                       param="personalization.profile_id", code="profile_not_found")
    preference = (pers.preference if pers is not None and pers.preference else None) or \
        (profile or {}).get("preference")
    if preference is not None and len(preference) > ctx.limits.max_preference_chars:
        where = "personalization.preference" if pers is not None and pers.preference else "preference"
        raise APIError(400, f"the preference is {len(preference)} characters; the limit is "
                       f"{ctx.limits.max_preference_chars}.", param=where, code="preference_too_long")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if pers is not None and pers.methods is not None:
        if pers.method is not None:
            raise APIError(400, "give `personalization.method` or `personalization.methods`, not both.",
                           param="personalization.methods")
        methods = [(m, f"personalization.methods[{i}]") for i, m in enumerate(pers.methods)]
    else:
        # a user whose in-context learner has learned something is answered from it
        reads = bool(preference) or ((profile or {}).get("learner") == "incontext" and bool(profile.get("incontext")))
        method = (pers.method if pers is not None and pers.method else None) or (profile or {}).get("method") or \
            ("preference_prompting" if reads and "preference_prompting" in ctx.engine.methods else "base")
        methods = [(method, "personalization.method")]
    out = []
    for method, where in methods:
        check_method(ctx, method, where)
        params: dict[str, Any] = {}
        if profile is not None and profile.get("method") == method:
            params.update(profile.get("params") or {})
        check_drift_state(ctx, method, profile)
        got = await learned(ctx, owner, method, profile, messages, preference)
        params.update(got.params)
        if pers is not None:
            check_params(ctx.engine.methods[method], pers.params(), "personalization")
            check_text_params(ctx, pers.params(), "personalization")
            params.update(pers.params())
        if got.preference is None and profile is not None and profile.get("learner") == "incontext" and \
                getattr(ctx.engine.methods[method], "reads_preference", False):
            raise APIError(400, f"user {profile['user']!r}'s in-context learner has learned nothing yet and no preference "
                           "is stated: post feedback (POST /v1/feedback), state a preference, or ask for method "
                           "`base`.", param="personalization.method", code="nothing_learned_yet")
        info = {"method": method, "preference": got.preference, "profile_id": profile["user"] if profile else None,
                "params": {k: v for k, v in params.items() if k not in ("profile", "user_embedding") and _jsonable(v)},
                **got.info}
        out.append(Choice(method=method, preference=got.preference, params=params, user=profile_id, info=info))
    return out


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))
