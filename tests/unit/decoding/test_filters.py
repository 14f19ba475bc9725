"""Top-k and top-p filtering (``decoding.filters``): golden masks, the fast nucleus equal to a full sort
(ties at the boundary included), and the sampler's per-row switches."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from personalign.decoding.filters import filter_top_k, filter_top_p, top_k_keep, top_p_keep


def full_sort(lp: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
    """The nucleus from a full sort of every row."""
    return top_p_keep(lp, p, k=lp.shape[-1])


def test_filter_top_k_per_row():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    out = filter_top_k(s, torch.tensor([2, 0]))
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]
    assert torch.equal(out[1], s[1])  # k = 0: off


def test_filter_top_p_golden():
    # probs 0.5, 0.3, 0.15, 0.05: p = 0.7 keeps {0.5, 0.3} (mass before 3rd token is 0.8 >= 0.7)
    lp = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.15, 0.5, 0.05, 0.3]]))
    out = filter_top_p(lp, torch.tensor([0.7, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True]
    assert torch.isfinite(out[1]).all()
    tiny = filter_top_p(lp, torch.tensor([1e-6, 1.0]))
    assert torch.isfinite(tiny[0]).tolist() == [False, True, False, False]  # best token always kept


def test_top_k_keeps_ties_with_the_kth_value():
    s = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert top_k_keep(s, 2).tolist() == [[True, False, True, True, False]]
    assert top_k_keep(s, 0).all() and top_k_keep(s, 9).all()


def test_filter_top_p_is_the_nucleus_of_the_normalized_scores():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(4, 50, generator=g)
    p = torch.tensor([0.2, 0.5, 0.9, 1.0])
    out = filter_top_p(logits, p)
    keep = full_sort(torch.log_softmax(logits, -1), p)
    assert torch.equal(torch.isfinite(out[:3]), keep[:3])
    assert torch.equal(out[3], logits[3])  # p = 1: the row is untouched
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 1.0), scale=st.floats(0.5, 12.0), k=st.sampled_from([1, 4, 64]),
       step=st.sampled_from([0.0, 0.25]))
def test_fast_nucleus_equals_full_sort(seed, p, scale, k, step):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(3, 200, generator=g)
    if step:  # logits on a grid: many exact ties, also at the nucleus boundary
        logits = (logits / step).round() * step
    lp = torch.log_softmax(logits, -1)
    pt = torch.full((3,), p)
    assert torch.equal(top_p_keep(lp, pt, k=k), full_sort(lp, pt))


def test_nucleus_keeps_every_token_tied_at_its_boundary():
    """A tie at the nucleus boundary (found by the property test above: seed 524, p = 0.390625) is kept
    whole, so the mask does not depend on how a sort or top-k orders equal values."""
    g = torch.Generator().manual_seed(524)
    lp = torch.log_softmax(0.90625 * torch.randn(3, 200, generator=g), -1)
    assert lp[2, 88] == lp[2, 89]  # an exact float32 tie
    pt = torch.full((3,), 0.390625)
    full, fast = full_sort(lp, pt), top_p_keep(lp, pt, k=64)
    assert torch.equal(full, fast) and bool(full[2, 88]) and bool(full[2, 89])
    assert int(full[2].sum()) == int(full_sort(lp[2:3].flip(-1), pt[:1]).sum())  # order-free
    # the kept mass: below p before the last kept value, at least p with it
    probs = lp[2].exp()
    v = lp[2][full[2]].min()
    assert float(probs[lp[2] > v].sum()) < 0.390625 <= float(probs[full[2]].sum())
    # ties and the best token: a uniform row is kept whole, p -> 0 keeps the best token only
    flat = torch.zeros(1, 10)
    assert bool(full_sort(flat, torch.tensor([0.3])).all()) and bool(top_p_keep(flat, torch.tensor([0.3]), k=4).all())
    one = torch.log_softmax(torch.arange(10.0)[None], -1)
    assert full_sort(one, torch.tensor([1e-6])).nonzero().tolist() == [[0, 9]]
