"""``best_of_n``: sample N complete answers in one batch, return the one a reward model likes best.

    y* = argmax_{y_i, i = 1..N} r(x, y_i),     y_i ~ π(· | x) (temperature ``temperature``)

The N samples of every request are rows of ONE batched, cached decoding pass through the backend
(B·N rows, one forward per token); the reward is any ``RewardScorer`` (a sequence-classification
model, the PersRM for the request's preference, a plain function). The first step returns the
whole chosen answer (``n_tokens`` = its length), so the loop ends after it. The seed paper's
"Best-of-k" strategy (Table C3) is this method with k samples and PersRM rewards.

Naive reference: decode the N samples one by one, score each, keep the argmax (the unit test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from personalign.config import check_int, check_positive, check_unit
from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, DecodeState, Method
from personalign.decoding.sampling import SamplingParams, sample
from personalign.decoding.stopping import eos_ids_of
from personalign.methods.prompt_views import plain_view, require_preference
from personalign.types import Request, StepOutput, ViewSpec
from personalign.views.base import Backend
from personalign.views.reward import (
    RewardScorer,
    prompt_text,
    score_texts,
    uses_request_preference,
)

__all__ = ["BestOfNConfig", "BestOfNMethod"]


@dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    """Best-of-N settings.

    Attributes:
        n: samples per request.
        temperature: sampling temperature of the candidates (the paper's Table C3: 0.7).
        top_k: candidate sampling top-k (0 = off).
        top_p: candidate sampling nucleus (1 = off).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"n": 10, "temperature": 0.7},  # seed 000, Section 4.3 / Table C3: best-of-k, k = 10, T = 0.7
    }

    n: int = 4
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_int("n", self.n, 1, hint="samples per request")
        check_positive("temperature", self.temperature, allow_zero=True)
        check_int("top_k", self.top_k, 0, hint="0 = off")
        check_unit("top_p", self.top_p)


def pick_best(scores: list[float], n: int) -> list[int]:
    """Index of the best of each consecutive run of ``n`` scores (first on ties)."""
    return [max(range(n), key=lambda i: (scores[b * n + i], -i)) for b in range(len(scores) // n)]


@METHODS.register
class BestOfNMethod(Method):
    """Best-of-N reranking with a ``RewardScorer`` (pass ``scorer=``)."""

    name = "best_of_n"

    @property
    def reads_preference(self) -> bool:  # type: ignore[override]
        """The reward reads each request's preference (a PersRM, or a scorer without a fixed one)."""
        return self.scorer is not None and uses_request_preference(self.scorer)
    Config = BestOfNConfig
    requires = ("reward",)

    @classmethod
    def from_resources(cls, config: BestOfNConfig, loaded: Loaded) -> BestOfNMethod:
        return cls(config, scorer=loaded.scorer)

    def __init__(self, config: BestOfNConfig | None = None, *, scorer: RewardScorer | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if scorer is not None and not isinstance(scorer, RewardScorer):
            raise ValueError(f"`scorer` must have score(prompts, responses) -> list[float], got {type(scorer).__name__}.")
        self.scorer = scorer

    def build_views(self, request: Request, config: BestOfNConfig, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        if self.scorer is None:
            raise ValueError("method 'best_of_n' needs a reward scorer: pass scorer= (CLI: --reward-model, --reward-function or --persrm).")
        if uses_request_preference(self.scorer):
            require_preference(request, self.name)  # the reward scores with the request's preference
        return [plain_view(request, backend, chat_template)]

    def step(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        if state.extra.get("chosen"):
            # The loop goes on past a chosen answer only when it ignores EOS: continue plainly.
            tokens = sample(state.next_logprobs(backend)[:, 0], state.sampling, generator, state.row_generators)
            state.pending = tokens[:, None]
            return StepOutput(tokens=tokens[:, None], n_tokens=torch.ones_like(tokens))
        B, cfgs = state.batch_size, state.configs
        ns = {c.n for c in cfgs}
        if len(ns) != 1:
            raise ValueError(f"`n` must be the same for every request of a batch, got {sorted(ns)}.")
        n = ns.pop()
        specs = [[state.views.specs[b][0]] for b in range(B) for _ in range(n)]  # B·N rows, b-major
        inner = backend.prefill(specs)
        dev = inner.last_logprobs.device
        params = SamplingParams(
            temperature=torch.tensor([cfgs[b].temperature for b in range(B) for _ in range(n)], device=dev),
            top_k=torch.tensor([cfgs[b].top_k for b in range(B) for _ in range(n)], device=dev),
            top_p=torch.tensor([cfgs[b].top_p for b in range(B) for _ in range(n)], device=dev),
        )
        row_gens = [state.row_generators[b] for b in range(B) for _ in range(n)]
        eos = eos_ids_of(backend.tokenizer(), backend.models.get("main"))
        budgets = [state.budgets[b] if state.budgets else 128 for b in range(B) for _ in range(n)]
        samples: list[list[int]] = [[] for _ in range(B * n)]
        done = torch.zeros(B * n, dtype=torch.bool)
        while True:
            tok = sample(inner.last_logprobs[:, 0], params, generator, row_gens).cpu()
            for r in range(B * n):
                if not done[r]:
                    samples[r].append(int(tok[r]))
                    done[r] = int(tok[r]) in eos or len(samples[r]) >= budgets[r]
            if bool(done.all()):
                break
            backend.step(inner, tok[:, None], lengths=(~done).long())
        texts = [backend.tokenizer().decode([t for t in s if t not in eos], skip_special_tokens=True) for s in samples]
        prompts = [prompt_text(state.requests[b].prompt) for b in range(B) for _ in range(n)]
        prefs = [state.requests[b].preference for b in range(B) for _ in range(n)]
        scores = score_texts(self.scorer, prompts, texts, prefs, what="request")
        best = pick_best(scores, n)
        L = max(len(samples[b * n + best[b]]) for b in range(B))
        out = torch.zeros(B, L, dtype=torch.long)
        lens = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            s = samples[b * n + best[b]]
            out[b, : len(s)] = torch.tensor(s)
            lens[b] = len(s)
            state.row_stats(b)["best_of_n"] = {"scores": scores[b * n: (b + 1) * n], "chosen": best[b]}
        state.extra["chosen"] = True
        state.pending, state.pending_lengths = out, lens
        return StepOutput(tokens=out, n_tokens=lens)

    # ---------------------------------------------------------------- CLI and bench
