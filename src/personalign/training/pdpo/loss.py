"""P-RLHF objectives as pure functions of sequence log-probs and rewards.

Paper: Li et al., P-RLHF, Section 3 (eq. 5, vanilla DPO), Section 4.4 (P-DPO), Appendix F.2
(personalized reward model), Appendix F.3 (P-IPO). Inputs are float [B] summed log-probs of whole
responses: ``policy_*`` = log pi_p(y | x, u), ``reference_*`` = log pi_SFT(y | x); ``chosen`` = y_1,
``rejected`` = y_2.

* DPO:  ``l = -log sigma(beta * h)``, ``h = (log pi(y1) - log ref(y1)) - (log pi(y2) - log ref(y2))``.
* IPO (Azar et al. 2024): ``l = (h - 1/(2 beta))^2``.
* P-DPO / P-IPO: ``alpha * l(pi_p(. | x, u_t, u_p)) + (1 - alpha) * l(pi_p(. | x, u_t, u_0))``: the user's
  own term plus the same pair seen through the generic user 0.
* Bradley-Terry (eq. 1) and the personalized RM loss (F.2):
  ``-alpha log sigma(r(x,y1,u) - r(x,y2,u)) - (1 - alpha) log sigma(r(x,y1,u_0) - r(x,y2,u_0))``.

With ``alpha = 1`` the generic term vanishes and P-DPO is exactly DPO on the user-conditioned policy;
with the empty uniform user model that policy is the plain LLM (vanilla DPO). When the policy equals
the reference, ``h = 0`` and the DPO loss is ``log 2`` for every alpha and beta.

NOTE: the paper prints the IPO term as a ratio of log-probs, ``log pi(y1) / log pi(y2)``; we implement
IPO as defined by Azar et al., ``h = log(pi(y1)/pi(y2)) - log(ref(y1)/ref(y2))``, which the printed
form abbreviates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from personalign.config import check_positive

__all__ = [
    "check_alpha",
    "check_beta",
    "dpo_margin",
    "dpo_loss",
    "ipo_loss",
    "implicit_reward",
    "mix",
    "pdpo_loss",
    "pipo_loss",
    "bradley_terry_loss",
    "personalized_rm_loss",
    "PREFERENCE_LOSSES",
]


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def check_beta(beta: float) -> float:
    check_positive("beta", beta)
    return float(beta)


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> torch.Tensor:
    """``h`` [B]: the policy's log-ratio of the pair minus the reference's."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def implicit_reward(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """``r_p(x, y, u) = beta * log(pi_p(y | x, u) / pi_SFT(y | x))`` [B] (paper App. C.3)."""
    return check_beta(beta) * (policy - reference)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float) -> torch.Tensor:
    """Per-pair DPO loss [B] (eq. 5): ``-log sigma(beta * h)``."""
    beta = check_beta(beta)
    return -F.logsigmoid(beta * dpo_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def ipo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float) -> torch.Tensor:
    """Per-pair IPO loss [B]: ``(h - 1 / (2 beta))^2``."""
    beta = check_beta(beta)
    h = dpo_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss}


def mix(user_term: torch.Tensor, generic_term: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``alpha * user_term + (1 - alpha) * generic_term``; with ``alpha = 1`` exactly ``user_term``.

    ``generic_term`` may be None only when ``alpha = 1`` (the generic forward is then skipped).
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return user_term
    if generic_term is None:
        raise ValueError(f"`alpha` = {alpha} < 1 needs the generic-user (user 0) term.")
    return alpha * user_term + (1.0 - alpha) * generic_term


def pdpo_loss(
    user_chosen: torch.Tensor,
    user_rejected: torch.Tensor,
    generic_chosen: torch.Tensor | None,
    generic_rejected: torch.Tensor | None,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    loss: str = "dpo",
) -> torch.Tensor:
    """Per-pair P-DPO (``loss="dpo"``) or P-IPO (``loss="ipo"``) loss [B] (Section 4.4, App. F.3).

    Args:
        user_chosen, user_rejected: float [B] log pi_p(y | x, u_t, u_p) with the user's own row.
        generic_chosen, generic_rejected: float [B] log pi_p(y | x, u_t, u_0) (None allowed at alpha = 1).
        reference_chosen, reference_rejected: float [B] log pi_SFT(y | x) (no user prompt).
    """
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"`loss` must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss!r}.")
    fn = PREFERENCE_LOSSES[loss]
    check_alpha(alpha)
    user = fn(user_chosen, user_rejected, reference_chosen, reference_rejected, beta)
    generic = None
    if generic_chosen is not None and generic_rejected is not None:
        generic = fn(generic_chosen, generic_rejected, reference_chosen, reference_rejected, beta)
    return mix(user, generic, alpha)


def pipo_loss(*args: torch.Tensor | None, beta: float, alpha: float) -> torch.Tensor:
    """Per-pair P-IPO loss [B] (App. F.3); same arguments as ``pdpo_loss``."""
    return pdpo_loss(*args, beta=beta, alpha=alpha, loss="ipo")


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood [B] (eq. 1): ``-log sigma(r1 - r2)``."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def personalized_rm_loss(
    user_chosen: torch.Tensor,
    user_rejected: torch.Tensor,
    generic_chosen: torch.Tensor | None,
    generic_rejected: torch.Tensor | None,
    *,
    alpha: float,
) -> torch.Tensor:
    """Per-pair personalized reward-model loss [B] (App. F.2), rewards float [B] with user u / user 0."""
    generic = None
    if generic_chosen is not None and generic_rejected is not None:
        generic = bradley_terry_loss(generic_chosen, generic_rejected)
    return mix(bradley_terry_loss(user_chosen, user_rejected), generic, alpha)
