"""Sampler pipeline: golden masks, greedy, seeded determinism, the exponential race's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.decoding.sampling import (
    SamplingConfig,
    SamplingParams,
    sample,
    sample_rows,
)


def test_greedy_is_argmax_and_ignores_generator():
    s = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    params = SamplingParams.from_configs([SamplingConfig()] * 4)
    assert torch.equal(sample(s, params, None), s.argmax(-1))


def test_same_seed_same_sample_and_rows_with_own_seed_ignore_neighbours():
    s = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams.from_configs([SamplingConfig(temperature=1.0)] * 3)
    a = sample(s, params, torch.Generator().manual_seed(5))
    b = sample(s, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    own = [torch.Generator().manual_seed(9), None, None]
    alone = sample(s[:1], SamplingParams.from_configs([SamplingConfig(temperature=1.0)]),
                   torch.Generator().manual_seed(0), [torch.Generator().manual_seed(9)])
    mixed = sample(s, params, torch.Generator().manual_seed(123), own)
    assert int(alone[0]) == int(mixed[0])


@pytest.mark.statistical
def test_exponential_race_matches_distribution():
    """20k draws from p = (0.5, 0.3, 0.15, 0.05): chi-square with 3 dof below 16.27 (p = 0.001)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = sample_rows(p.expand(n, 4).clone(), g)
    counts = torch.bincount(draws, minlength=4).double()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 16.27


@pytest.mark.statistical
def test_temperature_top_k_top_p_compose():
    """T = 2 flattens; top-k 3 then top-p 0.9 leaves a known support; empirical ≈ renormalized target."""
    lp = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 20000
    params = SamplingParams.from_configs([SamplingConfig(temperature=2.0, top_k=3, top_p=0.9)] * n)
    draws = sample(lp.expand(n, 4).clone(), params, torch.Generator().manual_seed(3))
    w = torch.tensor([0.4, 0.3, 0.2]).sqrt()  # T = 2 -> p^(1/2), top-3
    q = w / w.sum()  # mass before 3rd = q0 + q1 ~ 0.70 < 0.9: all three stay
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[3] == 0
    chi2 = float(((counts[:3] - n * q) ** 2 / (n * q)).sum())
    assert chi2 < 13.82  # 2 dof, p = 0.001
    assert math.isclose(float(q.sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -1}, "top_k"), ({"temperature": float("nan")}, "temperature")],
)
def test_bad_sampling_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplingConfig(**kwargs)
