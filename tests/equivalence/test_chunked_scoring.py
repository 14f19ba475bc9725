"""``ChunkedScorer`` (teacher forcing a bounded forward at a time, on the KV cache) ≡ one uncached
forward per row (``HFBackend.sequence_logprobs``), whatever the per-forward budget and unit size,
on full-attention and sliding-window models; and each forward stays within its budget."""

from __future__ import annotations

import pytest
import torch

from personalign.views import HFBackend
from personalign.views.scoring import ChunkedScorer
from tests.architectures import battery
from tests.numerics import assert_close_logprobs


def _rows(g, n=11):
    out = []
    for _ in range(n):
        p = torch.randint(8, 100, (int(torch.randint(1, 18, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(8, 100, (int(torch.randint(0, 14, (1,), generator=g)),), generator=g).tolist()
        out.append((p, c))
    return out


@pytest.mark.parametrize("budget", [1, 3, 16, 10_000])
@pytest.mark.parametrize("unit_rows", [1, 4])
def test_chunked_scores_equal_one_forward_per_row(tiny_lm, tiny_tokenizer, budget, unit_rows):
    be = HFBackend(tiny_lm, tiny_tokenizer)
    rows = _rows(torch.Generator().manual_seed(budget + unit_rows))
    want = be.sequence_logprobs([p for p, _ in rows], [c for _, c in rows])
    sc = ChunkedScorer(be, rows, unit_rows=unit_rows)
    fed = 0
    while not sc.done:
        n = sc.advance(budget)
        active = min(unit_rows, len(rows))
        assert 0 < n <= max(budget, active)  # a forward feeds at most its budget (one token a row at least)
        fed += n
    assert fed == sc.total == sum(len(p) + len(c) - 1 for p, c in rows if c)
    got = sc.result()
    for g, w, (_, c) in zip(got, want, rows):
        assert g.shape == (len(c),)
        if len(c):
            assert_close_logprobs(g, w, tiny_lm, tokens=32)


def test_chunked_scores_past_a_sliding_window(tiny_chat_tokenizer):
    arch = next(a for a in battery() if a.name == "Gemma-3")
    model = arch.make(len(tiny_chat_tokenizer))
    be = HFBackend(model, tiny_chat_tokenizer)
    rows = _rows(torch.Generator().manual_seed(0), n=6)
    want = be.sequence_logprobs([p for p, _ in rows], [c for _, c in rows])
    sc = ChunkedScorer(be, rows, unit_rows=3)
    while not sc.done:
        sc.advance(5)
    for g, w in zip(sc.result(), want):
        if len(w):
            assert_close_logprobs(g, w, model, tokens=32)


def test_a_finished_unit_frees_its_cache(tiny_lm, tiny_tokenizer):
    be = HFBackend(tiny_lm, tiny_tokenizer)
    sc = ChunkedScorer(be, [([1, 8, 9], [10, 11])] * 3, unit_rows=2)
    first = sc.units[0]
    while sc.units and sc.units[0] is first:
        sc.advance(4)
    assert first.state is None  # released and dropped
    while not sc.done:
        sc.advance(4)
    with pytest.raises(ValueError, match="at least one token"):
        ChunkedScorer(be, [([], [1])])
