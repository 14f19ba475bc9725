"""``pad``: Personalized Alignment at Decoding-time (seed 000, Algorithm 2, Eq. 13).

At every step, over the k most likely next tokens of the base model (default k = 10, β = 1.0):

    score(a) = log π_LM(a | s_t) + β · w_pᵀ φ(s_t, a),        a ∈ top-k(π_LM(· | s_t))

with ``φ(s, a) = log π̂_θ(a|s) − log π̂_ref(a|s)`` the PersRM's token features and ``w_p`` its weights
for the preference p (``training.persrm.model``: φ ∈ R^D splits the log-ratio over hidden dimensions,
``1ᵀφ = log π_θ(a|s)/π_ref(a|s)``); tokens outside the top-k get −inf. Greedy (T = 0) takes the
argmax; stochastic (T > 0) samples from softmax(score / T) over the top-k (Table C3).

Mode ``released`` is the rule of the authors' released inference code: the preference goes in the
PersRM's prompt, π_ref is the base model itself, and the score over the base top-k is
``(1 − β) log π_LM(a|s) + β log π_θ(a | p, s)`` (what Eq. 13 gives with w_p = 1 and π_ref = π_LM).

Views (all advance together, one cached forward per model per step):
``eq13``: [base: π_LM on the prompt, ref: π_ref on the PersRM prompt, theta: π_θ on the PersRM
prompt]; ``released``: [base, theta]. When the base model IS the PersRM's backbone, all views run
on one ``RowAdapterModel`` (the LoRA adapter on the θ rows only), so base, π_ref and π_θ are ONE
batched forward over ONE copy of the weights; otherwise the PersRM views form a second group on
the PersRM's own backbone (same tokenizer required). Assembly attaches those models before decoding
(``pad_views``, ``personalign.assembly.attach_persrm``).

With a linear output head (checked once per model), the π_ref and π_θ rows need only their hidden
states: their logits and log-normalizers add the same constant to every candidate's score
(``pad_scores``), so the head runs on the base rows alone.

Naive reference (the equivalence test): per request and step, full uncached forwards of π_LM, π_ref
and π_θ on the text so far, hidden states from the decoder, then the rule from its definitions
(``token_features`` on the exact log-probs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from personalign.config import check_choice, check_int, check_positive
from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, DecodeState, TokenMethod
from personalign.methods.prompt_views import require_preference
from personalign.personas.prompts import build_prompt_ids
from personalign.training.persrm.model import ADAPTER, PersRM, persrm_prompt_ids
from personalign.types import Request, ViewSpec
from personalign.views.adapters import BASE_ADAPTER, RowAdapterModel, output_head_is_linear
from personalign.views.base import Backend

__all__ = ["PADConfig", "PADMethod", "pad_scores", "pad_views", "persrm_key", "MODES"]

logger = logging.getLogger(__name__)
MODES = ("eq13", "released")


@dataclass(frozen=True, kw_only=True)
class PADConfig:
    """PAD decoding settings.

    Attributes:
        k: candidates kept from the base model each step (the paper: 10).
        beta: weight of the personalized reward (the paper: 1.0).
        mode: ``eq13`` (the paper's rule) or ``released`` (the authors' released inference rule).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"k": 10, "beta": 1.0, "mode": "eq13"},  # Section 4.1: greedy over the top-k, beta 1.0, k 10
    }

    k: int = 10
    beta: float = 1.0
    mode: str = "eq13"

    def __post_init__(self) -> None:
        check_int("k", self.k, 1, hint="top-k candidates")
        check_positive("beta", self.beta, allow_zero=True)
        check_choice("mode", self.mode, MODES)


def pad_scores(base_logprobs: torch.Tensor, *, beta: torch.Tensor, k: torch.Tensor, mode: str = "eq13",
               out_weight: torch.Tensor | None = None, out_bias: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, delta_hidden: torch.Tensor | None = None,
               theta_hidden: torch.Tensor | None = None, theta_logprobs: torch.Tensor | None = None,
               ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token scores of PAD, float [B, V]; −inf outside each row's base top-k.

    Given the PersRM rows' log-probs, the scores are Eq. 13's (or the released rule's) exactly.
    Without them they come from the hidden states and the output head alone (a linear head,
    ``views.adapters.output_head_is_linear``), and equal those up to a constant per row: the
    log-normalizers of π_θ and π_ref, which are the same for every candidate, so neither the
    argmax nor the softmax over the candidates sees them. For Eq. 13 (``token_features``):

        w_pᵀφ(s, a) = W_a · (Δh ⊙ (w − w̄)) + w̄ · Δlog π(a)   with   Δlog π(a) = W_a · Δh − Δ log Z,
                    = W_a · (Δh ⊙ w) − w̄ · Δ log Z,

    w̄ the mean of w over its D dimensions; for the released rule, log π_θ(a) = (W h_θ + b)_a − log Z_θ.

    Args:
        base_logprobs: log π_LM(· | s), float [B, V].
        beta: float [B]. k: long [B].
        mode: ``eq13`` or ``released``.
        out_weight, out_bias: the PersRM output head W float [V_out, D] and its bias (or None).
        weights: w_p, float [B, D] (``eq13``).
        delta_hidden: h_θ − h_ref at the current position, float [B, D] (``eq13``).
        theta_hidden: h_θ, float [B, D] (``released`` without ``theta_logprobs``).
        theta_logprobs, ref_logprobs: log π_θ(· | p, s) and log π_ref(· | p, s), float [B, V] (optional;
            ``ref_logprobs`` for ``eq13`` only).
    """
    B, V = base_logprobs.shape
    kmax, kmin = int(k.max()), int(k.min())
    top_lp, top_ids = base_logprobs.topk(min(kmax, V), dim=-1)  # [B, k]
    w_rows = None if out_weight is None else out_weight[top_ids].float()  # [B, k, D]
    if mode == "eq13":
        w = weights.float()
        dh = delta_hidden.float()
        if theta_logprobs is None:
            reward = torch.linalg.vecdot(w_rows, (dh * w)[:, None, :])
        else:
            w_bar = w.mean(-1, keepdim=True)  # [B, 1]
            dlp = theta_logprobs.gather(-1, top_ids) - ref_logprobs.gather(-1, top_ids)  # [B, k]
            reward = torch.linalg.vecdot(w_rows, (dh * (w - w_bar))[:, None, :]).addcmul_(w_bar, dlp)
        cand = torch.addcmul(top_lp, beta[:, None], reward)
    else:
        if theta_logprobs is not None:
            th = theta_logprobs.gather(-1, top_ids)
        else:
            th = torch.linalg.vecdot(w_rows, theta_hidden.float()[:, None, :])
            if out_bias is not None:
                th = th + out_bias.float()[top_ids]
        cand = (1 - beta[:, None]) * top_lp + beta[:, None] * th
    if kmin < top_ids.shape[1]:  # rows with a smaller k keep fewer candidates
        keep = torch.arange(top_ids.shape[1], device=k.device)[None, :] < k[:, None]
        cand = cand.masked_fill(~keep.to(cand.device), float("-inf"))
    return torch.full((B, V), float("-inf"), device=cand.device).scatter(-1, top_ids, cand)


def persrm_key(pattern: tuple[str, ...], logits: tuple[bool, ...]) -> str:
    names = ("base" if a == BASE_ADAPTER else "theta" for a in pattern)
    return "persrm[" + ",".join(n + ("" if f else ":h") for n, f in zip(names, logits)) + "]"


def _roles(mode: str) -> list[str]:
    return ["base", "ref", "theta"] if mode == "eq13" else ["base", "theta"]


def _adapter_rows(persrm: PersRM, shared: bool, mode: str) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The PersRM view's adapter per view slot and whether the slot needs logits, for ``mode``."""
    adapters = {"base": BASE_ADAPTER, "ref": BASE_ADAPTER, "theta": ADAPTER}
    roles = _roles(mode)
    rm_roles = roles if shared else roles[1:]
    # with a linear head, π_ref and π_θ rows need only their hidden states (see pad_scores)
    hidden_only = output_head_is_linear(persrm.base_lm)
    return tuple(adapters[r] for r in rm_roles), tuple(r == "base" or not hidden_only for r in rm_roles)


def pad_views(persrm: PersRM, shared: bool) -> dict[str, RowAdapterModel]:
    """The models PAD's views decode, for both modes: model key -> a ``RowAdapterModel`` over the
    PersRM's weights (``assembly.attach_persrm`` registers them before decoding). ``shared``: the base
    model is the PersRM's backbone, so base, π_ref and π_θ rows run in one forward over one copy."""
    out = {}
    for mode in MODES:
        pattern, logits = _adapter_rows(persrm, shared, mode)
        out[persrm_key(pattern, logits)] = RowAdapterModel(persrm.lm, pattern, logits)
    return out


@METHODS.register
class PADMethod(TokenMethod):
    """PAD guided decoding with a PersRM (``persrm=``; ``shared``: its backbone is the main model).

    Assembly (``personalign.assembly``) loads the PersRM and attaches its views (``pad_views``) before
    decoding; ``build_views`` only looks them up.
    """

    name = "pad"
    reads_preference = True
    Config = PADConfig
    requires = ("persrm",)

    def __init__(self, config: PADConfig | None = None, *, persrm: PersRM | None = None, shared: bool = True,
                 **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.persrm, self.shared = persrm, shared

    @classmethod
    def from_resources(cls, config: PADConfig, loaded: Loaded) -> PADMethod:
        return cls(config, persrm=loaded.persrm, shared=loaded.persrm_shared)

    # ---------------------------------------------------------------- views
    def _layout(self, backend: Backend, mode: str) -> tuple[list[str], list[str]]:
        """(model key per view, role per view) for ``mode``."""
        if self.persrm is None:
            raise ValueError("method 'pad' needs a PersRM: build it with personalign.assembly (Resources(persrm=DIR)) "
                             "or pass persrm= (CLI: --persrm DIR).")
        roles = _roles(mode)
        key = persrm_key(*_adapter_rows(self.persrm, self.shared, mode))
        if key not in backend.models:
            raise ValueError(f"the backend has no PersRM view {key!r}: attach the PersRM before decoding "
                             "(personalign.assembly.attach_persrm).")
        keys = [key] * len(roles) if self.shared else ["main"] + [key] * (len(roles) - 1)
        return keys, roles

    def build_views(self, request: Request, config: PADConfig, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        pref = require_preference(request, self.name)
        keys, roles = self._layout(backend, config.mode)
        base_ids = build_prompt_ids(backend.tokenizer(), request.prompt, chat_template=chat_template)
        rm_ids = persrm_prompt_ids(self.persrm.tokenizer, request.prompt, pref, chat_template)
        return [ViewSpec(prompt_ids=base_ids if r == "base" else rm_ids, model=m, role=r) for m, r in zip(keys, roles)]

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        modes = {c.mode for c in state.configs}
        if len(modes) != 1:
            raise ValueError(f"`mode` must be the same for every request of a batch, got {sorted(modes)}.")
        dev = state.views.last_logprobs.device
        state.extra["mode"] = modes.pop()
        state.extra["hidden_only"] = output_head_is_linear(self.persrm.base_lm)  # as in `_layout`
        state.extra["beta"] = torch.tensor([c.beta for c in state.configs], dtype=torch.float32, device=dev)
        state.extra["k"] = torch.tensor([c.k for c in state.configs], dtype=torch.long, device=dev)
        if state.extra["mode"] == "eq13":
            with torch.no_grad():
                w = self.persrm.preference_weights([r.preference for r in state.requests], cache=True)
            state.extra["w"] = w.float().to(dev)

    # ---------------------------------------------------------------- step
    def combine(self, lp: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Eq. 13 (or a reward-only mode) from the views' log-probs [B, K, V] and the PersRM's last hidden
        states."""
        views = state.views
        roles = [s.role for s in views.specs[0]]
        dev = views.last_logprobs.device
        hidden_only = state.extra["hidden_only"]
        h_theta = views.last_hidden(roles.index("theta")).float().to(dev)
        head = self.persrm.base_lm.get_output_embeddings()
        args: dict[str, Any] = dict(beta=state.extra["beta"], k=state.extra["k"], mode=state.extra["mode"],
                                    out_weight=head.weight.detach(), out_bias=head.bias)
        if state.extra["mode"] == "eq13":
            h_ref = views.last_hidden(roles.index("ref")).float().to(dev)
            args.update(weights=state.extra["w"], delta_hidden=h_theta - h_ref)
            if not hidden_only:
                args.update(theta_logprobs=lp[:, roles.index("theta")], ref_logprobs=lp[:, roles.index("ref")])
        elif hidden_only:
            args.update(theta_hidden=h_theta)
        else:
            args.update(theta_logprobs=lp[:, roles.index("theta")])
        return pad_scores(lp[:, roles.index("base")], **args)
