"""``drift``: decoding steered by a user's Drift profile (seed 002, Eq. 7–9, Algorithm 2).

Formula, per step, in log space (log-probs differ from logits by a per-view constant that the
softmax removes, paper App. A.2)::

    scores = h_LLM + (1/β) · Σ_i p_i (h_i − h_base)

* ``h_LLM``: the LLM (model key ``main``) on the plain prompt — view 0;
* ``h_base``: the steering model (key ``steer_model``, default ``steer``; may be ``main``) on the
  prompt with the base system prompt ``s_0`` — view 1;
* ``h_i``: the steering model with attribute system prompt ``s_i`` — views 2..S+1, where
  ``S = slots`` (the method's ``top_m``); ``p_i`` are the profile's selected weights.

All steering views of all rows advance in ONE batched forward per step (a single prefill group);
with a separate steering model the LLM view is its own group. Weights [B, S] and β [B] are per-row
tensors, so users with different profiles share a batch: a profile travels per request in
``request.params["profile"]`` (a path, a profile dict or a ``DriftProfile``). A row whose profile
selects fewer than S attributes fills the remaining slots with the base prompt at weight 0.

Afterwards the nucleus of the Drift distribution is kept (``top_p``, default 0.9 as in the
paper's Table 7; 1.0 disables it) and the loop's sampler (greedy, top-k, top-p, temperature) runs.

Naive reference (golden test): run each view's prompt + generated tokens through the models
separately and uncached, and apply the formula above to the last-position log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from personalign.config import check_int, check_positive, check_unit
from personalign.decoding.filters import top_p_keep
from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, DecodeState, TokenMethod
from personalign.personas.drift import DriftProfile
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["DriftConfig", "DriftMethod", "drift_scores"]


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """Drift decoding parameters.

    Attributes:
        profile: the user's Drift profile: a JSON path, a profile dict, or a ``DriftProfile``.
        beta: KL strength β > 0; the steering term is scaled by 1/β (paper: 0.5).
        top_m: attributes used per row; None = the profile's own ``top_m`` (fitting default 7, as
            in the paper). Every row of a batch gets ``slots`` attribute views (see ``slots``).
        top_p: nucleus kept from the Drift distribution before sampling (1.0 = off; paper: 0.9).
        steer_model: backend model key of the steering (small) model; ``main`` = the LLM itself.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Table 7: beta 0.5, top-p 0.9 (the paper samples: decode with temperature 1 to match it)
        "paper": {"beta": 0.5, "top_p": 0.9},
    }

    profile: Any = None
    beta: float = 0.5
    top_m: int | None = None
    top_p: float = 0.9
    steer_model: str = "steer"

    def __post_init__(self) -> None:
        check_positive("beta", self.beta, hint="smaller β steers harder; the paper uses 0.5")
        if self.top_m is not None:
            check_int("top_m", self.top_m, 1)
        check_unit("top_p", self.top_p)
        if not isinstance(self.steer_model, str) or not self.steer_model:
            raise ValueError(f"`steer_model` must be a backend model key, got {self.steer_model!r}.")
        if self.profile is not None:
            prof = resolve_profile(self.profile)
            if self.top_m is not None and self.top_m > len(prof.pool):
                raise ValueError(f"`top_m` must be <= the profile's attribute pool size {len(prof.pool)}, "
                                 f"got {self.top_m}.")


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, mtime: float) -> DriftProfile:
    return DriftProfile.load(path)


def resolve_profile(profile: Any) -> DriftProfile:
    """A ``DriftProfile`` from a profile, a dict or a JSON path (files cached by path and mtime)."""
    if isinstance(profile, DriftProfile):
        return profile
    if isinstance(profile, dict):
        return DriftProfile.from_dict(profile)
    if isinstance(profile, (str, Path)):
        p = Path(profile)
        if not p.is_file():
            raise ValueError(f"`profile` {str(p)!r} does not exist.")
        return _load_cached(str(p.resolve()), p.stat().st_mtime)
    raise ValueError(f"`profile` must be a path, a dict or a DriftProfile, got {type(profile).__name__}.")


def drift_scores(logprobs: torch.Tensor, weights: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 9 before the softmax.

    Args:
        logprobs: float32 [B, 2 + S, V]: LLM, steering base, then S attribute views.
        weights: float32 [B, S] per-row ``p_i``.
        beta: float32 [B].

    Returns:
        float32 [B, V]: ``h_LLM + (1/β) Σ_i p_i (h_i − h_base)``.
    """
    diff = logprobs[:, 2:] - logprobs[:, 1:2]  # [B, S, V]
    steer = torch.einsum("bsv,bs->bv", diff, weights.to(diff.dtype))
    # -inf - -inf gives NaN only where the steering model forbids a token under both prompts: no
    # evidence either way, so no steering there (the LLM's own score decides; infinities are kept).
    steer = torch.nan_to_num(steer, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return logprobs[:, 0] + steer / beta[:, None].to(diff.dtype)


@METHODS.register
class DriftMethod(TokenMethod):
    """Decode the LLM steered by the attribute views of each row's Drift profile."""

    name = "drift"
    Config = DriftConfig
    uses = ("steer", "drift_profile")

    def _profile_of(self, config: DriftConfig) -> DriftProfile:
        if config.profile is None:
            raise ValueError("method 'drift' needs a `profile` (a Drift profile JSON path; fit one with "
                             "`personalign fit drift`), in the method config or request.params.")
        return resolve_profile(config.profile)

    @property
    def slots(self) -> int:
        """Attribute views per row: ``top_m``, else the method profile's ``top_m``, else 7."""
        if self.config.top_m is not None:
            return self.config.top_m
        if self.config.profile is not None:
            return resolve_profile(self.config.profile).top_m
        return 7

    def build_views(self, request: Request, config: DriftConfig, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        if config.top_m is not None and config.top_m > self.slots:
            raise ValueError(f"`top_m` of a request ({config.top_m}) must be <= the method's {self.slots} "
                             "attribute slots: every row of a batch has the same number of views.")
        if config.steer_model != self.config.steer_model:
            raise ValueError("`steer_model` cannot change per request; set it on the method.")
        prof = self._profile_of(config)
        key = config.steer_model
        if key not in backend.models:
            raise ValueError(f"`steer_model` {key!r} is not a model of this backend ({sorted(backend.models)}); "
                             "pass --steer-model, or steer_model=main to steer with the LLM itself.")
        self._check_model(prof, backend, key)
        tok = backend.tokenizer(key)
        main_ids = build_prompt_ids(backend.tokenizer(), request.prompt, chat_template=chat_template)
        base_ids = build_prompt_ids(tok, request.prompt, system=prof.pool.base, chat_template=chat_template)
        views = [ViewSpec(prompt_ids=main_ids, role="llm"),
                 ViewSpec(prompt_ids=base_ids, model=key, role="steer:base")]
        sel = self._selection(prof, config)
        for name, prompt, _ in sel:
            ids = build_prompt_ids(tok, request.prompt, system=prompt, chat_template=chat_template)
            views.append(ViewSpec(prompt_ids=ids, model=key, role=f"attribute:{name}"))
        views += [ViewSpec(prompt_ids=base_ids, model=key, role="pad")] * (self.slots - len(sel))
        return views

    def _selection(self, prof: DriftProfile, config: DriftConfig) -> list[tuple[str, str, float]]:
        """The row's (name, prompt, weight) list: the ``top_m`` largest |p| of its profile, within the slots."""
        m = min(config.top_m if config.top_m is not None else prof.top_m, self.slots)
        if m > prof.top_m:  # more than the profile chose: reselect from its full weights
            prof = DriftProfile(pool=prof.pool, wins=prof.wins, losses=prof.losses, pair_ids=prof.pair_ids,
                                steer=prof.steer, top_m=min(m, len(prof.pool)), solver=prof.solver,
                                manual_weights=prof.manual_weights)
        return prof.selected()[:m]

    def _check_model(self, prof: DriftProfile, backend: Backend, key: str) -> None:
        seen = self.__dict__.setdefault("_checked", set())
        tag = (json.dumps(prof.steer, sort_keys=True), id(backend.models[key]))
        if tag not in seen:
            prof.check_model(backend.models[key], backend.tokenizer(key))
            seen.add(tag)

    def view_groups(self, num_views: int) -> list[list[int]] | None:
        if self.config.steer_model == "main":
            return None  # every view on one model: one batched forward
        return [[0], list(range(1, num_views))]

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        B, S = state.batch_size, self.slots
        weights = torch.zeros(B, S)
        for b, cfg in enumerate(state.configs):
            sel = self._selection(self._profile_of(cfg), cfg)
            weights[b, : len(sel)] = torch.tensor([w for _, _, w in sel])
            state.row_stats(b).update(drift_attributes={n: w for n, _, w in sel})
        dev = state.views.last_logprobs.device
        state.extra["weights"] = weights.to(dev)
        state.extra["beta"] = torch.tensor([float(c.beta) for c in state.configs], device=dev)
        state.extra["top_p"] = torch.tensor([float(c.top_p) for c in state.configs], device=dev)
        # the nucleus is taken over Drift's own distribution, so its best token is always inside: a greedy
        # row's token is the same with or without it, and a batch with no sampled row skips the sort
        # (a full-vocabulary sort a step: 3.5 ms of SmolLM2's 75 ms Drift step on 2 cores). Decided on the
        # host once, so a step never waits on the device to branch.
        state.extra["nucleus"] = state.sampling.any_sampled and any(c.top_p < 1 for c in state.configs)

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        scores = drift_scores(logprobs, state.extra["weights"], state.extra["beta"])
        scores = torch.log_softmax(scores, dim=-1)
        if state.extra["nucleus"]:
            top_p = state.extra["top_p"]
            keep = top_p_keep(scores, top_p) | (top_p >= 1)[:, None]
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores

    @classmethod
    def from_resources(cls, config: DriftConfig, loaded: Loaded) -> DriftMethod:
        """Steered by assembly's steering model (``steer`` when one was given, else the LLM itself); the
        default profile of requests that bring none is the resources' ``drift_profile``."""
        changes = {}
        if config.steer_model == DriftConfig().steer_model and loaded.steer_key != config.steer_model:
            changes["steer_model"] = loaded.steer_key
        if config.profile is None and loaded.drift_profile is not None:
            changes["profile"] = loaded.drift_profile
        return cls(dataclasses.replace(config, **changes) if changes else config)
