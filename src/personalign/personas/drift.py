"""Drift approximation: a user's implicit preference as weights over attribute prompts, and its profile.

Seed 002 (Algorithm 1, Eq. 3–6, Section 5). For preference pairs ``(x_j, y_w^j, y_l^j)``, a small
model ``π``, a base system prompt ``s_0`` and attribute prompts ``s_1..s_A``:

    W[j, i] = log π(y_w^j | x_j, s_i) − log π(y_w^j | x_j, s_0)      (sequence log-probs, summed)
    L[j, i] = log π(y_l^j | x_j, s_i) − log π(y_l^j | x_j, s_0)
    v = Σ_j (W[j] − L[j])                                             [A]
    p = argmax_{‖p‖₂ = 1} vᵀp = v / ‖v‖₂                               (Cauchy–Schwarz)

and the ``m`` attributes with the largest ``|p_i|`` (default 7, paper Table 7) steer decoding.
A pair is "predicted" when ``Σ_{i selected} p_i (W[j, i] − L[j, i]) > 0`` (preference accuracy).

Computation: for each pair, the ``2 (A + 1)`` teacher-forced sequences (two responses under the
base and every attribute prompt) run as ONE batched forward of the small model
(``HFBackend.sequence_logprobs``). Nothing is recomputed when pairs are added: ``W`` and ``L`` are
stored per pair, so ``add_pairs`` scores only the new pairs and ``remove_pair`` deletes a row.

NOTE: when ``v = 0`` (no pairs, or pairs that cancel out) every unit vector attains the same
objective 0 and the paper leaves the choice open ("a fixed default"). We use ``p = 0``: the data
express no preference, so decoding falls back to the plain LLM instead of steering towards an
arbitrary mix of attributes.

NOTE: the logistic-regression alternative (paper Section 5) labels each response absolutely
(1 = preferred, 0 = rejected) on its attribute rewards ``r(y) ∈ R^A`` with an L2 penalty; its
coefficient vector is normalized to the unit sphere like the closed form.

NOTE: the selected weights keep their values from the full-pool solution (not renormalized), so
``β`` has the same meaning whatever ``m`` is.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personalign.config import check_choice, check_int
from personalign.personas.attributes import AttributePool, default_pool
from personalign.personas.identity import check_identity, steer_identity, tokenizer_fingerprint
from personalign.personas.prompts import build_prompt_ids
from personalign.records import PairWording, PreferencePair, choice_pairs, load_pairs
from personalign.views.base import Backend

__all__ = [
    "PreferencePair", "fit_pairs", "DriftProfile", "fit_profile", "pair_rewards", "response_rewards", "score_rows",
    "rewards_from_scores",
    "closed_form_weights", "logistic_weights", "select_top", "steer_identity", "tokenizer_fingerprint",
    "PROFILE_FORMAT", "PROFILE_VERSION", "SOLVERS",
]

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "personalign.drift_profile"
PROFILE_VERSION = 1
SOLVERS = ("closed_form", "logistic")


# ---------------------------------------------------------------------- pairs files
_WORDING = PairWording(invalid_json="not valid JSON ({msg}).",
                       not_object="expected an object with prompt, chosen, rejected.",
                       missing="missing field `{key}` (expected prompt, chosen, rejected).",
                       not_text="field `{key}` must be a non-empty text, got {value}.")


def fit_pairs(path: str | Path) -> tuple[list[PreferencePair], int]:
    """The pairs ``{"prompt", "chosen", "rejected"}`` of a file to fit a profile on (``records.load_pairs``,
    other fields ignored), and how many were skipped: a pair whose ``chosen`` equals its ``rejected``
    carries no preference (logged with its line). A malformed record is a ``ValueError`` naming the line."""
    pairs, skipped = [], 0
    for p in load_pairs(path, layout="trl", optional=(), wording=_WORDING):
        if p.chosen.strip() == p.rejected.strip():
            logger.warning("%s: chosen == rejected, pair skipped", p.origin)
            skipped += 1
            continue
        pairs.append(PreferencePair(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected))
    if not pairs:
        raise ValueError(f"pairs file {str(path)!r} holds no usable pair ({skipped} skipped).")
    return pairs, skipped


# ---------------------------------------------------------------------- rewards
def _response_ids(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    """The tokens scored for a response; an empty answer (the model stopped at once) is scored as its
    end-of-sequence token, so "an answer over none" is a pair like any other."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [int(tokenizer.eos_token_id)]
    if not ids:
        raise ValueError(f"response encodes to no tokens and the tokenizer has no end-of-sequence token: {text!r}.")
    return ids[:max_tokens] if max_tokens else ids


def score_rows(tokenizer: Any, prompt: Any, responses: Sequence[str], pool: AttributePool, *,
               chat_template: bool = True, max_response_tokens: int | None = None
               ) -> list[tuple[list[int], list[int]]]:
    """The teacher-forced rows of ``responses`` under the base and every attribute prompt:
    ``(prompt_ids, response_ids)``, response-major (``len(responses) * (A + 1)`` rows)."""
    systems = [pool.base, *pool.prompts]
    prompt_ids = [list(build_prompt_ids(tokenizer, prompt, system=s, chat_template=chat_template)) for s in systems]
    rows = []
    for y in responses:
        ids = _response_ids(tokenizer, y, max_response_tokens)
        rows.extend((p, ids) for p in prompt_ids)
    return rows


def rewards_from_scores(logprobs: Sequence[torch.Tensor], n_responses: int, pool: AttributePool) -> torch.Tensor:
    """Attribute rewards float32 [n_responses, A] from the per-token log-probs of ``score_rows``' rows."""
    seq = torch.stack([t.sum() for t in logprobs]).view(n_responses, len(pool) + 1).float()
    return seq[:, 1:] - seq[:, :1]


def response_rewards(backend: Backend, prompt: str, responses: Sequence[str], pool: AttributePool, *,
                     model: str = "main", chat_template: bool = True,
                     max_response_tokens: int | None = None) -> torch.Tensor:
    """Attribute rewards ``r_i(y | x) = log π(y | x, s_i) − log π(y | x, s_0)``: float32 [len(responses), A].

    All ``len(responses) * (A + 1)`` sequences run as one batched forward.
    """
    rows = score_rows(backend.tokenizer(model), prompt, responses, pool, chat_template=chat_template,
                      max_response_tokens=max_response_tokens)
    lp = backend.sequence_logprobs([p for p, _ in rows], [c for _, c in rows], model=model, batch_size=len(rows))
    return rewards_from_scores(lp, len(responses), pool)


LONG_FIT_SECONDS = 15 * 60  # a fit projected past this is announced, with what shortens it
# Response tokens a fit scores by default (None scores whole responses). 50 DSP pairs with the default
# pool fit in about 10 minutes on 2 CPU cores at 64 tokens, against 37 at full length, with held-out
# accuracy 0.600 against 0.625 (docs/performance.md, "What a Drift fit costs").
FIT_RESPONSE_TOKENS = 64


def pair_rewards(backend: Backend, pairs: Sequence[PreferencePair], pool: AttributePool, *, model: str = "main",
                 chat_template: bool = True, max_response_tokens: int | None = None, progress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, L)``, each float32 [N, A]: one batched forward of ``2 (A + 1)`` rows per pair.

    ``progress`` shows a bar with the time left. After the first pair, a fit projected to take longer
    than ``LONG_FIT_SECONDS`` logs a warning saying so and what shortens it.
    """
    ws, ls = [], []
    t0 = time.perf_counter()
    bar = tqdm(pairs, desc=f"fit drift ({len(pool)} attributes)", unit="pair", disable=not progress)
    for i, pair in enumerate(bar):
        r = response_rewards(backend, pair.prompt, [pair.chosen, pair.rejected], pool, model=model,
                             chat_template=chat_template, max_response_tokens=max_response_tokens)
        ws.append(r[0])
        ls.append(r[1])
        if i == 0 and len(pairs) > 1:
            projected = (time.perf_counter() - t0) * len(pairs)
            if projected > LONG_FIT_SECONDS:
                logger.warning(
                    "fitting %d pairs over %d attributes will take about %.0f minutes (%.1f s per pair: %d scored "
                    "sequences each); a smaller --max-response-tokens (scored tokens per response) or a smaller "
                    "--attributes pool shortens it in proportion", len(pairs), len(pool), projected / 60,
                    projected / len(pairs), 2 * (len(pool) + 1))
    A = len(pool)
    return (torch.stack(ws) if ws else torch.zeros(0, A)), (torch.stack(ls) if ls else torch.zeros(0, A))


# ---------------------------------------------------------------------- solvers
def closed_form_weights(diffs: torch.Tensor) -> torch.Tensor:
    """``p = v / ‖v‖₂`` with ``v = Σ_j diffs[j]`` (diffs float [N, A]); ``p = 0`` when ``v = 0``."""
    v = diffs.double().sum(0)
    norm = torch.linalg.vector_norm(v)
    return (v / norm).float() if norm > 0 else torch.zeros(diffs.shape[1])


def logistic_weights(wins: torch.Tensor, losses: torch.Tensor, l2: float = 1.0, iters: int = 200) -> torch.Tensor:
    """Unit-norm coefficients of an L2 logistic regression, label 1 on ``wins``, 0 on ``losses`` ([N, A])."""
    if wins.shape[0] == 0:
        return torch.zeros(wins.shape[1])
    x = torch.cat([wins, losses]).double()
    y = torch.cat([torch.ones(len(wins)), torch.zeros(len(losses))]).double()
    scale = x.std(0).clamp(min=1e-6)  # standardize so the penalty treats attributes alike
    xs = (x - x.mean(0)) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, reduction="sum")
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    coef = (w.detach() / scale)  # back to the raw reward scale
    norm = torch.linalg.vector_norm(coef)
    return (coef / norm).float() if norm > 0 else torch.zeros(x.shape[1])


def select_top(weights: torch.Tensor, m: int) -> list[int]:
    """Indices of the ``m`` largest ``|weights|`` (ties: lower index first); zero weights never selected."""
    order = sorted(range(len(weights)), key=lambda i: (-abs(float(weights[i])), i))
    return [i for i in order[:m] if float(weights[i]) != 0.0]


# ---------------------------------------------------------------------- profile
class DriftProfile:
    """A user's Drift profile: the pool, per-pair rewards, and the weights derived from them.

    Attributes:
        pool: base prompt and attribute prompts used for fitting.
        wins, losses: float32 [N, A] per-pair rewards of the chosen / rejected response.
        pair_ids: N pair identities (``PreferencePair.pair_id``).
        steer: identity of the steering model (``steer_identity``).
        top_m: number of attributes used for decoding.
        solver: ``closed_form`` (Eq. 6) or ``logistic`` (Section 5).
        chat_template, max_response_tokens: how sequences were scored (reused when adding pairs).
        manual_weights: float32 [A] weights set by hand (``from_weights``) instead of fitted.
        stats: fitting statistics (skipped pairs, time, forwards, ...).
    """

    def __init__(self, *, pool: AttributePool, wins: torch.Tensor, losses: torch.Tensor, pair_ids: list[str],
                 steer: dict[str, Any], top_m: int = 7, solver: str = "closed_form", chat_template: bool = True,
                 max_response_tokens: int | None = FIT_RESPONSE_TOKENS, manual_weights: torch.Tensor | None = None,
                 stats: dict[str, Any] | None = None, created: str | None = None) -> None:
        self.pool, self.wins, self.losses, self.pair_ids = pool, wins.float(), losses.float(), list(pair_ids)
        self.steer, self.top_m, self.solver = dict(steer), top_m, solver
        self.chat_template, self.max_response_tokens = chat_template, max_response_tokens
        self.manual_weights = None if manual_weights is None else manual_weights.float()
        self.stats = dict(stats or {})
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._weights: torch.Tensor | None = None  # solver output, cleared when the pairs change
        self._validate()

    def __repr__(self) -> str:
        return (f"DriftProfile({self.num_pairs} pairs, {len(self.pool)} attributes, top_m={self.top_m}, "
                f"solver={self.solver!r}, steer={self.steer.get('name')!r})")

    def _validate(self) -> None:
        A = len(self.pool)
        if self.wins.shape != self.losses.shape or self.wins.dim() != 2 or self.wins.shape[1] != A:
            raise ValueError(f"`wins`/`losses` must both be [N, {A}], got {tuple(self.wins.shape)} and "
                             f"{tuple(self.losses.shape)}.")
        if len(self.pair_ids) != self.wins.shape[0]:
            raise ValueError(f"`pair_ids` has {len(self.pair_ids)} entries for {self.wins.shape[0]} pairs.")
        check_int("top_m", self.top_m, 1, A, hint="the attribute pool size")
        check_choice("solver", self.solver, SOLVERS)
        if self.manual_weights is not None and self.manual_weights.shape != (A,):
            raise ValueError(f"`manual_weights` must have {A} entries, got {tuple(self.manual_weights.shape)}.")

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_pairs(self) -> int:
        return int(self.wins.shape[0])

    @property
    def diffs(self) -> torch.Tensor:
        """The W − L matrix, float32 [N, A]."""
        return self.wins - self.losses

    @property
    def v(self) -> torch.Tensor:
        """``Σ_j (W[j] − L[j])``, float32 [A]."""
        return self.diffs.double().sum(0).float()

    @property
    def weights(self) -> torch.Tensor:
        """Full-pool weights ``p`` (float32 [A]) from the solver (or ``manual_weights``)."""
        if self.manual_weights is not None:
            return self.manual_weights
        if self._weights is None:
            self._weights = logistic_weights(self.wins, self.losses) if self.solver == "logistic" \
                else closed_form_weights(self.diffs)
        return self._weights

    def selected(self) -> list[tuple[str, str, float]]:
        """``(name, prompt, weight)`` of the ``top_m`` attributes with the largest ``|p|``."""
        p = self.weights
        return [(self.pool.attributes[i].name, self.pool.attributes[i].prompt, float(p[i]))
                for i in select_top(p, self.top_m)]

    def unit_preference(self) -> torch.Tensor:
        """Mean ``W − L`` per attribute, float32 [A] (the paper's "unit implicit preference")."""
        return self.diffs.mean(0) if self.num_pairs else torch.zeros(len(self.pool))

    def pair_scores(self, wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``Σ_{i selected} p_i (W[j, i] − L[j, i])`` for rewards over the full pool, float32 [N]."""
        p = torch.zeros(len(self.pool))
        idx = select_top(self.weights, self.top_m)
        p[idx] = self.weights[idx]
        return (wins - losses) @ p

    def accuracy(self, wins: torch.Tensor, losses: torch.Tensor) -> float:
        """Fraction of pairs with a strictly positive score (ties count as misses)."""
        if wins.shape[0] == 0:
            raise ValueError("accuracy needs at least one pair.")
        return float((self.pair_scores(wins, losses) > 0).float().mean())

    def evaluate(self, backend: Backend, pairs: Sequence[PreferencePair], *, model: str = "main") -> float:
        """Preference accuracy on ``pairs``, scoring only the base and selected attribute prompts."""
        self.check_model(backend.models[model], backend.tokenizer(model))
        sel = self.selected()
        if not sel:
            raise ValueError("the profile selects no attribute (all weights are 0); accuracy is undefined.")
        sub = self.pool.select([n for n, _, _ in sel])
        w, lo = pair_rewards(backend, pairs, sub, model=model, chat_template=self.chat_template,
                             max_response_tokens=self.max_response_tokens)
        p = torch.tensor([wt for _, _, wt in sel])
        return float((((w - lo) @ p) > 0).float().mean())

    def check_model(self, model: Any, tokenizer: Any) -> None:
        """``ValueError`` when ``model``/``tokenizer`` are not the steering model of this profile."""
        check_identity(self.steer, model, tokenizer)

    # ------------------------------------------------------------------ online updates
    def add_pairs(self, backend: Backend, pairs: Iterable[PreferencePair], *, model: str = "main") -> int:
        """Score only the new pairs and append them; returns how many were added.

        A pair already in the profile (same ``pair_id``) is skipped with a warning. The weights
        follow at once (they are derived from the stored rows; old pairs are never rescored).
        """
        if self.manual_weights is not None:
            raise ValueError("this profile has hand-set weights; fit a new profile to learn from pairs.")
        self.check_model(backend.models[model], backend.tokenizer(model))
        known = set(self.pair_ids)
        new = []
        for pair in pairs:
            if pair.chosen.strip() == pair.rejected.strip():
                raise ValueError("a pair's `chosen` and `rejected` are the same text; it carries no preference.")
            if pair.pair_id in known:
                logger.warning("pair %s is already in the profile; skipped", pair.pair_id)
                continue
            known.add(pair.pair_id)
            new.append(pair)
        if not new:
            return 0
        w, lo = pair_rewards(backend, new, self.pool, model=model, chat_template=self.chat_template,
                             max_response_tokens=self.max_response_tokens)
        self.wins = torch.cat([self.wins, w])
        self.losses = torch.cat([self.losses, lo])
        self.pair_ids = [*self.pair_ids, *(p.pair_id for p in new)]
        self._weights = None
        self.stats["num_pairs"] = self.num_pairs
        return len(new)

    def add_choice(self, backend: Backend, prompt: Any, choices: Sequence[str], chosen_index: int, *,
                   model: str = "main") -> int:
        """Learn from one choice: ``choices[chosen_index]`` preferred to each other choice
        (``records.choice_pairs``), scored and appended as ``add_pairs`` does; returns the pairs added."""
        return self.add_pairs(backend, choice_pairs(prompt, choices, chosen_index), model=model)

    def add_rewards(self, pair_id: str, wins: torch.Tensor, losses: torch.Tensor) -> bool:
        """Append one pair already scored (its ``W`` and ``L`` rows, float [A], from ``pair_rewards`` or a
        ``views.scoring.ChunkedScorer`` over ``score_rows``); False when the pair is already in."""
        if self.manual_weights is not None:
            raise ValueError("this profile has hand-set weights; fit a new profile to learn from pairs.")
        A = len(self.pool)
        if tuple(wins.shape) != (A,) or tuple(losses.shape) != (A,):
            raise ValueError(f"`wins` and `losses` must be [{A}] (this profile's pool), got {tuple(wins.shape)}.")
        if pair_id in self.pair_ids:
            return False
        self.wins = torch.cat([self.wins, wins.float()[None]])
        self.losses = torch.cat([self.losses, losses.float()[None]])
        self.pair_ids = [*self.pair_ids, pair_id]
        self._weights = None
        self.stats["num_pairs"] = self.num_pairs
        return True

    def remove_pair(self, pair: PreferencePair | str | int) -> None:
        """Forget one pair, given as the pair, its ``pair_id`` or its row index."""
        if isinstance(pair, PreferencePair):
            pair = pair.pair_id
        if isinstance(pair, str):
            if pair not in self.pair_ids:
                raise ValueError(f"pair {pair!r} is not in this profile.")
            pair = self.pair_ids.index(pair)
        if isinstance(pair, bool) or not isinstance(pair, int) or not 0 <= pair < self.num_pairs:
            raise ValueError(f"pair index must be in [0, {self.num_pairs - 1}], got {pair!r}.")
        keep = [j for j in range(self.num_pairs) if j != pair]
        self.wins, self.losses = self.wins[keep], self.losses[keep]
        self.pair_ids = [self.pair_ids[j] for j in keep]
        self._weights = None
        self.stats["num_pairs"] = self.num_pairs

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(cls, pool: AttributePool, weights: Mapping[str, float], steer: dict[str, Any], *,
                     top_m: int | None = None, chat_template: bool = True) -> DriftProfile:
        """A profile with hand-set weights (name -> p; others 0), no fitting (benchmarks, authored profiles)."""
        p = torch.zeros(len(pool))
        for name, wt in weights.items():
            p[pool.index(name)] = float(wt)
        m = top_m if top_m is not None else max(1, int((p != 0).sum()))
        A = len(pool)
        return cls(pool=pool, wins=torch.zeros(0, A), losses=torch.zeros(0, A), pair_ids=[], steer=steer,
                   top_m=m, chat_template=chat_template, manual_weights=p)

    # ------------------------------------------------------------------ interpretability
    def report_text(self, n: int = 5) -> str:
        """Selected weights and the top/bottom attributes by unit implicit preference, as text."""
        u = self.unit_preference()
        order = sorted(range(len(u)), key=lambda i: -float(u[i]))
        names = self.pool.names
        lines = [f"Drift profile: {self.num_pairs} pairs, steering model {self.steer.get('name')!r}, "
                 f"solver {self.solver}"]
        lines.append(f"selected attributes (top {self.top_m} by |p|):")
        lines += [f"  {name:<20} p = {w:+.3f}" for name, _, w in self.selected()]
        if self.num_pairs:
            lines.append("most preferred (mean W − L, nats per pair):")
            lines += [f"  {names[i]:<20} {float(u[i]):+.3f}" for i in order[:n]]
            lines.append("least preferred:")
            lines += [f"  {names[i]:<20} {float(u[i]):+.3f}" for i in order[::-1][:n]]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of the unit implicit preference per attribute (selected bars highlighted)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vals = self.unit_preference() if self.num_pairs else self.weights
        order = sorted(range(len(vals)), key=lambda i: float(vals[i]))
        chosen = {n for n, _, _ in self.selected()}
        names = [self.pool.names[i] for i in order]
        fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(names) + 1)))
        ax.barh(names, [float(vals[i]) for i in order],
                color=["tab:orange" if n in chosen else "tab:gray" for n in names])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("mean W − L per pair (nats)" if self.num_pairs else "weight p")
        ax.set_title(f"Drift unit implicit preference ({self.num_pairs} pairs; orange = top {self.top_m})")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        p = self.weights
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "created": self.created,
            "steer_model": self.steer,
            "base_prompt": self.pool.base,
            "attributes": self.pool.to_dict()["attributes"],
            "solver": self.solver,
            "top_m": self.top_m,
            "chat_template": self.chat_template,
            "max_response_tokens": self.max_response_tokens,
            "num_pairs": self.num_pairs,
            "weights": {n: float(p[i]) for i, n in enumerate(self.pool.names)},
            "selected": [{"name": n, "prompt": s, "weight": w} for n, s, w in self.selected()],
            "manual_weights": self.manual_weights is not None,
            "unit_preference": {n: float(x) for n, x in zip(self.pool.names, self.unit_preference())},
            "stats": self.stats,
            "pairs": {"ids": self.pair_ids, "wins": self.wins.tolist(), "losses": self.losses.tolist()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def empty(cls, steer: dict[str, Any], pool: AttributePool | None = None, **kwargs: Any) -> DriftProfile:
        """A profile with no pair yet (uniform over nothing: ``drift`` needs a pair to steer), to learn
        online (``add_pairs``, ``add_choice``); ``steer`` from ``steer_identity``, ``kwargs`` as ``__init__``."""
        pool = pool or default_pool()
        kwargs.setdefault("stats", {"source": "feedback"})
        kwargs.setdefault("top_m", min(7, len(pool)))
        return cls(pool=pool, wins=torch.zeros(0, len(pool)), losses=torch.zeros(0, len(pool)), pair_ids=[],
                   steer=steer, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftProfile:
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a Drift profile: expected `format` {PROFILE_FORMAT!r}.")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"Drift profile version {data.get('version')!r} is not supported "
                             f"(this library reads version {PROFILE_VERSION}).")
        try:
            pool = AttributePool.from_dict({"base": data["base_prompt"], "attributes": data["attributes"]})
            A = len(pool)
            pairs = data["pairs"]
            wins = torch.tensor(pairs["wins"], dtype=torch.float32).reshape(-1, A)
            losses = torch.tensor(pairs["losses"], dtype=torch.float32).reshape(-1, A)
            manual = None
            if data.get("manual_weights"):
                manual = torch.tensor([float(data["weights"][n]) for n in pool.names])
            return cls(pool=pool, wins=wins, losses=losses, pair_ids=list(pairs["ids"]), steer=data["steer_model"],
                       top_m=int(data["top_m"]), solver=data["solver"], chat_template=bool(data["chat_template"]),
                       max_response_tokens=data.get("max_response_tokens"), manual_weights=manual,
                       stats=dict(data.get("stats", {})), created=data.get("created", ""))
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"Drift profile is malformed: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> DriftProfile:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Drift profile {str(path)!r} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"Drift profile {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def fit_profile(backend: Backend, pairs: Sequence[PreferencePair], pool: AttributePool | None = None, *,
                model: str = "main", top_m: int = 7, solver: str = "closed_form", chat_template: bool = True,
                max_response_tokens: int | None = FIT_RESPONSE_TOKENS, name: str | None = None, skipped: int = 0,
                progress: bool = False) -> DriftProfile:
    """Algorithm 1: score every pair under the base and attribute prompts and derive the weights
    (``progress``: a bar with the time left, ``pair_rewards``).

    ``max_response_tokens`` scores each response's first N tokens (``FIT_RESPONSE_TOKENS`` by default;
    None scores whole responses); the profile keeps it, so pairs added later are scored the same way.
    """
    pool = pool or default_pool()
    if not isinstance(top_m, int) or isinstance(top_m, bool) or not 1 <= top_m <= len(pool):
        raise ValueError(f"`top_m` must be an integer in [1, {len(pool)}] (the attribute pool size), got {top_m!r}.")
    if max_response_tokens is not None and max_response_tokens < 1:
        raise ValueError(f"`max_response_tokens` must be an integer >= 1 (or None for whole responses), "
                         f"got {max_response_tokens}.")
    t0, f0 = time.perf_counter(), backend.forward_count
    steer = steer_identity(backend.models[model], backend.tokenizer(model), name)
    wins, losses = pair_rewards(backend, pairs, pool, model=model, chat_template=chat_template,
                                max_response_tokens=max_response_tokens, progress=progress)
    prof = DriftProfile(pool=pool, wins=wins, losses=losses, pair_ids=[p.pair_id for p in pairs], steer=steer,
                        top_m=top_m, solver=solver, chat_template=chat_template,
                        max_response_tokens=max_response_tokens)
    v = prof.v
    prof.stats = {
        "num_pairs": len(pairs),
        "skipped_pairs": skipped,
        "v_norm": float(torch.linalg.vector_norm(v)),
        "objective": float(v @ prof.weights),
        "train_accuracy": prof.accuracy(wins, losses) if len(pairs) else None,
        "fit_seconds": round(time.perf_counter() - t0, 3),
        "forwards": backend.forward_count - f0,
    }
    return prof
