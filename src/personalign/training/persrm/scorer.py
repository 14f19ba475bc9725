"""The PersRM as a text reward: ``R(p, x, y) = β Σ_t w_pᵀ φ(s_t, a_t)`` for a preference ``p``
(seed 000, Eq. 8 without V*(s_1)), behind the ``views.reward.RewardScorer`` protocol (ARGS and best-of-N
guided by a PersRM, the eval ``reward`` metric)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personalign.views.reward import check_lengths

__all__ = ["PersRMScorer"]


class PersRMScorer:
    """The PersRM's sequence-level reward for one preference (or per-row preferences)."""

    uses_preference = True

    def __init__(self, persrm: Any, preference: str | None = None, *, chat_template: bool = True) -> None:
        self.persrm, self.preference, self.chat_template = persrm, preference, chat_template
        self.tokenizer = persrm.tokenizer

    def score(self, prompts: list[str], responses: list[str], preferences: Sequence[str] | None = None) -> list[float]:
        check_lengths(prompts, responses)
        prefs = list(preferences) if preferences is not None else [self.preference] * len(prompts)
        if any(not p for p in prefs):
            raise ValueError("`preference` must be a non-empty text for the PersRM reward.")
        return self.persrm.sequence_reward(prompts, responses, prefs, chat_template=self.chat_template)
