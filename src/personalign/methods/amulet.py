"""``amulet``: per-token online realignment toward a stated preference (FTRL-proximal, closed form).

Paper: Zhang et al., "Amulet: ReAlignment During Test Time for Personalized Preference Adaptation of
LLMs" (ICLR 2025), Eq. 3–6 and Algorithm 1; defaults from Section 4.3 (T = 60, α = 2, λ = 2, η = 10).

Two views of the same model per request, advanced together by one batched, cached forward per step:

* ``π_1    = π(· | p_pref, x, y_<n)`` — the prompt with the preference as the system message;
* ``π_base = π(· | x, y_<n)``         — the plain prompt.

At every token, starting from ``π_1``, T iterations of the FTRL-proximal dynamics (Eq. 5)

    π_{t+1} = argmax_π  Σ_{i≤t} [⟨u_i, π⟩ − λ KL(π ‖ π_1)] − (1/η) KL(π ‖ π_t),
    u_t     = α (log π_t − log π_base)                                             (Eq. 3)

each solved in closed form (Eq. 6; setting the gradient of the Lagrangian to zero):

    log π_{t+1} = log_softmax( (η Σ_{i≤t} u_i + λ η t log π_1 + log π_t) / (λ η t + 1) ).

The realigned ``π_{T+1}`` then goes through the normal sampler (greedy by default; temperature,
top-k and top-p honoured). ``T = 0`` is exactly preference prompting.

Two equivalent implementations, both float32 log space, vectorized over batch and vocabulary, every
parameter a per-row tensor ``[B]`` (requests with different settings share a batch):

* ``amulet_iterates`` — the literal loop: T vocabulary-wide updates of Eq. 6 per token
  (``iterate_vocab=True``; also the reference the tests check against a numerical optimizer of Eq. 5).
* ``amulet_coefficients`` + ``amulet_realign`` (default) — every iterate is
  ``log π_t = log_softmax(c_t log π_1 + d_t log π_base)``: Eq. 6 is affine in the log-policies and the
  normalizing constants cancel, so the T iterations run on two scalars per request (once, at
  prepare) and each token costs one fused vocabulary pass. ``c_t + d_t = 1`` at every t, i.e.
  Amulet is ``(1 + r_T) log π_1 − r_T log π_base`` over the whole vocabulary with an effective
  ratio ``r_T = −d_{T+1}`` (4.65 at the defaults); the tests check it equals the literal loop.
  As T → ∞, ``r_T → α / (λ − α)`` when α < λ (the fixed point π* ∝ π_1 exp(u*/λ) of Eq. 5);
  ``r_T`` grows like log T when α = λ (the paper's defaults) and faster when α > λ.

Naive reference (used by the tests): separate uncached forwards of each view on the growing text,
then the literal loop on one row at a time.

NOTE: the authors' released code re-runs two full uncached forwards per token and decodes greedily;
here both views share one cached forward and any sampler setting is honoured.
NOTE: for α > λ the dynamics diverge (the effective ratio below grows without bound in T); a
config whose effective ratio exceeds ``MAX_EFFECTIVE_RATIO`` (10^6; the output is one-hot in float32
long before) is rejected with an error instead of overflowing to NaN.
NOTE: ``log π_base`` is floored at ``BASE_LOGPROB_FLOOR`` so a token the base view rules out
(−inf) cannot make the utility infinite; tokens ruled out by ``π_1`` stay ruled out (−inf), as the
KL(π ‖ π_1) term requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from personalign.config import check_bool, check_int, check_positive
from personalign.decoding.method import METHODS, DecodeState
from personalign.methods.prompt_views import PairViewMethod, build_pair_views
from personalign.views.base import Backend

__all__ = [
    "AmuletConfig",
    "AmuletMethod",
    "amulet_iterates",
    "amulet_coefficients",
    "amulet_realign",
    "BASE_LOGPROB_FLOOR",
    "MAX_EFFECTIVE_RATIO",
    "build_pair_views",
]

BASE_LOGPROB_FLOOR = -1.0e4
MAX_ITERATIONS = 10_000
MAX_EFFECTIVE_RATIO = 1.0e6


@dataclass(frozen=True, kw_only=True)
class AmuletConfig:
    """Amulet's parameters: α, λ, η are the paper's (Section 4.3); ``iterations`` counts Eq. 6 updates,
    one more than the paper's T = 60 runs (``preset="paper"`` is the paper exactly).

    Attributes:
        iterations: closed-form FTRL-proximal updates per token (0 = preference prompting). NOTE:
            Algorithm 1 counts policies, returning π_T after T − 1 updates: its T is ``iterations + 1``.
        alpha: α, scale of the utility u_t = α (log π_t − log π_base).
        lam: λ, weight of the KL(π ‖ π_1) term that keeps the policy near the preference-prompted one.
        eta: η, learning rate (inverse weight of the proximal KL(π ‖ π_t) term).
        iterate_vocab: run the T iterations over the whole vocabulary at every token (the literal
            Eq. 6 loop) instead of the equivalent two-coefficient form; same result, T times slower.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Section 4.3: T = 60, alpha = lambda = 2, eta = 10; Algorithm 1 returns pi_T after T - 1 updates
        "paper": {"iterations": 59, "alpha": 2.0, "lam": 2.0, "eta": 10.0},
    }

    iterations: int = 60
    alpha: float = 2.0
    lam: float = 2.0
    eta: float = 10.0
    iterate_vocab: bool = False

    def __post_init__(self) -> None:
        t = self.iterations
        check_int("iterations", t, 0, MAX_ITERATIONS, hint="0 = preference prompting")
        for name in ("alpha", "lam", "eta"):
            check_positive(name, getattr(self, name))
        ratio = -float(amulet_coefficients(t, self.alpha, self.lam, self.eta)[1][0])
        if not ratio <= MAX_EFFECTIVE_RATIO:  # also catches inf / NaN
            raise ValueError(
                f"`alpha`={self.alpha}, `lam`={self.lam}, `eta`={self.eta}, `iterations`={t} make the iteration "
                f"diverge (effective ratio {ratio:.3g} > {MAX_EFFECTIVE_RATIO:.0e}): it converges only for "
                f"alpha < lam and grows without bound in the iterations when alpha > lam; lower `alpha` or "
                f"`iterations`, or raise `lam`."
            )
        check_bool("iterate_vocab", self.iterate_vocab)


def amulet_iterates(
    pref_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    iterations: torch.Tensor | int,
    alpha: torch.Tensor | float,
    lam: torch.Tensor | float,
    eta: torch.Tensor | float,
    *,
    keep_all: bool = True,
) -> list[torch.Tensor]:
    """Eq. 6 iterated over the whole vocabulary, from π_1 = ``pref_logprobs`` (the literal form).

    Args:
        pref_logprobs: float [B, V], log π_1 (normalized).
        base_logprobs: float [B, V], log π_base (normalized).
        iterations: long [B] (or an int), T per row.
        alpha, lam, eta: float [B] (or scalars), α, λ, η per row.
        keep_all: keep every iterate; if False only ``[log π_1, last]`` (memory O(1) in T).

    Returns:
        ``[log π_1, log π_2, ..., log π_{max T + 1}]``, each float32 [B, V] and normalized; a row
        with fewer iterations repeats its last iterate.
    """
    lp1 = torch.log_softmax(pref_logprobs.float(), dim=-1)
    lpb = torch.log_softmax(base_logprobs.float(), dim=-1).clamp(min=BASE_LOGPROB_FLOOR)
    n_iter, a, lm, et = _per_row(lp1.shape[0], lp1.device, torch.float32, iterations, alpha, lam, eta)
    lp_t, u_sum = lp1, torch.zeros_like(lp1)
    iterates = [lp1]
    for t in range(1, int(n_iter.max()) + 1 if lp1.shape[0] else 1):
        u_sum = u_sum + a[:, None] * (lp_t - lpb)  # Σ_{i≤t} u_i
        lam_eta_t = (lm * et * t)[:, None]
        z = (et[:, None] * u_sum + lam_eta_t * lp1 + lp_t) / (lam_eta_t + 1.0)
        lp_t = torch.where((n_iter >= t)[:, None], torch.log_softmax(z, dim=-1), lp_t)
        if keep_all:
            iterates.append(lp_t)
    return iterates if keep_all else [lp1, lp_t]


def amulet_coefficients(
    iterations: torch.Tensor | int,
    alpha: torch.Tensor | float,
    lam: torch.Tensor | float,
    eta: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, d)`` float64 [B] with ``log π_{T+1} = log_softmax(c log π_1 + d log π_base)``.

    Every iterate has this form (induction: ``log π_1`` has c = 1, d = 0; Eq. 6 is affine in
    ``log π_1``, ``log π_base`` and earlier iterates, and per-row constants vanish in the
    normalization), with ``c_1 = 1, d_1 = 0`` and

        c_{t+1} = (η α Σ_{i≤t} c_i + λ η t + c_t) / (λ η t + 1),
        d_{t+1} = (η α Σ_{i≤t} (d_i − 1) + d_t) / (λ η t + 1).

    The coefficients depend on the parameters only, so they are computed once per request.
    """
    B = max(torch.as_tensor(x).numel() for x in (iterations, alpha, lam, eta))
    n_iter, a, lm, et = _per_row(B, torch.device("cpu"), torch.float64, iterations, alpha, lam, eta)
    c, d = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    sum_c, sum_d = torch.zeros_like(c), torch.zeros_like(d)
    for t in range(1, int(n_iter.max()) + 1 if B else 1):
        sum_c, sum_d = sum_c + c, sum_d + (d - 1.0)
        lam_eta_t = lm * et * t
        live = n_iter >= t
        c = torch.where(live, (et * a * sum_c + lam_eta_t + c) / (lam_eta_t + 1.0), c)
        d = torch.where(live, (et * a * sum_d + d) / (lam_eta_t + 1.0), d)
    return c, d


def amulet_realign(
    pref_logprobs: torch.Tensor, base_logprobs: torch.Tensor, coef_pref: torch.Tensor, coef_base: torch.Tensor
) -> torch.Tensor:
    """log π_{T+1} float32 [B, V] from log π_1, log π_base float [B, V] and ``amulet_coefficients``."""
    lp1 = torch.log_softmax(pref_logprobs.float(), dim=-1)
    lpb = torch.log_softmax(base_logprobs.float(), dim=-1).clamp(min=BASE_LOGPROB_FLOOR)
    c = coef_pref.to(lp1.device, torch.float32)[:, None]
    d = coef_base.to(lp1.device, torch.float32)[:, None]
    return torch.log_softmax(c * lp1 + d * lpb, dim=-1)


def _per_row(B: int, dev: torch.device, dtype: torch.dtype, iterations: Any, *params: Any) -> list[torch.Tensor]:
    """``iterations`` as long [B] and each parameter as ``dtype`` [B] (scalars broadcast)."""
    out = [torch.as_tensor(iterations, device=dev).long().expand(B).contiguous()]
    out += [torch.as_tensor(p, dtype=dtype, device=dev).expand(B).contiguous() for p in params]
    return out


@METHODS.register
class AmuletMethod(PairViewMethod):
    """Amulet: π_1 (preference prompt) realigned away from π_base by T closed-form iterations."""

    name = "amulet"
    reads_preference = True
    Config = AmuletConfig

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        dev = state.views.last_logprobs.device
        cs = state.configs
        params = {
            "iterations": torch.tensor([c.iterations for c in cs], dtype=torch.long),
            "alpha": torch.tensor([c.alpha for c in cs], dtype=torch.float64),
            "lam": torch.tensor([c.lam for c in cs], dtype=torch.float64),
            "eta": torch.tensor([c.eta for c in cs], dtype=torch.float64),
        }
        coef_pref, coef_base = amulet_coefficients(**params)
        state.extra["amulet"] = {
            **{k: v.to(dev) for k, v in params.items()},
            "vocab_rows": torch.tensor([c.iterate_vocab for c in cs], dtype=torch.bool, device=dev),
            "coef_pref": coef_pref.to(dev),
            "coef_base": coef_base.to(dev),
        }
        for b in range(state.batch_size):
            state.row_stats(b).update(amulet_coef_pref=float(coef_pref[b]), amulet_coef_base=float(coef_base[b]))

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        p = state.extra["amulet"]
        out = amulet_realign(logprobs[:, 0], logprobs[:, 1], p["coef_pref"], p["coef_base"])
        rows = p["vocab_rows"]
        if bool(rows.any()):
            lit = amulet_iterates(logprobs[rows, 0], logprobs[rows, 1], p["iterations"][rows], p["alpha"][rows],
                                  p["lam"][rows], p["eta"][rows], keep_all=False)[-1]
            out[rows] = lit
        return out
