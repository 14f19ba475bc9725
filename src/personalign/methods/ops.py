"""Speculative draft-and-judge acceptance (Persona-judge), pure tensor ops in float32.

Top-k and top-p filtering live in ``decoding.filters``.

Shapes: ``B`` requests, ``K`` views, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

__all__ = [
    "residual_probs",
    "speculative_accept",
    "greedy_accept",
]


def residual_probs(
    judge_probs: torch.Tensor, draft_probs: torch.Tensor, eps: float | torch.Tensor = 1e-6
) -> torch.Tensor:
    """The resampling distribution after a rejection: ``norm(max(0, p - q))``, float32 [..., V].

    Computed in float32 from probabilities renormalized in float32, always from the judge's excess
    ``p - q`` (never the draft's). Its mass ``Z = sum max(0, p - q)`` is the total-variation distance
    between p and q, which is also the probability that a draft token is rejected. When ``Z <= eps``
    (p and q equal up to rounding) the residual is rounding noise: fall back to ``p`` itself. That
    fallback changes the emitted distribution by at most ``Z <= eps`` in total variation, because a
    rejection itself happens with probability ``Z``.
    """
    p = judge_probs.float()
    q = draft_probs.float()
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    excess = (p - q).clamp(min=0.0)
    mass = excess.sum(-1, keepdim=True)
    ok = mass > eps
    return torch.where(ok, excess / torch.where(ok, mass, torch.ones_like(mass)), p)


def speculative_accept(
    draft_probs: torch.Tensor,
    judge_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    eps: float | torch.Tensor = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative acceptance (Leviathan et al. 2023; Persona-judge Algorithm 1), batched.

    Row b drafted ``lengths[b] = λ_b`` tokens ``t_1..t_λ`` from ``q_1..q_λ``; the judge scored them,
    giving ``p_1..p_{λ+1}``. Token ``t_i`` is kept iff every earlier one was kept and
    ``u_i · q_i(t_i) < p_i(t_i)`` (i.e. ``u_i < min(1, p_i/q_i)`` without dividing). With ``n`` kept,
    the next token is drawn from ``norm(max(0, p_{n+1} - q_{n+1}))`` when ``n < λ`` and from
    ``p_{λ+1}`` (the bonus token) when all were kept. Every emitted token is then distributed as the
    judge's ``p`` (paper App. C.2).

    Args:
        draft_probs: float [B, L, V], q_i (rows use their first λ_b positions); any float dtype.
        judge_probs: float [B, L + 1, V], p_i.
        draft_tokens: long [B, L].
        lengths: long [B], λ_b in [0, L].
        uniforms: float [B, L], U(0, 1) draws for the acceptance tests.
        noise: float [B, V], Exp(1) draws for the final token (exponential race: argmax probs / E).
        eps: residual mass below which a rejection resamples from p (float, or float [B, 1]).

    Returns:
        ``(n_accepted long [B], next_token long [B])``.
    """
    B, L = draft_tokens.shape
    lengths = lengths.to(draft_tokens.device).long()
    q = draft_probs.float()
    q = q / q.sum(-1, keepdim=True)
    p = judge_probs.float()
    p = p / p.sum(-1, keepdim=True)
    idx = draft_tokens.long()[..., None]
    q_tok = q[:, :L].gather(-1, idx)[..., 0]  # [B, L]
    p_tok = p[:, :L].gather(-1, idx)[..., 0]
    ok = uniforms.float() * q_tok < p_tok
    ok &= torch.arange(L, device=ok.device)[None, :] < lengths[:, None]
    n = ok.long().cumprod(-1).sum(-1)  # leading run of acceptances
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, n]  # [B, V]
    q_next = q[rows, n.clamp(max=max(L - 1, 0))] if L > 0 else p_next
    rejected = (n < lengths)[:, None]
    dist = torch.where(rejected, residual_probs(p_next, q_next, eps), p_next)
    nxt = (dist / noise.float()).argmax(-1)
    return n, nxt


def greedy_accept(
    draft_tokens: torch.Tensor, judge_logprobs: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy draft-and-judge: keep drafts while each is the judge's argmax, then the judge's argmax.

    Args:
        draft_tokens: long [B, L]; judge_logprobs: float [B, L + 1, V]; lengths: long [B] (λ_b).

    Returns:
        ``(n_accepted long [B], next_token long [B])``; the result equals greedy decoding of the judge.
    """
    B, L = draft_tokens.shape
    best = judge_logprobs.argmax(-1)  # [B, L + 1]
    ok = (draft_tokens.long() == best[:, :L]) & (
        torch.arange(L, device=best.device)[None, :] < lengths.to(best.device)[:, None]
    )
    n = ok.long().cumprod(-1).sum(-1)
    return n, best[torch.arange(B, device=best.device), n]
