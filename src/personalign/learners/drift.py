"""``drift``: the user as weights over attribute prompts (Drift, seed 002), learned from their choices.

The state is a Drift profile (``personas.drift.DriftProfile.to_dict``): the attribute pool and, per
pair, the per-attribute log-likelihood-ratio rewards of the chosen and the rejected reply measured by
the steering model; the weights ``p = v / ‖v‖`` follow from them. A new pair only adds its own rows,
so the expensive part of a fold — scoring the replies under the base and every attribute prompt,
``n (A + 1)`` teacher-forced sequences for an item of ``n`` replies — runs ``ahead`` of the user's
earlier items, and the merge appends rows. A delete takes the item's rows back out: exact, no
replay. A new user's pool is ``DriftLearnerConfig.pool`` (the default pool, or the subset of it
``pool_size`` draws once with ``pool_seed``: the same for every user of the server).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.config import check_int
from personalign.learners.base import (
    LEARNERS,
    Contribution,
    FoldRejected,
    Item,
    Learner,
    LearnerEnv,
    Merge,
    RequestView,
    Tasks,
    Undo,
)
from personalign.personas import drift
from personalign.personas.attributes import AttributePool, default_pool
from personalign.personas.identity import compare_identity, steer_identity

__all__ = ["DriftLearner", "DriftLearnerConfig", "DriftPlan", "item_pair_id", "pool_subset", "thompson_profile"]


def item_pair_id(feedback_id: str, pair: drift.PreferencePair) -> str:
    """The id of the Drift row one item folded for ``pair``: the pair's content id and the item's id, so
    two items stating the same pair fold two rows, and deleting one takes back exactly its own."""
    return f"{pair.pair_id}@{feedback_id}"


def pool_subset(pool: AttributePool, size: int, seed: int) -> AttributePool:
    """``size`` attributes of ``pool`` drawn at random with ``seed`` (in the pool's order); the whole
    pool when ``size`` is 0 or covers it."""
    if size <= 0 or size >= len(pool):
        return pool
    keep = set(random.Random(seed).sample(range(len(pool)), size))
    return AttributePool(pool.base, tuple(a for i, a in enumerate(pool.attributes) if i in keep))


@dataclass(frozen=True)
class DriftLearnerConfig:
    """How a new user's Drift profile is set up.

    Attributes:
        pool_size: attributes of the default pool a new user's profile scores (0: all of them). Each
            attribute costs two scored sequences per pair, so a fold's time follows it.
        pool_seed: the seed of the one draw of those attributes (the same subset for every user).
        max_response_tokens: reply tokens scored per sequence (0: whole replies).
        top_m: attributes a profile decodes with.
    """

    pool_size: int = 16
    pool_seed: int = 0
    max_response_tokens: int = drift.FIT_RESPONSE_TOKENS
    top_m: int = 7

    def __post_init__(self) -> None:
        check_int("pool_size", self.pool_size, 0, hint="0 = the whole default pool")
        check_int("pool_seed", self.pool_seed, 0)
        check_int("max_response_tokens", self.max_response_tokens, 0, hint="0 = whole replies")
        check_int("top_m", self.top_m, 1)

    @property
    def pool(self) -> AttributePool:
        return pool_subset(default_pool(), self.pool_size, self.pool_seed)


@dataclass(frozen=True)
class DriftPlan:
    """What to score for one item (its pairs share the prompt and the chosen reply), and the pool and
    scoring settings of the user's profile at the time (or a new profile's)."""

    pairs: list[drift.PreferencePair]
    rows: list[tuple[list[int], list[int]]]
    pool: AttributePool
    chat_template: bool
    max_response_tokens: int | None
    top_m: int = 7


@LEARNERS.register
class DriftLearner(Learner):
    name = "drift"
    field = "drift_profile"
    Config = DriftLearnerConfig
    methods = ("drift",)

    def bind(self, env: LearnerEnv) -> str | None:
        super().bind(env)
        self.tokenizer = env.backend.tokenizer(env.steer_key)
        self.identity = steer_identity(env.backend.models[env.steer_key], self.tokenizer)
        return None

    def learns(self, profile: dict[str, Any]) -> bool:
        """Today's rule: every user without another learner named learns Drift weights."""
        return profile.get("learner") in (None, self.name)

    def check_state(self, state: Any) -> None:
        drift.DriftProfile.from_dict(state)

    def prepare(self, pairs: list[drift.PreferencePair], profile: dict[str, Any]) -> DriftPlan:
        """The item's scoring rows under the user's pool (blocking: tokenizes).

        Raises:
            FoldRejected: a sequence over the token limit or the steering model's context, a profile fitted
                with another steering model or with hand-set weights, a reply that encodes to nothing.
        """
        env = self.env
        pair = pairs[0]
        stored = profile.get(self.field)
        if stored is None:
            cfg = self.config_for(profile)
            pool, chat, max_resp, top_m = cfg.pool, env.chat_template, cfg.max_response_tokens or None, cfg.top_m
        else:
            prof = drift.DriftProfile.from_dict(stored)
            if prof.manual_weights is not None:
                raise FoldRejected("user", f"user {profile['user']!r} has a Drift profile with hand-set weights; "
                                           "set a fitted one (or none) to learn from feedback.")
            try:
                compare_identity(prof.steer, self.identity, f"user {profile['user']!r}'s Drift profile")
            except ValueError as e:
                raise FoldRejected("user", str(e)) from None
            pool, chat, max_resp, top_m = prof.pool, prof.chat_template, prof.max_response_tokens, prof.top_m
        replies = [pair.chosen, *(p.rejected for p in pairs)]
        try:
            rows = drift.score_rows(self.tokenizer, pair.prompt, replies, pool,
                                    chat_template=chat, max_response_tokens=max_resp)
        except ValueError as e:  # a reply that encodes to no token
            raise FoldRejected("chosen", str(e)) from None
        longest = max(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        n = len(rows[longest][0]) + len(rows[longest][1])
        if n > env.max_tokens:
            which = "chosen" if longest < len(rows) // len(replies) else "rejected"
            raise FoldRejected(which, f"the prompt and `{which}` are {n} tokens under the steering model's attribute "
                                      f"prompts; the limit is {env.max_tokens} (max_feedback_tokens, and the model's "
                                      "context).")
        return DriftPlan(pairs=list(pairs), rows=rows, pool=pool, chat_template=chat, max_response_tokens=max_resp,
                         top_m=top_m)

    async def ahead(self, plan: DriftPlan, tasks: Tasks) -> Any:
        logprobs = await tasks.score(plan.rows, self.env.steer_key)
        if logprobs is None:
            return None
        return drift.rewards_from_scores(logprobs, 1 + len(plan.pairs), plan.pool)

    def merge(self, state: dict[str, Any] | None, plan: DriftPlan, result: Any, item: Item,
              profile: dict[str, Any]) -> Merge:
        if state is None:
            prof = drift.DriftProfile.empty(self.identity, plan.pool, top_m=plan.top_m, chat_template=plan.chat_template,
                                            max_response_tokens=plan.max_response_tokens)
        else:
            prof = drift.DriftProfile.from_dict(state)
            if prof.pool.to_dict() != plan.pool.to_dict():
                raise ValueError("the user's Drift profile was replaced with another attribute pool while this "
                                 "feedback was folded; post it again to score it under the new pool.")
        wins, losses = result[0], result[1:]
        for pair, loss in zip(plan.pairs, losses):
            prof.add_rewards(item_pair_id(item.feedback_id, pair), wins, loss)
        return Merge(prof.to_dict())

    def undo(self, state: dict[str, Any] | None, item: Item, before: Any, profile: dict[str, Any],
             others: Sequence[Item] = ()) -> Undo:
        """The profile without the item's rows. Rows an earlier release folded carry the pair's content id
        alone (one row for every item stating that pair): they go only when no other folded item
        (``others``) states the pair."""
        if state is None:
            return Undo()
        new = unfold(state, item)
        if new is None:
            mine = {p.pair_id for p in item.pairs()}
            if not any(mine & {p.pair_id for p in o.pairs()} for o in others if o.feedback_id != item.feedback_id):
                new = unfold(state, item, legacy=True)
        return Undo() if new is None else Undo(state=new, changed=True)

    async def request(self, state: dict[str, Any] | None, view: RequestView) -> Contribution:
        if view.method != "drift" or state is None:
            return Contribution()
        return Contribution(params={"profile": state},
                            info={"drift": {"num_pairs": state.get("num_pairs"),
                                            "selected": {a["name"]: a["weight"] for a in state.get("selected", [])}}})


def unfold(state: dict[str, Any], item: Item, legacy: bool = False) -> dict[str, Any] | None:
    """``state`` without the rows ``item`` folded; None when none of them is in it (``legacy``: the
    rows of an earlier release, by the pair's content id)."""
    prof = drift.DriftProfile.from_dict(state)
    pairs = item.pairs()
    ids = [p.pair_id for p in pairs] if legacy else [item_pair_id(item.feedback_id, p) for p in pairs]
    present = [i for i in ids if i in prof.pair_ids]
    if not present:
        return None
    for i in present:
        prof.remove_pair(i)
    return prof.to_dict()


def thompson_profile(state: dict[str, Any], seed: int) -> dict[str, Any]:
    """A draw of the user's Drift weights from their uncertainty (bootstrap Thompson sampling): the
    profile's pairs resampled with replacement (``seed``), so an attribute that only some of the user's
    choices support may win or lose weight. Alternatives decoded with a draw explore what the
    estimate is unsure of, where two samples of one estimate differ only by sampling noise."""
    prof = drift.DriftProfile.from_dict(state)
    n = prof.num_pairs
    if n == 0 or prof.manual_weights is not None:
        raise ValueError("needs a Drift profile fitted from at least one pair.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n,), generator=g)
    draw = drift.DriftProfile(pool=prof.pool, wins=prof.wins[idx], losses=prof.losses[idx],
                              pair_ids=[f"{prof.pair_ids[i]}#{k}" for k, i in enumerate(idx.tolist())],
                              steer=prof.steer, top_m=prof.top_m, solver=prof.solver, chat_template=prof.chat_template,
                              max_response_tokens=prof.max_response_tokens)
    return draw.to_dict()
