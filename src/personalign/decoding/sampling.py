"""The sampler: a numbered pipeline of pure tensor functions with per-row parameters.

1. ``apply_temperature``  scores / T (rows with T = 0 are greedy and skip the rest)
2. ``filter_top_k``       keep the k best tokens of each row (k = 0: off; ``decoding.filters``)
3. ``filter_top_p``       keep each row's nucleus of mass p (p = 1: off; ``decoding.filters``)
4. ``sample_rows``        exponential race: argmax(probs / E), E ~ Exp(1) i.i.d.  — an exact draw
   from ``probs``; each row with its own generator draws its own noise, so its sample does not
   depend on its batch neighbours.

Per-row parameters are tensors so requests with different settings share a batch; which steps any
row needs (sampling at all, top-k, top-p) is decided on the host when the batch is formed
(``SamplingParams.from_configs``), so a step never waits on the device to branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personalign.config import check_int, check_positive, check_unit
from personalign.decoding.filters import filter_top_k, filter_top_p

__all__ = [
    "SamplingConfig",
    "SamplingParams",
    "apply_temperature",
    "sample_rows",
    "sample",
]


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is drawn from a method's scores.

    Attributes:
        temperature: 0 = greedy (argmax); > 0 divides the scores.
        top_k: keep the k most likely tokens; 0 disables.
        top_p: nucleus mass in (0, 1]; 1 disables.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        check_positive("temperature", t, allow_zero=True, hint="0 = greedy")
        check_int("top_k", k, 0, hint="0 = off")
        check_unit("top_p", p, hint="1 = off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingParams:
    """Per-row sampling parameters as tensors ``[B]``."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    any_sampled: bool = True  # False when every row is greedy (no device sync needed to know it)
    any_top_k: bool = True  # False when no row filters by top-k
    any_top_p: bool = True  # False when no row filters by top-p

    @classmethod
    def from_configs(cls, configs: Sequence[SamplingConfig], device: torch.device | str = "cpu") -> SamplingParams:
        return cls(
            temperature=torch.tensor([c.temperature for c in configs], dtype=torch.float32, device=device),
            top_k=torch.tensor([c.top_k for c in configs], dtype=torch.long, device=device),
            top_p=torch.tensor([c.top_p for c in configs], dtype=torch.float32, device=device),
            any_sampled=any(not c.greedy for c in configs),
            any_top_k=any(not c.greedy and c.top_k > 0 for c in configs),
            any_top_p=any(not c.greedy and c.top_p < 1 for c in configs),
        )

    def filter(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k and top-p of each row (the steps no row needs are skipped)."""
        s = apply_temperature(scores.float(), self.temperature)
        if self.any_top_k:
            s = filter_top_k(s, self.top_k)
        if self.any_top_p:
            s = filter_top_p(s, self.top_p)
        return s


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """scores float [B, V] / temperature [B]; greedy rows (T = 0) are left unchanged."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return scores / t[:, None]


def sample_rows(
    probs: torch.Tensor,
    generator: torch.Generator | None,
    row_generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One draw per row of ``probs`` float [B, V] by the exponential race. Returns long [B]."""
    B, V = probs.shape
    noise = torch.empty_like(probs, dtype=torch.float32)
    own = [i for i in range(B) if row_generators is not None and row_generators[i] is not None]
    shared = [i for i in range(B) if i not in set(own)]
    for i in own:
        noise[i].exponential_(generator=row_generators[i])  # type: ignore[index]
    if shared:
        idx = torch.tensor(shared, device=probs.device)
        noise[idx] = torch.empty(len(shared), V, device=probs.device).exponential_(generator=generator)
    return (probs.float() / noise).argmax(-1)


def sample(
    scores: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token per row from ``scores`` float [B, V] (log-probs or logits). Returns long [B]."""
    greedy_tok = scores.argmax(-1)
    if not params.any_sampled:
        return greedy_tok
    sampled = params.temperature > 0
    probs = torch.softmax(params.filter(scores), dim=-1)
    drawn = sample_rows(probs, generator, row_generators)
    return torch.where(sampled, drawn, greedy_tok)
