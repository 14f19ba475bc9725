"""``linear_alignment``: a linear step of the preference-prompted policy away from the base policy.

Paper: Gao et al., "Linear Alignment: A Closed-form Solution for Aligning Human Preferences without
Tuning and Feedback" (ICML 2024) — the baseline Amulet (seed 004) compares against.

Two views of the same model per request (as in Amulet): ``π_1 = π(· | p_pref, x, y_<n)`` with the
preference as the system message, and ``π_base = π(· | x, y_<n)``. The next-token distribution is

    log π*(a) = log_softmax( (1 + r) log π_1(a) − r log π_base(a) )   for a in N_p(π_1),
    π*(a)     = 0                                                      otherwise,

where ``N_p(π_1)`` is the top-p nucleus of π_1 (the fewest most likely tokens whose mass reaches p;
the best token always inside). The nucleus is the plausibility set: the contrast
``log π_1 − log π_base`` is large on tokens both views find unlikely, and without it those
implausible tokens would win. ``r = 0`` is preference prompting restricted to the nucleus.

Naive reference (used by the tests): sort π_1, keep the prefix until the mass reaches p, apply the
formula on those tokens, renormalize.

Per-row ``r`` and ``p`` are tensors ``[B]``, so requests with different settings share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personalign.config import check_positive, check_unit
from personalign.decoding.filters import top_p_keep
from personalign.decoding.method import METHODS, DecodeState
from personalign.methods.amulet import BASE_LOGPROB_FLOOR
from personalign.methods.prompt_views import PairViewMethod
from personalign.views.base import Backend

__all__ = ["LinearAlignmentConfig", "LinearAlignmentMethod", "linear_align"]


@dataclass(frozen=True, kw_only=True)
class LinearAlignmentConfig:
    """Linear Alignment's parameters.

    Attributes:
        ratio: r >= 0, the step size away from the base policy.
        top_p: p in (0, 1], mass of the π_1 nucleus the result is restricted to (1 = whole vocabulary).
    """

    ratio: float = 1.0
    top_p: float = 0.9

    def __post_init__(self) -> None:
        r, p = self.ratio, self.top_p
        check_positive("ratio", r, allow_zero=True, hint="0 = preference prompting")
        check_unit("top_p", p, hint="1 = whole vocabulary")


def linear_align(
    pref_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    ratio: torch.Tensor | float,
    top_p: torch.Tensor | float,
) -> torch.Tensor:
    """``(1 + r) log π_1 − r log π_base`` on the top-p nucleus of π_1, renormalized.

    Args:
        pref_logprobs: float [B, V], log π_1.
        base_logprobs: float [B, V], log π_base.
        ratio: float [B] (or a scalar), r per row.
        top_p: float [B] (or a scalar), p per row.

    Returns:
        float32 [B, V] normalized log-probs, −inf outside each row's nucleus.
    """
    lp1 = torch.log_softmax(pref_logprobs.float(), dim=-1)
    # A −inf base log-prob would make the score +inf: floor it (as Amulet does).
    lpb = torch.log_softmax(base_logprobs.float(), dim=-1).clamp(min=BASE_LOGPROB_FLOOR)
    B, dev = lp1.shape[0], lp1.device
    r = torch.as_tensor(ratio, dtype=torch.float32, device=dev).expand(B)[:, None]
    p = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(B)
    keep = top_p_keep(lp1, p)
    scores = ((1.0 + r) * lp1 - r * lpb).masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


@METHODS.register
class LinearAlignmentMethod(PairViewMethod):
    """Linear Alignment: π_1 pushed linearly away from π_base inside π_1's nucleus."""

    name = "linear_alignment"
    reads_preference = True
    Config = LinearAlignmentConfig

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        dev = state.views.last_logprobs.device
        state.extra["linear_alignment"] = {
            "ratio": torch.tensor([c.ratio for c in state.configs], dtype=torch.float32, device=dev),
            "top_p": torch.tensor([c.top_p for c in state.configs], dtype=torch.float32, device=dev),
        }

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        p = state.extra["linear_alignment"]
        return linear_align(logprobs[:, 0], logprobs[:, 1], p["ratio"], p["top_p"])
