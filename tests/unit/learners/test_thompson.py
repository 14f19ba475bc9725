"""``thompson_profile``: a draw of a user's Drift weights by resampling their pairs (bootstrap Thompson
sampling): rows only from the profile, the same draw for the same seed, no spread where every pair
agrees, and over many draws each pair is picked about once per draw."""

from __future__ import annotations

import pytest
import torch

from personalign.learners.drift import thompson_profile
from personalign.personas.attributes import default_pool
from personalign.personas.drift import DriftProfile


def _profile(rows: torch.Tensor) -> DriftProfile:
    pool = default_pool()
    prof = DriftProfile.empty({"name": "tiny"}, pool)
    for i, r in enumerate(rows):
        prof.add_rewards(f"p{i}", r, torch.zeros(len(pool)))
    return prof


def test_a_draw_resamples_the_profiles_own_pairs_reproducibly():
    g = torch.Generator().manual_seed(0)
    prof = _profile(torch.randn(6, len(default_pool()), generator=g))
    a, b, c = (DriftProfile.from_dict(thompson_profile(prof.to_dict(), s)) for s in (1, 1, 2))
    assert a.num_pairs == prof.num_pairs and torch.equal(a.wins, b.wins)  # the same seed, the same draw
    rows = {tuple(r.tolist()) for r in prof.wins}
    assert all(tuple(r.tolist()) in rows for r in a.wins)  # only the profile's own pairs
    assert not torch.equal(a.wins, c.wins)  # another seed, another draw (6^6 of them)


def test_no_spread_where_every_pair_agrees_and_unbiased_counts_otherwise():
    A = len(default_pool())
    same = _profile(torch.ones(4, A))
    draw = DriftProfile.from_dict(thompson_profile(same.to_dict(), 3))
    assert torch.equal(draw.weights, same.weights)
    rows = torch.eye(A)[:5]  # five pairs, each supporting its own attribute
    prof = _profile(rows)
    counts = torch.zeros(5)
    draws = 2000
    for s in range(draws):
        d = DriftProfile.from_dict(thompson_profile(prof.to_dict(), s))
        counts += d.wins[:, :5].sum(0)
    # each pair is drawn Binomial(5, 1/5) times per draw: mean 1; over 2000 draws the mean's sd is
    # sqrt(0.8 / 2000) ≈ 0.02, so 0.1 is five sd
    assert torch.allclose(counts / draws, torch.ones(5), atol=0.1), counts / draws


def test_a_profile_without_pairs_has_nothing_to_draw():
    with pytest.raises(ValueError, match="at least one pair"):
        thompson_profile(_profile(torch.zeros(0, len(default_pool()))).to_dict(), 0)
