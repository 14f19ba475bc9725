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
from typing import Any

import torch

from personalign.decoding.sampling import SamplingParams, sample
from personalign.decoding.stopping import eos_ids_of
from personalign.eval.reward import (
    PersRMScorer,
    RewardScorer,
    prompt_text,
    score_texts,
    uses_request_preference,
)
from personalign.methods.api import METHODS, DecodeState, Method
from personalign.methods.prompt_views import plain_view, require_preference
from personalign.types import Request, StepOutput, ViewSpec

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

    n: int = 4
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"`n` must be an integer >= 1 (samples per request), got {self.n!r}.")
        if not self.temperature >= 0:
            raise ValueError(f"`temperature` must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 = off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must lie in (0, 1], got {self.top_p}.")


def pick_best(scores: list[float], n: int) -> list[int]:
    """Index of the best of each consecutive run of ``n`` scores (first on ties)."""
    return [max(range(n), key=lambda i: (scores[b * n + i], -i)) for b in range(len(scores) // n)]


class BestOfNMethod(Method):
    """Best-of-N reranking with a ``RewardScorer`` (pass ``scorer=``)."""

    name = "best_of_n"
    Config = BestOfNConfig

    def __init__(self, config: BestOfNConfig | None = None, *, scorer: RewardScorer | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if scorer is not None and not isinstance(scorer, RewardScorer):
            raise ValueError(f"`scorer` must have score(prompts, responses) -> list[float], got {type(scorer).__name__}.")
        self.scorer = scorer
        self.bench_note = ""

    def build_views(self, request: Request, config: BestOfNConfig, backend: Any, chat_template: bool) -> list[ViewSpec]:
        if self.scorer is None:
            raise ValueError("method 'best_of_n' needs a reward scorer: pass scorer= (CLI: --reward-model, --reward-function or --persrm).")
        if uses_request_preference(self.scorer):
            require_preference(request, self.name)  # the reward scores with the request's preference
        return [plain_view(request, backend, chat_template)]

    def step(self, state: DecodeState, backend: Any, generator: torch.Generator | None) -> StepOutput:
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
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        add_reward_arguments(parser)

    @classmethod
    def from_cli(cls, args: Any, params: Any, backend: Any) -> Method:
        return cls(cls.from_params(params).config, scorer=scorer_from_cli(args, backend))

    @classmethod
    def for_bench(cls, backend: Any, main: Any) -> tuple[Method, Any]:
        scorer, what = bench_scorer(main)
        method = cls(scorer=scorer)
        method.bench_note = f"N=4 samples in one batch; reward model: {what}"
        return method, backend


def add_reward_arguments(parser: Any) -> None:
    """``--reward-model`` / ``--reward-label``, ``--reward-function`` (and ``--persrm``) for reward-guided methods."""
    have = parser._option_string_actions
    if "--reward-model" not in have:
        parser.add_argument("--reward-model", metavar="PATH",
                            help="a local sequence-classification reward model (args, best_of_n)")
        parser.add_argument("--reward-label", type=int, default=0, metavar="I", help="reward output column")
    if "--reward-function" not in have:
        parser.add_argument("--reward-function", metavar="MODULE:NAME",
                            help="a Python reward function f(prompt, response[, preference]) -> float, as "
                                 "package.module:name or path/to/file.py:name (args, best_of_n)")
    if "--persrm" not in have:
        parser.add_argument("--persrm", metavar="DIR",
                            help="a PersRM checkpoint (personalign train pad); used by pad and as a reward model")


def scorer_from_cli(args: Any, backend: Any) -> RewardScorer:
    """The reward of ``--reward-model``, else ``--reward-function``, else ``--persrm`` (a server may
    take ``--persrm`` for pad and another reward for args / best_of_n)."""
    if getattr(args, "reward_model", None):
        from personalign.eval.reward import load_reward_scorer

        return load_reward_scorer(args.reward_model, device=str(backend.device()), label=args.reward_label)
    if getattr(args, "reward_function", None):
        from personalign.eval.reward import FunctionScorer, import_object

        fn = import_object(args.reward_function)
        if not callable(fn):
            raise ValueError(f"`--reward-function` {args.reward_function!r} is not callable.")
        scorer = FunctionScorer(fn, name=args.reward_function)
        if scorer.uses_preference:  # `--preference` fixes it; else each request's own
            scorer.preference = getattr(args, "preference", None) or None
        return scorer
    if getattr(args, "persrm", None):
        from personalign.methods.pad import load_persrm_for

        # without `--preference`, each request's own preference (a server's case; checked per request)
        return PersRMScorer(load_persrm_for(backend, args.persrm), getattr(args, "preference", None) or None)
    raise ValueError("this method needs a reward model: `--reward-model PATH`, `--reward-function MODULE:NAME` "
                     "or `--persrm DIR`.")


def bench_scorer(main: Any) -> tuple[Any, str]:
    """(scorer, description): ``--reward-model`` of the bench, else a fresh head on the main model's
    decoder (untrained: timing does not depend on training)."""
    from personalign.eval.reward import BackboneRewardModel, HFRewardScorer, load_reward_scorer

    path = getattr(main, "bench_options", {}).get("reward_model")
    if path:
        return load_reward_scorer(path, device=str(next(main.model.parameters()).device)), path
    lm = main.model
    dec = lm.model if hasattr(lm, "model") else lm.get_decoder()
    return (HFRewardScorer(BackboneRewardModel(dec, lm.config.hidden_size), main.tokenizer),
            "a fresh linear head on the same backbone (untrained; timing does not depend on training)")


METHODS.register("best_of_n", BestOfNMethod)
