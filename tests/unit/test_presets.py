"""Named presets (``preset: paper``): the paper's own settings, applied between the defaults and the
values given with them, for every method and trainer that declares them; Amulet's iterations as
Algorithm 1 counts them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personalign import METHODS
from personalign.assembly import method_config
from personalign.config import config_from_mapping, expand_preset
from personalign.methods.amulet import AmuletConfig, amulet_coefficients, amulet_iterates
from personalign.training.pdpo.train import PDPOTrainConfig
from personalign.training.persrm.train import PersRMTrainConfig
from tests.numerics import EPS32

# what docs/methods.md cites for each paper preset (a preset that drifts from its citation fails here)
PAPER = {
    "amulet": {"iterations": 59, "alpha": 2.0, "lam": 2.0, "eta": 10.0},
    "drift": {"beta": 0.5, "top_p": 0.9},
    "pad": {"k": 10, "beta": 1.0, "mode": "eq13"},
    "persona_judge": {"draft_tokens": 4, "alternate": True, "schedule": "block"},
    "best_of_n": {"n": 10, "temperature": 0.7},
}
NEEDS = {"persona_judge": {"second_preference": "formal"}}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_sets_the_cited_values_and_values_given_win(name):
    cfg = method_config(name, {"preset": "paper", **NEEDS.get(name, {})})
    assert {k: getattr(cfg, k) for k in PAPER[name]} == PAPER[name]
    key, value = next(iter(PAPER[name].items()))
    other = {int: value + 1, float: value * 2, bool: not value, str: value}[type(value)]
    if isinstance(value, str):
        return
    cfg = method_config(name, {**NEEDS.get(name, {}), key: other, "preset": "paper"})
    assert getattr(cfg, key) == other  # a value given with the preset overrides it, in any order


def test_presets_are_declared_only_where_cited():
    declared = {n for n in METHODS.names() if getattr(METHODS.get(n).Config, "PRESETS", None)}
    assert declared == set(PAPER)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="`preset` must be one of: paper .*got 'papr'"):
        method_config("amulet", {"preset": "papr"})
    with pytest.raises(ValueError, match="`preset` 'paper': EmptyConfig has no presets"):
        method_config("base", {"preset": "paper"})


def test_preset_over_a_base_config_keeps_the_other_fields():
    base = AmuletConfig(iterations=3, eta=4.0)
    cfg = config_from_mapping(AmuletConfig, {"preset": "paper"}, base=base)
    assert (cfg.iterations, cfg.eta) == (59, 10.0)
    assert expand_preset(AmuletConfig, {"alpha": 1.0}) == {"alpha": 1.0}  # no preset: unchanged


def test_trainer_presets_are_the_papers():
    cfg = config_from_mapping(PDPOTrainConfig, {"preset": "paper"})
    assert (cfg.beta, cfg.batch_size * cfg.grad_accum, cfg.learning_rate, cfg.warmup_steps, cfg.epochs,
            cfg.lora_r, cfg.lora_alpha) == (0.5, 32, 5e-5, 150, 2, 8, 16.0)
    cfg = config_from_mapping(PDPOTrainConfig, {"preset": "paper_psoups", "epochs": 1})
    assert (cfg.beta, cfg.lora_alpha, cfg.lora_dropout, cfg.epochs) == (0.1, 32.0, 0.1, 1)
    cfg = config_from_mapping(PersRMTrainConfig, {"preset": "paper"})
    assert (cfg.lr, cfg.epochs, cfg.batch_size * cfg.grad_accum, cfg.lora_r) == (5e-6, 3, 128, 8)
    # the defaults stay ours (documented as differing from the paper)
    d = PDPOTrainConfig()
    assert (d.batch_size, d.warmup_steps) == (8, 0)
    assert dataclasses.fields(PDPOTrainConfig)  # PRESETS is a class variable, not a field
    assert "PRESETS" not in {f.name for f in dataclasses.fields(PDPOTrainConfig)}


def _algorithm1(lp1: torch.Tensor, lpb: torch.Tensor, T: int, alpha: float, lam: float, eta: float) -> torch.Tensor:
    """Algorithm 1 of seed 004 literally: π_1 from the views; for t = 1..T−1 the Eq. 6 update; return π_T.

    Eq. 6: log π_{t+1} = log_softmax((η Σ_{i≤t} u_i + λ η t log π_1 + log π_t) / (λ η t + 1)),
    u_i = α (log π_i − log π_base)."""
    lps = [lp1]
    for t in range(1, T):
        u_sum = sum(alpha * (lp - lpb) for lp in lps)
        lps.append(torch.log_softmax((eta * u_sum + lam * eta * t * lp1 + lps[-1]) / (lam * eta * t + 1), -1))
    return lps[-1]


@pytest.mark.parametrize("T", [1, 2, 60])
def test_amulet_paper_preset_returns_algorithm1s_pi_T(T):
    """Algorithm 1 (seed 004) runs T − 1 updates and returns π_T: at T = 1 plain preference prompting
    (π_1), at T = 2 one update, whose closed form is π_2 ∝ π_1^{(ηα+λη+1)/(λη+1)} π_base^{−ηα/(λη+1)}.
    ``iterations`` counts updates, so Algorithm 1's T is ``iterations = T − 1`` (the paper preset: 59)."""
    g = torch.Generator().manual_seed(T)
    lp1 = torch.log_softmax(torch.randn(2, 40, generator=g), -1)
    lpb = torch.log_softmax(torch.randn(2, 40, generator=g), -1)
    cfg = method_config("amulet", {"preset": "paper"}) if T == 60 else AmuletConfig(iterations=T - 1)
    assert cfg.iterations == T - 1
    want = _algorithm1(lp1.double(), lpb.double(), T, cfg.alpha, cfg.lam, cfg.eta)
    got = amulet_iterates(lp1, lpb, cfg.iterations, cfg.alpha, cfg.lam, cfg.eta)[-1]
    # float32 against the float64 reference: each update is a convex combination of log-policies of
    # magnitude <= M and a log_softmax, a few roundings of size M·eps each, not amplified by later updates
    M = float(torch.cat([lp1, lpb]).abs().max())
    torch.testing.assert_close(got.double(), want, atol=8 * max(T - 1, 1) * M * EPS32, rtol=0)
    if T == 1:  # no update: π_1 itself, as the method normalizes it (log_softmax of log-probs is not the
        # identity bit for bit on every CPU's kernels)
        assert torch.equal(got, torch.log_softmax(lp1, -1))
    if T == 2:
        a, lam, eta = cfg.alpha, cfg.lam, cfg.eta
        golden = torch.log_softmax(((eta * a + lam * eta + 1) * lp1.double() - eta * a * lpb.double())
                                   / (lam * eta + 1), -1)
        torch.testing.assert_close(got.double(), golden, atol=8 * M * EPS32, rtol=0)
        c, d = amulet_coefficients(torch.tensor([cfg.iterations]), a, lam, eta)
        assert float(c) == pytest.approx((eta * a + lam * eta + 1) / (lam * eta + 1))
        assert float(d) == pytest.approx(-eta * a / (lam * eta + 1))
