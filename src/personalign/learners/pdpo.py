"""``pdpo``: the P-DPO user embedding a served ``pdpo`` checkpoint learns for each user it never saw,
from their feedback (our extension, ``training.pdpo.user_fit``).

After the user's earlier items have merged, an ``EmbeddingFit`` on the item's pairs and the user's most
recent earlier ones (``max_pairs`` in all, ``fit_pairs``) starts from their last embedding (or ``e_0``)
and runs as a fold task in the engine's folding budget, a piece (whole pairs, forward and backward)
per round. Each item keeps the embedding it left (``learned``), so a delete puts back the embedding of
the item before it and ``replay`` refits the later items in order: the embedding equals a fit of the
surviving items from scratch (one pair cannot be taken back out of a fitted embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personalign.learners.base import (
    LEARNERS,
    Contribution,
    Item,
    Learner,
    LearnerEnv,
    Merge,
    RequestView,
    Tasks,
    Undo,
)
from personalign.personas.drift import PreferencePair
from personalign.training.pdpo.data import TokenizedPair, tokenize_pairs
from personalign.training.pdpo.user_fit import (
    EmbeddingFit,
    EmbeddingFitConfig,
    UserEmbedding,
    generic_embedding,
)

__all__ = ["EmbeddingLearner", "fit_pairs"]


def fit_pairs(item: Item | list[PreferencePair], prior: Sequence[Item], max_pairs: int) -> list[PreferencePair]:
    """The pairs one item's fit sees: its own, then those of the user's earlier folded items (``prior``,
    newest first), ``max_pairs`` in all. A fold and a replay choose them by this one rule, so a replay
    repeats the fold exactly."""
    own = list(item) if isinstance(item, list) else item.pairs()
    return (own + [p for fb in prior for p in fb.pairs()])[:max_pairs]


@LEARNERS.register
class EmbeddingLearner(Learner):
    name = "pdpo"
    field = "pdpo_embedding"
    Config = EmbeddingFitConfig
    methods = ("pdpo",)

    def bind(self, env: LearnerEnv) -> str | None:
        super().bind(env)
        self.users = None
        method = env.methods.get("pdpo")
        if method is None:
            return "the server serves no `pdpo` checkpoint"
        users = getattr(method, "users", None)
        if users is None or users.config.kind == "uniform" or method.model not in env.backend.models:
            return "the served `pdpo` checkpoint has no user embedding to fit"
        self.model, self.users, self.index = method.model, users, method.index
        self.tokenizer = env.backend.tokenizer(method.model)
        self.generic = generic_embedding(users)  # e_0, float32 [T_u, D]
        weight = env.backend.models[method.model].get_input_embeddings().weight
        self.embedding_std = float(weight.detach().float().std())
        return None

    def learns(self, profile: dict[str, Any]) -> bool:
        """A ``pdpo`` user (the profile's learner; without one, its method, or an embedding fitted before)
        that the checkpoint never saw (a seen user decodes with their own row)."""
        if self.users is None:
            return False
        learner = profile.get("learner")
        if learner is not None and learner != self.name:
            return False
        if learner is None and profile.get("method") != "pdpo" and profile.get(self.field) is None:
            return False
        uid = profile.get("pdpo_user_id") or profile["user"]
        return uid not in self.index

    def check_state(self, state: Any) -> None:
        UserEmbedding.from_dict(state, self.field)

    def start(self, state: Any) -> UserEmbedding | None:
        """The user's last embedding when it fits this checkpoint's shape."""
        if state is None:
            return None
        try:
            emb = UserEmbedding.from_dict(state)
        except ValueError:
            return None
        return emb if emb.shape == tuple(self.generic.shape) else None

    def tokenize(self, pairs: list[PreferencePair]) -> list[TokenizedPair]:
        return tokenize_pairs(pairs, self.tokenizer, max_prompt_tokens=self.env.max_tokens,
                              max_response_tokens=self.config.max_response_tokens,
                              chat_template=self.env.chat_template)

    async def fit(self, pairs: list[PreferencePair], start: UserEmbedding | None, new_pairs: int,
                  tasks: Tasks) -> UserEmbedding | None:
        """The embedding fitted on ``pairs`` from ``start`` (``e_0`` when None), as a fold task."""
        fit = EmbeddingFit(self.env.backend.models[self.model], self.tokenize(pairs),
                           self.generic if start is None else start.tensor, self.generic, self.config,
                           embedding_std=self.embedding_std)
        done = await tasks.run(fit, self.model)
        if done is None:
            return None
        return done.result((start.num_pairs if start is not None else 0) + new_pairs)

    def prepare(self, pairs: list[PreferencePair], profile: dict[str, Any]) -> list[PreferencePair]:
        return list(pairs)

    async def learn(self, plan: list[PreferencePair], ahead: Any, profile: dict[str, Any], item: Item,
                    prior: Sequence[Item], tasks: Tasks) -> UserEmbedding | None:
        pairs = fit_pairs(plan, prior[:self.config.max_pairs], self.config.max_pairs)
        return await self.fit(pairs, self.start(profile.get(self.field)), len(plan), tasks)

    def merge(self, state: dict[str, Any] | None, plan: Any, result: UserEmbedding, item: Item,
              profile: dict[str, Any]) -> Merge:
        d = result.to_dict()
        return Merge(d, learned=d)

    def undo(self, state: dict[str, Any] | None, item: Item, before: Any, profile: dict[str, Any],
             others: Sequence[Item] = ()) -> Undo:
        if not item.learned or self.name not in item.learned:  # it taught no embedding
            return Undo()
        return Undo(state=before, changed=True, replay=True)

    async def replay(self, profile: dict[str, Any], items: Sequence[Item], first: int, start: Any,
                     tasks: Tasks) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        emb = self.start(start)
        learned: dict[str, Any] = {}
        for j in range(first, len(items)):
            if not items[j].learned or self.name not in items[j].learned:  # it taught no embedding
                continue
            pairs = fit_pairs(items[j], items[:j][::-1][:self.config.max_pairs], self.config.max_pairs)
            emb = await self.fit(pairs, emb, len(items[j].rejected_texts), tasks)
            if emb is None:
                return None  # superseded
            learned[items[j].feedback_id] = emb.to_dict()
        return learned, None if emb is None else emb.to_dict()

    async def request(self, state: dict[str, Any] | None, view: RequestView) -> Contribution:
        if view.method != "pdpo":
            return Contribution()
        if view.profile.get("pdpo_user_id"):
            return Contribution(params={"user": view.profile["pdpo_user_id"]})
        if state is None:
            return Contribution()
        return Contribution(params={"user_embedding": state},
                            info={"pdpo": {"fitted_embedding": True, "num_pairs": state.get("num_pairs"),
                                           "sha256": state.get("sha256")}})
