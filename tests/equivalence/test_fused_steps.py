"""Rows that come and go: ``step_many`` (several batches in one forward per model) and ``release``.

Reference: the same calls made one by one with ``step`` on identically prefilled states, and plain
uncached forwards of the text each row has seen (``naive_next_logprobs``), in float32, to the float32
bound of ``tests.numerics.forward_atol`` (a merged batch sums in other orders than a lone one).
"""

from __future__ import annotations

import math

import pytest
import torch

from personalign.types import ViewSpec
from personalign.views.hf import HFBackend
from tests.conftest import make_tiny_lm
from tests.equivalence.test_backend import naive_next_logprobs
from tests.numerics import assert_close_logprobs

A_PROMPTS = [[1, 8, 36, 14, 55], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
B_PROMPTS = [[1, 60, 61], [1, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82]]  # two views of one request


@pytest.fixture()
def backend(tiny_lm, tiny_tokenizer):
    return HFBackend(tiny_lm, tiny_tokenizer)


def _states(backend):
    """Batch A: two requests of one view. Batch C: one request of two views in separate groups."""
    a = backend.prefill([[ViewSpec(prompt_ids=p)] for p in A_PROMPTS])
    c = backend.prefill([[ViewSpec(prompt_ids=p) for p in B_PROMPTS]], groups=[[0], [1]])
    return a, c


def test_step_many_equals_separate_steps_and_runs_one_forward(backend, tiny_lm):
    fa, fc = _states(backend)  # fused
    sa, sc = _states(backend)  # separate
    seqs = [list(p) for p in A_PROMPTS]
    for r in range(4):
        ta = torch.tensor([[10 + r], [20 + r]])  # one token per row
        tc = torch.tensor([[[30 + r, 31, 32]], [[40 + r, 41, 42]]]).transpose(0, 1)  # [1, 2, 3]: per view, 3 tokens
        lc = torch.tensor([3 if r % 2 else 2])  # ragged: some rounds feed 2 of the 3 columns
        f0 = backend.forward_count
        out_a, out_c = backend.step_many([(fa, ta, None, None), (fc, tc, lc, [0, 1])])
        assert backend.forward_count - f0 == 1  # both batches, all groups: one forward of the one model
        ref_a = backend.step(sa, ta)
        ref_c = backend.step(sc, tc, lc, views=[0, 1])
        assert out_a.shape == ref_a.shape and out_c.shape == ref_c.shape
        assert_close_logprobs(out_a, ref_a, tiny_lm)
        n = int(lc[0])
        assert_close_logprobs(out_c[:, :, :n], ref_c[:, :, :n], tiny_lm)
        assert_close_logprobs(fa.last_logprobs, sa.last_logprobs, tiny_lm)
        assert_close_logprobs(fc.last_logprobs, sc.last_logprobs, tiny_lm)
        assert torch.equal(fa.fed, sa.fed) and torch.equal(fc.fed, sc.fed)
        for b, s in enumerate(seqs):
            s.append(int(ta[b, 0]))
            assert_close_logprobs(fa.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, s), tiny_lm)
    # the split caches stay usable alone, and narrower feeds left no extra columns behind
    assert fa.cache_length() == sa.cache_length() and fc.cache_length() == sc.cache_length()
    assert_close_logprobs(backend.step(fa, torch.tensor([[5], [6]])), backend.step(sa, torch.tensor([[5], [6]])), tiny_lm)


def test_step_many_one_forward_per_model(tiny_tokenizer):
    V = len(tiny_tokenizer)
    main, steer = make_tiny_lm(V), make_tiny_lm(V, hidden=48)
    be = HFBackend({"main": main, "steer": steer}, tiny_tokenizer)
    two = [[ViewSpec(prompt_ids=A_PROMPTS[0]), ViewSpec(prompt_ids=B_PROMPTS[0], model="steer")]]
    s1, s2 = be.prefill(two), be.prefill([[ViewSpec(prompt_ids=A_PROMPTS[1])]])
    r1, r2 = be.prefill(two), be.prefill([[ViewSpec(prompt_ids=A_PROMPTS[1])]])
    f0 = be.forward_count
    o1, o2 = be.step_many([(s1, torch.tensor([[9]]), None, None), (s2, torch.tensor([[11]]), None, None)])
    assert be.forward_count - f0 == 2  # main (both batches) + steer
    assert_close_logprobs(o1, be.step(r1, torch.tensor([[9]])), steer)
    assert_close_logprobs(o2, be.step(r2, torch.tensor([[11]])), main)


def test_step_many_rejects_the_same_group_twice(backend):
    a, _ = _states(backend)
    with pytest.raises(ValueError, match="same cache group"):
        backend.step_many([(a, torch.tensor([[1], [2]]), None, None), (a, torch.tensor([[3], [4]]), None, None)])


def test_release_drops_rows_and_leaves_the_others_exact(backend, tiny_lm):
    prompts = [A_PROMPTS[0], B_PROMPTS[1], A_PROMPTS[1]]
    state = backend.prefill([[ViewSpec(prompt_ids=p), ViewSpec(prompt_ids=p[:2] + [90])] for p in prompts])
    seqs = [[list(p), list(p[:2] + [90])] for p in prompts]
    backend.step(state, torch.tensor([[12], [13], [14]]))
    for s, t in zip(seqs, (12, 13, 14)):
        s[0].append(t)
        s[1].append(t)
    width = state.cache_length()
    backend.release(state, [1])  # the longest prompt leaves: its columns go too
    assert state.live.tolist() == [True, False, True]
    assert state.groups[0].mask.shape[0] == 4  # 2 requests x 2 views
    assert state.cache_length() < width
    fed_before = state.fed[1].clone()
    out = backend.step(state, torch.tensor([[21], [22], [23]]))
    assert torch.equal(state.fed[1], fed_before)
    assert torch.allclose(out[1], torch.full_like(out[1], -math.log(backend.vocab_size)))
    for b in (0, 2):
        for k in range(2):
            seqs[b][k].append(21 if b == 0 else 23)
            assert_close_logprobs(state.last_logprobs[b, k], naive_next_logprobs(tiny_lm, seqs[b][k]), tiny_lm)
    # truncation still addresses requests by their original index
    backend.truncate(state, torch.tensor([1, 1, 0]))
    backend.step(state, torch.tensor([[31], [32], [33]]))
    for b, keep in ((0, 1), (2, 0)):
        for k in range(2):
            seqs[b][k] = seqs[b][k][: len(seqs[b][k]) - (2 - keep)] + [31 if b == 0 else 33]
            assert_close_logprobs(state.last_logprobs[b, k], naive_next_logprobs(tiny_lm, seqs[b][k]), tiny_lm)
    backend.release(state, [0, 2])
    assert state.groups[0].mask.shape[0] == 0
    backend.step(state, torch.tensor([[1], [2], [3]]))  # nothing live: no forward, no error


def test_release_rejects_bad_rows(backend):
    state = backend.prefill([[ViewSpec(prompt_ids=p)] for p in A_PROMPTS])
    with pytest.raises(ValueError, match="request indices"):
        backend.release(state, [2])
