"""``args``: reward-guided search (ARGS, Khanov et al. 2024), the decoding-time baseline of seed 000.

At every step, over the k most likely next tokens of the base model:

    score(a) = log π(a | x, y_<t) + w · r(x, y_<t ∘ a)

with r an explicit reward model scoring the text so far plus the candidate; tokens outside the
top-k get −inf; greedy takes the argmax, T > 0 samples from softmax(score / T) over the top-k.

Two ways to score the candidates:

* **cached** (``reward_key=``, the default when the reward model shares the policy's tokenizer): the
  reward model is a backend model key (a ``RewardLMView``) with k views per request, all holding
  the text so far in their KV cache. Each step feeds view j its candidate a_j (per-view tokens) and
  reads r(x, y_<t ∘ a_j) at that position: ONE batched forward of B·k rows per step. Next step
  each reward view rolls back its candidate (``truncate``) and is fed [chosen token, new candidate].
* **text** (``scorer=``, any ``RewardScorer``): the B·k candidate texts of a step are decoded and
  scored in one batched call, re-tokenized by the reward model's own tokenizer — the path for a
  reward model whose tokenizer differs from the policy's (reported in each output's stats). It
  re-encodes the whole texts every step (no cache).

Naive reference: for each candidate separately, decode the text and score it alone (the unit test).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from personalign.config import check_bool, check_int, check_positive
from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, DecodeState, Method
from personalign.decoding.sampling import sample
from personalign.methods.prompt_views import require_preference
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request, StepOutput, ViewSpec
from personalign.views.base import Backend
from personalign.views.reward import (
    RewardScorer,
    prompt_text,
    reward_from_logprobs,
    score_texts,
    uses_request_preference,
)

__all__ = ["ARGSConfig", "ARGSMethod", "args_scores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ARGSConfig:
    """ARGS settings.

    Attributes:
        k: candidates kept from the base model each step.
        w: weight of the reward in the score.
        reward_preference: the cached reward views read the request's preference as their system
            message: one preference-conditioned reward model for every user (e.g. from
            ``personalign train rm --preference-in-prompt``). Needs the cached path.
    """

    k: int = 10
    w: float = 1.0
    reward_preference: bool = False

    def __post_init__(self) -> None:
        check_bool("reward_preference", self.reward_preference)
        check_int("k", self.k, 1, hint="top-k candidates")
        check_positive("w", self.w, allow_zero=True, hint="reward weight")


def args_scores(base_logprobs: torch.Tensor, top_ids: torch.Tensor, rewards: torch.Tensor, w: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """ARGS scores float [B, V]: log π + w·r on the candidates ``top_ids`` long [B, k], −inf elsewhere.

    Args:
        base_logprobs: float [B, V]. rewards: float [B, k]. w: float [B].
        keep: optional bool [B, k]; False drops a candidate (rows with a smaller k than the batch's).
    """
    cand = base_logprobs.gather(-1, top_ids) + w[:, None] * rewards
    if keep is not None:
        cand = cand.masked_fill(~keep, float("-inf"))
    return torch.full_like(base_logprobs, float("-inf")).scatter(-1, top_ids, cand)


def _tokenizers_match(a: Any, b: Any) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


@METHODS.register
class ARGSMethod(Method):
    """ARGS with a cached reward view (``reward_key=``) or a text ``RewardScorer`` (``scorer=``)."""

    name = "args"
    reads_preference = True
    Config = ARGSConfig
    requires = ("reward",)

    def __init__(self, config: ARGSConfig | None = None, *, scorer: RewardScorer | None = None,
                 reward_key: str | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if scorer is not None and not isinstance(scorer, RewardScorer):
            raise ValueError(f"`scorer` must have score(prompts, responses) -> list[float], got {type(scorer).__name__}.")
        if scorer is not None and reward_key is not None:
            raise ValueError("pass either `scorer` (text rewards) or `reward_key` (a cached reward view), not both.")
        self.scorer, self.reward_key = scorer, reward_key

    @classmethod
    def from_resources(cls, config: ARGSConfig, loaded: Loaded) -> ARGSMethod:
        """Candidates scored on the cached reward view when assembly attached one, else as text."""
        if loaded.reward_key is not None:
            return cls(config, reward_key=loaded.reward_key)
        return cls(config, scorer=loaded.scorer)

    def build_views(self, request: Request, config: ARGSConfig, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        if self.scorer is None and self.reward_key is None:
            raise ValueError("method 'args' needs a reward model: pass scorer= or reward_key= (CLI: --reward-model, --reward-function or --persrm).")
        if uses_request_preference(self.scorer):
            require_preference(request, self.name)  # the reward scores with the request's preference
        ids = build_prompt_ids(backend.tokenizer(), request.prompt, chat_template=chat_template)
        views = [ViewSpec(prompt_ids=ids, role="base")]
        if config.reward_preference and self.reward_key is None:
            raise ValueError("`reward_preference` needs the cached reward path: a reward model that shares the "
                             "policy's tokenizer (`--reward-model DIR`).")
        if self.reward_key is not None:
            if self.reward_key not in backend.models:
                raise ValueError(f"`reward_key` {self.reward_key!r} is not a model of the backend {sorted(backend.models)}.")
            rids = ids
            if config.reward_preference:
                require_preference(request, self.name)
                rids = build_prompt_ids(backend.tokenizer(), request.prompt, system=request.preference,
                                        chat_template=chat_template)
            views += [ViewSpec(prompt_ids=rids, model=self.reward_key, role=f"reward:{j}") for j in range(config.k)]
        return views

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        dev = state.views.last_logprobs.device
        state.extra["w"] = torch.tensor([c.w for c in state.configs], dtype=torch.float32, device=dev)
        state.extra["k"] = torch.tensor([c.k for c in state.configs], dtype=torch.long, device=dev)
        rm_tok = getattr(self.scorer, "tokenizer", None)
        if rm_tok is not None and not _tokenizers_match(rm_tok, backend.tokenizer()):
            logger.info("args: the reward model's tokenizer differs from the policy's; candidates are re-tokenized as text")
            for b in range(state.batch_size):
                state.row_stats(b)["args_note"] = "reward model tokenizer differs: candidates re-tokenized as text"

    def _step_cached(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        B, K = state.batch_size, state.views.num_views
        rv = list(range(1, K))  # the k reward views
        chosen = state.extra.get("chosen")  # long [B], last step's token
        if chosen is not None:
            backend.step(state.views, chosen[:, None], views=[0])
        lp = state.views.last_logprobs[:, 0]  # [B, V]
        top_ids = lp.topk(len(rv), dim=-1).indices  # [B, k]
        if chosen is None:
            feed = top_ids[:, :, None]  # [B, k, 1]
        else:  # drop last step's candidate, then feed the chosen token and the new candidate
            backend.truncate(state.views, state.views.fed[:, 1] - 1, views=rv)
            feed = torch.stack([chosen[:, None].expand(B, len(rv)).to(top_ids.device), top_ids], -1)  # [B, k, 2]
        rewards = reward_from_logprobs(backend.step(state.views, feed, views=rv)[:, :, -1])  # [B, k]
        keep = torch.arange(len(rv), device=lp.device)[None, :] < state.extra["k"][:, None]
        scores = args_scores(lp, top_ids, rewards.to(lp.device), state.extra["w"], keep)
        tokens = sample(scores, state.sampling, generator, state.row_generators)
        state.extra["chosen"] = tokens
        return StepOutput(tokens=tokens[:, None], n_tokens=torch.ones_like(tokens))

    def step(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        if self.reward_key is not None:
            return self._step_cached(state, backend, generator)
        lp = state.next_logprobs(backend)[:, 0]  # [B, V]
        B = state.batch_size
        k = state.extra["k"]
        top_ids = lp.topk(int(k.max()), dim=-1).indices  # [B, kmax]
        kmax = top_ids.shape[1]
        tok = backend.tokenizer()
        prompts, texts, prefs = [], [], []
        for b in range(B):
            p = prompt_text(state.requests[b].prompt)
            for j in range(kmax):
                prompts.append(p)
                texts.append(tok.decode(state.generated[b] + [int(top_ids[b, j])], skip_special_tokens=True))
                prefs.append(state.requests[b].preference)
        r = score_texts(self.scorer, prompts, texts, prefs, what="request")
        rewards = torch.tensor(r, dtype=torch.float32, device=lp.device).view(B, kmax)
        keep = torch.arange(kmax, device=lp.device)[None, :] < k[:, None]
        scores = args_scores(lp, top_ids, rewards, state.extra["w"], keep)
        tokens = sample(scores, state.sampling, generator, state.row_generators)
        state.pending = tokens[:, None]
        return StepOutput(tokens=tokens[:, None], n_tokens=torch.ones_like(tokens))
