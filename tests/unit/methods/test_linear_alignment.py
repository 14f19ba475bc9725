"""Linear Alignment's formula against a naive per-row reference, the fast nucleus, config errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from personalign.config import config_from_mapping
from personalign.methods.linear_alignment import LinearAlignmentConfig, linear_align
from tests.numerics import reduction_atol


def _naive(lp1: list[float], lpb: list[float], r: float, p: float) -> list[float]:
    """Sort π_1, keep the prefix until its mass reaches p, (1 + r) log π_1 − r log π_base there, renormalize."""
    import math

    order = sorted(range(len(lp1)), key=lambda i: -lp1[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= p:
            break
        kept.append(i)
        mass += math.exp(lp1[i])
    s = {i: (1 + r) * lp1[i] - r * lpb[i] for i in kept}
    log_z = math.log(sum(math.exp(v) for v in s.values()))
    return [s[i] - log_z if i in s else float("-inf") for i in range(len(lp1))]


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    lp1 = torch.log_softmax(2 * torch.randn(3, 30, generator=g), -1)
    lpb = torch.log_softmax(2 * torch.randn(3, 30, generator=g), -1)
    r, p = torch.tensor([0.5, 1.0, 4.0]), torch.tensor([0.9, 0.5, 1.0])
    got = linear_align(lp1, lpb, r, p)
    for b in range(3):
        want = torch.tensor(_naive(lp1[b].double().tolist(), lpb[b].double().tolist(), float(r[b]), float(p[b])), dtype=torch.float64)
        assert torch.equal(torch.isinf(got[b]), torch.isinf(want))
        fin = torch.isfinite(want)
        # float32 against a float64 reference: (1 + r)·lp1 − r·lpb is rounded once per op, then
        # renormalized by a log-sum-exp over V terms, at the scores' magnitude
        atol = reduction_atol(lp1.shape[-1], float(want[fin].abs().max()))
        assert float((got[b][fin].double() - want[fin]).abs().max()) <= atol


def test_ratio_zero_is_preference_prompting_on_the_nucleus():
    g = torch.Generator().manual_seed(5)
    lp1 = torch.log_softmax(torch.randn(2, 20, generator=g), -1)
    lpb = torch.log_softmax(torch.randn(2, 20, generator=g), -1)
    # r = 0 on the whole vocabulary: lp1 minus its log-sum-exp (≈ 0): one reduction over V, one rounding
    atol = reduction_atol(lp1.shape[-1], 1.0) + float(lp1.abs().max()) * 2 ** -23
    torch.testing.assert_close(linear_align(lp1, lpb, 0.0, 1.0), lp1, atol=atol, rtol=0)


def test_moves_mass_toward_tokens_the_preference_raised():
    lp1 = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    lpb = torch.log(torch.tensor([[0.7, 0.1, 0.2]]))  # the preference raised token 1
    out = linear_align(lp1, lpb, 1.0, 1.0).exp()[0]
    assert out[1] > 0.3 and out[0] < 0.5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.floats(0.0, 20.0), p=st.floats(0.01, 1.0))
def test_output_is_normalized(seed, r, p):
    g = torch.Generator().manual_seed(seed)
    lp1 = torch.log_softmax(5 * torch.randn(2, 50, generator=g), -1)
    lpb = torch.log_softmax(5 * torch.randn(2, 50, generator=g), -1)
    lpb[:, 0] = float("-inf")
    out = linear_align(lp1, lpb, r, p)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2), atol=2 * reduction_atol(50, 1.0), rtol=0)
    assert torch.isfinite(out.gather(-1, lp1.argmax(-1, keepdim=True))).all()  # best token always kept


@pytest.mark.parametrize(
    "params, field",
    [({"ratio": -0.1}, "ratio"), ({"ratio": float("nan")}, "ratio"), ({"ratio": float("inf")}, "ratio"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p")],
)
def test_bad_config_raises_naming_the_field(params, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LinearAlignmentConfig(**params)


def test_cli_strings_coerce():
    cfg = config_from_mapping(LinearAlignmentConfig, {"ratio": "2.5", "top_p": "0.8"})
    assert (cfg.ratio, cfg.top_p) == (2.5, 0.8)
    with pytest.raises(ValueError, match="`ratio`"):
        config_from_mapping(LinearAlignmentConfig, {"ratio": "nan"})
