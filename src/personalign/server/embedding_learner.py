"""The P-DPO embedding a served ``pdpo`` checkpoint learns for each user it never saw, from their
feedback (``training.pdpo.user_fit``): which users learn, where a fit starts, and which pairs it sees.
``server.folding`` runs the fits as fold tasks and replays them after a delete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personalign.personas.drift import PreferencePair
from personalign.server.store import StoredFeedback
from personalign.training.pdpo.data import TokenizedPair, tokenize_pairs
from personalign.training.pdpo.user_fit import EmbeddingFitConfig, UserEmbedding, generic_embedding
from personalign.views.base import Backend

__all__ = ["EmbeddingLearner", "fit_pairs"]



def fit_pairs(item: StoredFeedback | list[PreferencePair], prior: list[StoredFeedback],
              max_pairs: int) -> list[PreferencePair]:
    """The pairs one item's P-DPO embedding fit sees: its own, then those of the user's earlier folded
    items (``prior``, newest first), ``max_pairs`` in all. The fold of a new item and the replay after a
    delete choose them by this one rule, so a replay repeats the fold exactly."""
    own = item.pairs() if isinstance(item, StoredFeedback) else list(item)
    return (own + [p for fb in prior for p in fb.pairs()])[:max_pairs]


@dataclass(frozen=True, eq=False)
class EmbeddingLearner:
    """A served ``pdpo`` checkpoint whose new users' embeddings are fitted from their feedback."""

    model: str  # the backend key of the personalized LLM
    users: Any  # the checkpoint's UserModel
    index: Any  # its UserIndex
    tokenizer: Any
    chat_template: bool
    config: EmbeddingFitConfig
    generic: Any  # e_0, float32 [T_u, D]
    embedding_std: float
    max_prompt_tokens: int

    @classmethod
    def of(cls, method: Any, backend: Backend, *, chat_template: bool, config: EmbeddingFitConfig,
           max_prompt_tokens: int) -> EmbeddingLearner | None:
        """The learner of a served ``pdpo`` method; None when its user model has no embedding to fit."""
        users = getattr(method, "users", None)
        if users is None or users.config.kind == "uniform" or method.model not in backend.models:
            return None
        weight = backend.models[method.model].get_input_embeddings().weight
        return cls(model=method.model, users=users, index=method.index, tokenizer=backend.tokenizer(method.model),
                   chat_template=chat_template, config=config, generic=generic_embedding(users),
                   embedding_std=float(weight.detach().float().std()), max_prompt_tokens=max_prompt_tokens)

    def learns(self, profile: dict[str, Any]) -> bool:
        """Whether this is a ``pdpo`` user (their profile's method, or an embedding fitted before) that
        the checkpoint never saw (a seen user decodes with their own row)."""
        if profile.get("method") != "pdpo" and profile.get("pdpo_embedding") is None:
            return False
        uid = profile.get("pdpo_user_id") or profile["user"]
        return uid not in self.index

    def start(self, profile: dict[str, Any]) -> UserEmbedding | None:
        """The user's last embedding when it fits this checkpoint's shape."""
        stored = profile.get("pdpo_embedding")
        if stored is None:
            return None
        try:
            emb = UserEmbedding.from_dict(stored)
        except ValueError:
            return None
        return emb if emb.shape == tuple(self.generic.shape) else None

    def tokenize(self, pairs: list[PreferencePair]) -> list[TokenizedPair]:
        return tokenize_pairs(pairs, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens,
                              max_response_tokens=self.config.max_response_tokens, chat_template=self.chat_template)
