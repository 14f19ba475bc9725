"""``persona_judge``: draft-and-judge decoding across preference views (Persona-judge).

Paper: Zhang, Chen, Feng, Liu, "Persona-judge: Personalized Alignment of Large Language Models via
Token-level Self-judgment" (seed 003; Section 2.2, Algorithm 1, Appendix A.1 and C.2).

One model, ``N >= 2`` preference prompts (views ``0..N-1``: the request's ``preference``, then
``second_preference``, then ``extra_preferences``). Every round, for each row (Algorithm 1):

1. the *draft* view d proposes ``λ`` tokens autoregressively, ``t_i ~ q_i = π(· | prefix_d, y, t_<i)``
   (λ single-token forwards; the first also feeds the view's pending accepted tokens);
2. the *judge* view j scores them in ONE forward of its pending tokens + the λ drafts, giving
   ``p_1 .. p_{λ+1}``;
3. ``t_i`` is kept with probability ``min(1, p_i(t_i) / q_i(t_i))``, in order; at the first rejection
   (after n kept) the next token is drawn from ``norm(max(0, p_{n+1} - q_{n+1}))``; if all λ are
   kept, a bonus token comes from ``p_{λ+1}`` (``ops.speculative_accept``). Each emitted token is
   then distributed exactly as the judge's ``p`` given the text so far (App. C.2);
4. rejected tokens are rolled back in every view's cache (``backend.truncate``); each view keeps the
   accepted tokens it has not seen yet as *pending* and feeds them at its next forward.

Schedules (same output, different forwards):

* ``block`` — the steps above, literally, one round per ``step``: λ single-token draft forwards, one
  judge forward of pending + λ positions, then a roll-back of the rejected drafts; each view in its
  own cache group so that views advance independently.
  λ + 1 forwards per round of n + 1 emitted tokens.
* ``lockstep`` (default) — all views in ONE cache, fed every emitted token in one batched forward,
  so each forward yields the drafter's q_i and the judge's p_i of the same position; draft t_i is
  drawn from q_i and tested against p_i at once. Kept: t_i is emitted (it can never be retracted);
  rejected: the residual draw is emitted and the round ends; after λ kept, the bonus token from
  p_{λ+1}. Every token is decided by the same rule with the same numbers as in ``block`` (the
  round's random draws are made in the block schedule's order), drafts after a rejection are never
  drafted (they cannot change the output), and nothing is ever fed and rolled back: ONE forward
  (of K rows) per emitted token instead of (λ + 1) / (n + 1). The drafter being the judge's own
  model, speculation saves nothing here; judging each draft in the drafter's own forward does.

NOTE: the issue asks for the judge to score the λ drafts in one forward of λ + 1 positions
(Algorithm 1); that is ``schedule=block``. The default ``lockstep`` emits the same tokens (tested:
token for token, greedy and seeded sampling, on crafted and real models) with fewer, cheaper
forwards; rows of a batch on one shared generator draw their random numbers in a different order
than under ``block`` (same distribution, different samples).

Roles: with ``alternate=True`` (the paper's Persona-judge, Fig. 2) round r is drafted by view
``(first_drafter + r) mod N`` and judged by the next one, so with N > 2 the preferences take turns;
with ``alternate=False`` (the paper's Persona-judge-Base) view ``first_drafter`` always drafts and the
other view always judges — the output is then distributed exactly as decoding under the judge's
prompt alone, and in greedy mode equals it token for token.

Greedy mode (rows with temperature 0): drafts are the draft view's argmax and are kept while each
equals the judge's argmax; the next token is the judge's argmax (``ops.greedy_accept``). Sampled rows
use the sampler's pipeline (temperature, top-k, top-p) on both q and p, so exactness holds for the
processed distributions.

Naive reference (the tests): accept/resample on fixed distributions reproduces p (chi-square); the
caches after a round equal a fresh prefill of the accepted text; fixed roles + greedy equals greedy
decoding of the judge's prompt; identical views equal plain decoding of that prompt; ``lockstep``
equals ``block`` token for token.

Identical views (``second_preference`` equal to ``preference``) are allowed: every draft is then
accepted and the method equals decoding under that single prompt; a warning is logged.

NOTE: a row's λ is cut near the model's context so the judge never feeds past it (a row with no
room left for drafts emits one judge token per round); ``lockstep`` applies the same cut so that
both schedules emit the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from personalign.config import check_bool, check_choice, check_int
from personalign.decoding.method import METHODS, DecodeState, Method
from personalign.decoding.sampling import SamplingParams
from personalign.methods.ops import greedy_accept, speculative_accept
from personalign.methods.prompt_views import preference_view, require_preference
from personalign.types import Request, StepOutput, ViewSpec
from personalign.views.base import Backend

__all__ = ["PersonaJudgeConfig", "PersonaJudgeMethod", "round_roles", "sampling_probs", "SCHEDULES"]

logger = logging.getLogger(__name__)
SCHEDULES = ("lockstep", "block")


@dataclass(frozen=True, kw_only=True)
class PersonaJudgeConfig:
    """Persona-judge parameters.

    Attributes:
        second_preference: the second preference text (view 1); the request's ``preference`` is view 0.
        extra_preferences: further preference texts (views 2..N-1) that take turns with the first two.
        draft_tokens: λ, tokens the draft view proposes per round (paper default 4).
        alternate: rotate the draft and judge roles every round (False = Persona-judge-Base).
        first_drafter: the view that drafts the first round (0 = the request's preference).
        residual_eps: below this residual mass (p ≈ q) a rejection resamples from p itself.
        schedule: ``lockstep`` (default: every view fed every emitted token in one batched forward,
            each draft judged as soon as it is drafted) or ``block`` (Algorithm 1 literally: λ draft
            forwards, then one judge forward of λ + 1 positions, then roll-back). Same output.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Algorithm 1 as written (judge forward over the lambda + 1 positions), lambda = 4, alternating roles
        "paper": {"draft_tokens": 4, "alternate": True, "schedule": "block"},
    }

    second_preference: str = ""
    extra_preferences: tuple[str, ...] = ()
    draft_tokens: int = 4
    alternate: bool = True
    first_drafter: int = 0
    residual_eps: float = 1e-6
    schedule: str = "lockstep"

    def __post_init__(self) -> None:
        lam = self.draft_tokens
        check_int("draft_tokens", lam, 1, hint="λ, tokens drafted per round")
        if not isinstance(self.second_preference, str):
            raise ValueError(f"`second_preference` must be a string, got {type(self.second_preference).__name__}.")
        extra = tuple(self.extra_preferences)
        object.__setattr__(self, "extra_preferences", extra)
        for i, e in enumerate(extra):
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"`extra_preferences[{i}]` must be a non-empty text, got {e!r}.")
        if extra and not self.alternate:
            raise ValueError(
                "`extra_preferences` needs `alternate=true`: with fixed roles only views 0 (draft) and 1 (judge) "
                "would ever be used."
            )
        n = 2 + len(extra)
        f = self.first_drafter
        check_int("first_drafter", f, 0, n - 1, hint="a view index")
        check_bool("alternate", self.alternate)
        eps = self.residual_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"`residual_eps` must be a number in [0, 1), got {eps!r}.")
        check_choice("schedule", self.schedule, SCHEDULES)

    @property
    def num_views(self) -> int:
        return 2 + len(self.extra_preferences)


def round_roles(r: int | torch.Tensor, first: torch.Tensor, alternate: torch.Tensor, num_views: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft view, judge view), long [B] each, of round ``r`` (int, or long [B] per row) for rows with
    ``first`` [B] and ``alternate`` [B]."""
    d = torch.where(alternate, (first + r) % num_views, first)
    return d, (d + 1) % num_views


def sampling_probs(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from: float32 [B, L, V] from log-probs [B, L, V].

    Temperature, top-k and top-p of each row applied to each of its L positions (greedy rows:
    temperature treated as 1; their probabilities are not used).
    """
    B, L, V = logprobs.shape
    rep = SamplingParams(temperature=params.temperature.repeat_interleave(L), top_k=params.top_k.repeat_interleave(L),
                         top_p=params.top_p.repeat_interleave(L), any_sampled=params.any_sampled,
                         any_top_k=params.any_top_k, any_top_p=params.any_top_p)
    return torch.softmax(rep.filter(logprobs.reshape(B * L, V)), dim=-1).view(B, L, V)


def _draw(kind: str, sizes: list[int], width: int, generator: torch.Generator | None,
          row_generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Exp(1) (``kind="exp"``) or U(0, 1) draws float32 [B, width]; row b needs its first ``sizes[b]``.

    A row with its own generator draws exactly ``sizes[b]`` values, so its sample does not depend on
    its batch neighbours; rows on the shared generator draw one block together. Unused entries are 1.
    """
    B = len(sizes)
    out = torch.ones(B, width, device=device)

    def fill(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return t.exponential_(generator=g) if kind == "exp" else t.uniform_(generator=g)

    shared = [b for b in range(B) if sizes[b] > 0 and row_generators[b] is None]
    for b in range(B):
        if sizes[b] > 0 and row_generators[b] is not None:
            out[b, : sizes[b]] = fill(torch.empty(sizes[b], device=device), row_generators[b])
    if shared:
        out[torch.tensor(shared, device=device)] = fill(torch.empty(len(shared), width, device=device), generator)
    return out


@METHODS.register
class PersonaJudgeMethod(Method):
    """Draft with one preference view, judge with another, exact speculative acceptance."""

    name = "persona_judge"
    reads_preference = True
    Config = PersonaJudgeConfig

    # -- views -----------------------------------------------------------------
    def build_views(self, request: Request, config: Any, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        first = require_preference(request, self.name)
        if not config.second_preference.strip():
            raise ValueError(
                "`second_preference` must be a non-empty text: persona_judge drafts under one preference and judges "
                "under another (e.g. --param second_preference='Generate a concise response.')."
            )
        prefs = [first, config.second_preference.strip(), *(e.strip() for e in config.extra_preferences)]
        specs = [preference_view(request, p, backend, chat_template, role=f"preference:{i}")
                 for i, p in enumerate(prefs)]
        if len({s.prompt_ids for s in specs}) < len(specs):
            logger.warning("persona_judge: some preference views are identical; their rounds accept every draft "
                           "and reduce to decoding under that prompt")
        return specs

    def view_groups(self, num_views: int) -> list[list[int]] | None:
        # lockstep: all views in one cache, one forward per emitted token; block: each view its own
        return None if self.config.schedule == "lockstep" else [[k] for k in range(num_views)]

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        K = state.views.num_views
        if any(c.num_views != K for c in state.configs):
            raise ValueError(f"every request of a batch needs the same number of preferences, got "
                             f"{[c.num_views for c in state.configs]}.")
        if any(c.schedule != self.config.schedule for c in state.configs):
            raise ValueError(f"`schedule` sets the cache layout of the whole batch: a request cannot override it "
                             f"(method: {self.config.schedule!r}, requests: {[c.schedule for c in state.configs]}).")
        room = []
        for b in range(state.batch_size):
            specs = state.views.specs[b] if getattr(state.views, "specs", None) else []
            ctxs = [backend.context_length(s.model) for s in specs] if hasattr(backend, "context_length") else []
            lens = [s.length for s in specs]
            room.append(min(c - n for c, n in zip(ctxs, lens)) if ctxs and None not in ctxs else 1 << 30)
        state.extra.update(
            accepted=[[] for _ in range(state.batch_size)],
            round=0,
            first=torch.tensor([c.first_drafter for c in state.configs]),
            alternate=torch.tensor([c.alternate for c in state.configs]),
            lam=torch.tensor([c.draft_tokens for c in state.configs]),
            room=torch.tensor(room),
        )
        if self.config.schedule == "lockstep":
            B = state.batch_size
            state.extra.update(
                rounds=torch.zeros(B, dtype=torch.long),  # completed rounds per row
                pos=torch.zeros(B, dtype=torch.long),  # drafts accepted so far in the current round
                fresh=torch.ones(B, dtype=torch.bool),  # the next step starts a new round
                cur_lam=torch.zeros(B, dtype=torch.long),
                emitted=torch.zeros(B, dtype=torch.long),
                noise=None,  # per-round random draws of the rows (see _start_rounds)
            )
        for b in range(state.batch_size):
            state.row_stats(b).update(rounds=0, drafted=0, accepted_drafts=0, emitted=0, acceptance_rate=None,
                                      tokens_per_judge_forward=None, drafter_per_round=[],
                                      accepted_per_round=[])

    # -- one round -------------------------------------------------------------
    def step(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        if self.config.schedule == "lockstep":
            return self._step_lockstep(state, backend, generator)
        return self._step_block(state, backend, generator)

    # -- lockstep schedule: one batched forward of every view per emitted token --------------------
    def _step_lockstep(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        """Emit one token per row: the next draft of its round if the judge keeps it, else the
        round's last token (the residual draw after a rejection, or the bonus token)."""
        ex, B, K = state.extra, state.batch_size, state.views.num_views
        lp = state.next_logprobs(backend)  # [B, K, V]: every view has seen every emitted token
        active = ~state.finished.cpu()
        greedy = (state.sampling.temperature <= 0).cpu()
        self._start_rounds(state, generator, active & ex["fresh"], greedy)
        d, j = round_roles(ex["rounds"], ex["first"], ex["alternate"], K)
        rows = torch.arange(B)
        dev = lp.device
        q, p = lp[rows.to(dev), d.to(dev)], lp[rows.to(dev), j.to(dev)]  # [B, V] drafter's, judge's
        pos, lam = ex["pos"], ex["cur_lam"]
        drafting = active & (pos < lam)  # else: the round's bonus token, from p
        lengths = drafting.long().to(dev)
        t = q.argmax(-1)
        n, nxt = greedy_accept(t[:, None], torch.stack([p, p], 1), lengths)
        sampled = active & ~greedy
        if bool(sampled.any()):
            noise = ex["noise"]
            at = pos.clamp(max=noise["draft"].shape[1] - 1).to(dev)  # bonus rows: any column (unused)
            qs = sampling_probs(q[:, None], state.sampling)[:, 0]
            t = torch.where(sampled.to(dev), (qs / noise["draft"][rows.to(dev), at]).argmax(-1), t)
            u = noise["uniform"][rows.to(dev), at][:, None]
            ps = sampling_probs(p[:, None], state.sampling)
            eps = torch.tensor([c.residual_eps for c in state.configs], device=dev)[:, None]
            n_s, nxt_s = speculative_accept(qs[:, None], torch.cat([ps, ps], 1), t[:, None], lengths, u,
                                            noise["final"], eps=eps)
            n, nxt = torch.where(sampled.to(dev), n_s, n), torch.where(sampled.to(dev), nxt_s, nxt)
        n, nxt, t = n.cpu(), nxt.cpu(), t.cpu()
        kept = active & (n > 0)
        tokens = torch.where(kept, t, nxt) * active  # [B]
        ex["pos"] = pos + kept.long()
        ex["emitted"] = ex["emitted"] + active.long()
        ended = active & ~kept  # a rejection or the bonus token closes the round
        for b in torch.nonzero(ended)[:, 0].tolist():
            n_b = int(ex["pos"][b])
            self._record(state.row_stats(b), int(d[b]), int(lam[b]), n_b, n_b + 1)
        ex["rounds"] = ex["rounds"] + ended.long()
        ex["pos"] = ex["pos"].masked_fill(ended, 0)
        ex["fresh"] = ended | (ex["fresh"] & ~active)
        state.pending = tokens[:, None].to(dev)
        return StepOutput(tokens=tokens[:, None], n_tokens=torch.ones(B, dtype=torch.long))

    def _start_rounds(self, state: DecodeState, generator: torch.Generator | None, starting: torch.Tensor,
                      greedy: torch.Tensor) -> None:
        """Set λ of the rows in ``starting`` (bool [B]) and draw their round's random numbers.

        The draws are made in the order of the block schedule's round: Exp(1) noise [V] for each
        draft, then U(0, 1) for the acceptance tests, then Exp(1) noise [V] for the round's last
        token; so a row on its own generator (or a batch of one) emits exactly what the block
        schedule emits. Drafts past a rejection are never drafted; their noise is drawn and unused.
        """
        if not bool(starting.any()):
            return
        ex, B = state.extra, state.batch_size
        lam = torch.minimum(ex["lam"], ex["room"] - ex["emitted"] - 1).clamp(min=0) * starting
        ex["cur_lam"] = torch.where(starting, lam, ex["cur_lam"])
        ex["fresh"] = ex["fresh"] & ~starting
        sampled = starting & ~greedy
        if not bool(sampled.any()):
            return
        dev = state.views.last_logprobs.device
        V = state.views.last_logprobs.shape[-1]
        L = int(lam.max())
        if ex["noise"] is None:
            width = int(ex["lam"].max())
            ex["noise"] = {"draft": torch.ones(B, width, V, device=dev), "uniform": torch.ones(B, width, device=dev),
                           "final": torch.ones(B, V, device=dev)}
        noise, rows = ex["noise"], sampled.to(dev)
        for i in range(L):
            sizes = [V if (lam[b] > i and not greedy[b]) else 0 for b in range(B)]
            if any(sizes):
                e = _draw("exp", sizes, V, generator, state.row_generators, dev)
                noise["draft"][:, i] = torch.where(rows[:, None], e, noise["draft"][:, i])
        u = _draw("uniform", [int(lam[b]) if sampled[b] else 0 for b in range(B)], L, generator,
                  state.row_generators, dev)
        noise["uniform"][:, :L] = torch.where(rows[:, None], u, noise["uniform"][:, :L])
        e = _draw("exp", [V if sampled[b] else 0 for b in range(B)], V, generator, state.row_generators, dev)
        noise["final"] = torch.where(rows[:, None], e, noise["final"])

    # -- block schedule: Algorithm 1 as written ------------------------------------------------------
    def _step_block(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        ex, B, K = state.extra, state.batch_size, state.views.num_views
        accepted: list[list[int]] = ex["accepted"]
        active = ~state.finished.cpu()
        A = torch.tensor([len(a) for a in accepted])
        lam = torch.minimum(ex["lam"], ex["room"] - A - 1).clamp(min=0) * active  # [B]
        d, j = round_roles(ex["round"], ex["first"], ex["alternate"], K)
        greedy = (state.sampling.temperature <= 0).cpu()
        sampled_rows = [bool(active[b] and not greedy[b]) for b in range(B)]
        drafts, q_lp = self._draft(state, backend, generator, d, lam, active, greedy)
        p_lp = self._judge(state, backend, j, drafts, lam, active)
        dev = p_lp.device
        n, nxt = greedy_accept(drafts.to(dev), p_lp, lam.to(dev))
        if not bool(greedy.all()):
            L = drafts.shape[1]
            V = p_lp.shape[-1]
            u = _draw("uniform", [int(lam[b]) if s else 0 for b, s in enumerate(sampled_rows)], L, generator,
                      state.row_generators, dev)
            e = _draw("exp", [V if s else 0 for s in sampled_rows], V, generator, state.row_generators, dev)
            eps = torch.tensor([c.residual_eps for c in state.configs], device=dev)[:, None]
            n_s, nxt_s = speculative_accept(sampling_probs(q_lp, state.sampling), sampling_probs(p_lp, state.sampling),
                                            drafts.to(dev), lam.to(dev), u, e, eps=eps)
            sampled = ~greedy.to(dev)
            n, nxt = torch.where(sampled, n_s, n), torch.where(sampled, nxt_s, nxt)
        n, nxt = n.cpu(), nxt.cpu()
        tokens = torch.cat([drafts.cpu(), torch.zeros(B, 1, dtype=torch.long)], 1)
        tokens[torch.arange(B), n] = nxt
        backend.truncate(state.views, A + n)  # roll back rejected drafts in every view
        for b in range(B):
            if not active[b]:
                continue
            emitted = tokens[b, : int(n[b]) + 1].tolist()
            accepted[b].extend(emitted)
            self._record(state.row_stats(b), int(d[b]), int(lam[b]), int(n[b]), len(emitted))
        ex["round"] += 1
        return StepOutput(tokens=tokens, n_tokens=n + 1)

    @staticmethod
    def _record(st: dict[str, Any], drafter: int, lam: int, n: int, emitted: int) -> None:
        st["rounds"] += 1
        st["drafted"] += lam
        st["accepted_drafts"] += n
        st["emitted"] += emitted
        st["acceptance_rate"] = st["accepted_drafts"] / st["drafted"] if st["drafted"] else None
        st["tokens_per_judge_forward"] = st["emitted"] / st["rounds"]
        st["drafter_per_round"].append(drafter)
        st["accepted_per_round"].append(n)

    def _pending(self, state: DecodeState, k: int, rows: torch.Tensor, extra: list[list[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens to feed view ``k``: its unseen accepted tokens (+ ``extra[b]``) for ``rows``.

        Returns ``(tokens long [B, W], lengths long [B], n_pending long [B])``; other rows get length 0.
        """
        accepted = state.extra["accepted"]
        fed = state.views.fed[:, k].tolist()
        seqs, n_pend = [], []
        for b in range(state.batch_size):
            pend = accepted[b][int(fed[b]):] if rows[b] else []
            n_pend.append(len(pend))
            seqs.append(pend + (extra[b] if extra is not None and rows[b] else []))
        W = max(1, max(len(s) for s in seqs))
        toks = torch.zeros(state.batch_size, W, dtype=torch.long)
        for b, s in enumerate(seqs):
            toks[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        return toks, torch.tensor([len(s) for s in seqs]), torch.tensor(n_pend)

    def _draft(self, state: DecodeState, backend: Backend, generator: torch.Generator | None, d: torch.Tensor,
               lam: torch.Tensor, active: torch.Tensor, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ draft tokens per row from its draft view. Returns (drafts long [B, L], q log-probs [B, L, V])."""
        B, L = state.batch_size, int(lam.max())
        drafts = torch.zeros(B, L, dtype=torch.long)
        qs = []
        for i in range(L):
            for k in sorted(set(d[active].tolist())):
                rows = (d == k) & (lam > i)
                if i == 0:
                    toks, lens, _ = self._pending(state, k, rows)
                else:
                    toks, lens = drafts[:, i - 1 : i], rows.long()
                if bool((lens > 0).any()):
                    backend.step(state.views, toks, lens, views=[k])
            last = state.views.last_logprobs  # [B, K, V]
            q = last[torch.arange(B, device=last.device), d.to(last.device)]  # [B, V]
            V = q.shape[-1]
            sizes = [V if (lam[b] > i and not greedy[b]) else 0 for b in range(B)]
            t = q.argmax(-1).cpu()
            if any(sizes):
                probs = sampling_probs(q[:, None], state.sampling)[:, 0]
                e = _draw("exp", sizes, V, generator, state.row_generators, q.device)
                t = torch.where(greedy, t, (probs / e).argmax(-1).cpu())
            drafts[:, i] = torch.where(lam > i, t, torch.zeros_like(t))
            qs.append(q)
        V = state.views.last_logprobs.shape[-1]
        q_lp = torch.stack(qs, 1) if qs else torch.zeros(B, 0, V, device=state.views.last_logprobs.device)
        return drafts, q_lp

    def _judge(self, state: DecodeState, backend: Backend, j: torch.Tensor, drafts: torch.Tensor, lam: torch.Tensor,
               active: torch.Tensor) -> torch.Tensor:
        """The judge's p_1..p_{L+1}: float32 [B, L + 1, V], from ONE forward of pending + drafts per view."""
        B, L = drafts.shape
        last = state.views.last_logprobs
        out = torch.zeros(B, L + 1, last.shape[-1], device=last.device)
        for k in sorted(set(j[active].tolist())):
            rows = (j == k) & active
            extra = [drafts[b, : int(lam[b])].tolist() for b in range(B)]
            toks, lens, n_pend = self._pending(state, k, rows, extra)
            prev = state.views.last_logprobs[:, k].clone()  # valid for rows with nothing pending
            if bool((lens > 0).any()):
                lp = backend.step(state.views, toks, lens, views=[k])[:, 0]  # [B, W, V]
                full = torch.cat([prev[:, None], lp.to(prev.device)], 1)  # [B, W + 1, V]
            else:
                full = prev[:, None]
            # p_{i+1} sits after pending token n_pend-1 and drafts t_1..t_i: column n_pend + i of `full`.
            pos = (n_pend[:, None] + torch.arange(L + 1)[None]).clamp(max=full.shape[1] - 1).to(full.device)
            p = full.gather(1, pos[..., None].expand(B, L + 1, full.shape[-1]))
            out = torch.where(rows.to(out.device)[:, None, None], p, out)
        return out

    # -- command line and benchmark hooks ---------------------------------------
