"""Teacher forcing a chunk at a time: sequence log-probs computed in bounded forwards on the KV cache.

``HFBackend.sequence_logprobs`` scores every ``(prompt, continuation)`` row in one uncached forward of
the whole text. A server cannot afford that beside its running chats: one forward over a few long
rows can take seconds, and every chat waits for it. ``ChunkedScorer`` computes the same log-probs in
forwards of at most ``advance(tokens)`` tokens: rows are grouped into *units* of at most
``unit_rows`` rows (held in one cache state of the backend); a unit's first forward is a prefill of
each row's first tokens, later ones feed the next tokens of every row (ragged, ``lengths``), and a
finished unit frees its cache. Log-probs of the continuation tokens are gathered as the forwards
run, so nothing of vocabulary size outlives a forward.

Result per row: float32 ``[len(continuation)]``, the same values as ``sequence_logprobs`` up to
float32 reordering (the cached steps sum in another order; tested to ``tests/numerics.py``'s bound).
The server's engine calls ``advance`` once per round with the round's budget (``server.worker``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personalign.types import ViewSpec
from personalign.views.base import Backend

__all__ = ["ChunkedScorer"]


@dataclass
class _Unit:
    rows: list[int]  # indices into the scorer's rows
    state: Any = None  # the backend's cache state once prefilled
    fed: list[int] = field(default_factory=list)  # tokens fed so far per row of the unit
    last: torch.Tensor | None = None  # float32 [n, V]: next-token log-probs after what was fed


class ChunkedScorer:
    """Sequence log-probs of ``rows`` on ``backend``'s model ``model``, in bounded forwards.

    Each row feeds all its tokens but the last (whose prediction closes the row): the first forward
    of a unit prefills at most the prompt of each row, so every continuation token is predicted by a
    position the scorer sees.

    Args:
        backend: an ``HFBackend`` (``prefill``/``step``/``release`` on cache states).
        rows: ``(prompt_ids, continuation_ids)`` pairs; every prompt holds at least one token.
        model: the backend's model key.
        unit_rows: rows advanced together (one cache state); bounds the cache held at once.
    """

    def __init__(self, backend: Backend, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, model: str = "main",
                 unit_rows: int = 8) -> None:
        if unit_rows < 1:
            raise ValueError(f"`unit_rows` must be >= 1, got {unit_rows}.")
        self.backend, self.model = backend, model
        self.seqs: list[list[int]] = []
        self.starts: list[int] = []  # index of the first continuation token in each sequence
        for i, (p, c) in enumerate(rows):
            if not p:
                raise ValueError(f"row {i}: the prompt must hold at least one token.")
            self.seqs.append([int(t) for t in p] + [int(t) for t in c])
            self.starts.append(len(p))
        self.out: list[list[float]] = [[] for _ in self.seqs]
        scored = [i for i in range(len(self.seqs)) if self.starts[i] < len(self.seqs[i])]  # empty continuations: []
        order = sorted(scored, key=lambda i: len(self.seqs[i]))  # rows of similar lengths share a unit
        self.units = [_Unit(rows=order[s: s + unit_rows]) for s in range(0, len(order), unit_rows)]
        self.total = sum(len(self.seqs[i]) - 1 for i in scored)  # tokens to feed
        self.remaining = self.total
        self.forwards = 0

    @property
    def done(self) -> bool:
        return not self.units

    def _collect(self, r: int, pos: int, lp_row: torch.Tensor) -> None:
        """``lp_row`` [V] predicts token ``pos`` of row ``r``: keep its log-prob if it is a continuation token."""
        if pos >= self.starts[r]:
            self.out[r].append(float(lp_row[self.seqs[r][pos]]))

    def advance(self, tokens: int) -> int:
        """Run ONE forward of at most ``tokens`` tokens (at least one per unfinished row of the active
        unit) and return how many it fed; 0 when every row is scored."""
        if self.done:
            return 0
        unit = self.units[0]
        n = len(unit.rows)
        goal = [len(self.seqs[r]) - 1 for r in unit.rows]  # every token but the last is fed
        chunk = max(1, int(tokens) // n)
        if unit.state is None:
            take = [min(chunk, self.starts[r]) for r in unit.rows]  # a prefill covers at most the prompt
            views = [[ViewSpec(prompt_ids=tuple(self.seqs[r][:k]), model=self.model)] for r, k in zip(unit.rows, take)]
            unit.state = self.backend.prefill(views)
            unit.fed = take
            unit.last = unit.state.last_logprobs[:, 0].clone()
            fed = sum(take)
        else:
            lengths = [min(chunk, g - f) for g, f in zip(goal, unit.fed)]
            ids = torch.zeros(n, max(lengths), dtype=torch.long)
            for j, (r, f, k) in enumerate(zip(unit.rows, unit.fed, lengths)):
                ids[j, :k] = torch.tensor(self.seqs[r][f: f + k], dtype=torch.long)
            lp = self.backend.step(unit.state, ids, torch.tensor(lengths))  # float32 [n, 1, L, V]
            for j, (r, f, k) in enumerate(zip(unit.rows, unit.fed, lengths)):
                if k == 0:
                    continue
                self._collect(r, f, unit.last[j])  # fed token f was predicted by the step before
                for i in range(1, k):
                    self._collect(r, f + i, lp[j, 0, i - 1])
            del lp
            unit.fed = [f + k for f, k in zip(unit.fed, lengths)]
            unit.last = unit.state.last_logprobs[:, 0].clone()
            fed = sum(lengths)
        self.forwards += 1
        self.remaining -= fed
        finished = []
        for j, (r, f, g) in enumerate(zip(unit.rows, unit.fed, goal)):
            if f == g and len(self.out[r]) < len(self.seqs[r]) - self.starts[r]:
                self._collect(r, g, unit.last[j])  # the last token: predicted after everything before it
                finished.append(j)
        if all(f >= g for f, g in zip(unit.fed, goal)):
            self.units.pop(0)
            release = getattr(self.backend, "release", None)
            if release is not None:
                release(unit.state, list(range(n)))  # the unit's cache rows go at once
            unit.state = unit.last = None
        elif finished and hasattr(self.backend, "release"):
            self.backend.release(unit.state, finished)  # done rows leave: later forwards skip them
        return fed

    def close(self) -> None:
        """Stop early: the active unit's cache rows are released and nothing more is scored."""
        if self.units and self.units[0].state is not None:
            unit = self.units[0]
            release = getattr(self.backend, "release", None)
            if release is not None:  # rows released before are skipped
                release(unit.state, list(range(len(unit.rows))))
            unit.state = unit.last = None
        self.units = []

    def result(self) -> list[torch.Tensor]:
        """Per row, float32 [len(continuation)]: log p(continuation token | everything before it)."""
        if not self.done:
            raise ValueError("the scorer has rows left to feed; call advance() until done.")
        return [torch.tensor(o, dtype=torch.float32) for o in self.out]
