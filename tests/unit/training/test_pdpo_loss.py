"""Golden tests of the P-RLHF objectives (``training/pdpo/loss.py``).

Hand-derived values. Take policy log-probs chosen/rejected = (-3, -5) and reference = (-4, -4):
``h = (-3 - -4) - (-5 - -4) = 1 - (-1) = 2``. DPO at beta = 0.5: ``-log sigma(1) = log(1 + e^-1) =
0.31326168751822286``. IPO at beta = 0.5: ``(2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1``. With generic-user
log-probs (-4.5, -3.5): ``h0 = (-0.5) - (0.5) = -1``; DPO ``-log sigma(-0.5) = log(1 + e^0.5) =
0.9740769841801067``; P-DPO at alpha = 0.25: ``0.25 * 0.31326 + 0.75 * 0.97408 = 0.80887315...``.

Tolerances: the inputs are exact small floats and each objective is a handful of elementwise float32
ops (a log-sigmoid, a few adds), each within 1-2 ulp on any CPU's vector math; ``abs=1e-7`` is 3 ulp
at these O(1) values, ``1e-6`` where gradients or several terms add up. Identities between two
objectives that run the same ops (α = 1 reduces to DPO) are asserted exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from personalign.training.pdpo.loss import (
    bradley_terry_loss,
    dpo_loss,
    implicit_reward,
    ipo_loss,
    pdpo_loss,
    personalized_rm_loss,
    pipo_loss,
)

PC, PR = torch.tensor([-3.0]), torch.tensor([-5.0])
RC, RR = torch.tensor([-4.0]), torch.tensor([-4.0])
GC, GR = torch.tensor([-4.5]), torch.tensor([-3.5])


def test_dpo_golden():
    assert float(dpo_loss(PC, PR, RC, RR, beta=0.5)) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)


def test_ipo_golden():
    assert float(ipo_loss(PC, PR, RC, RR, beta=0.5)) == pytest.approx(1.0, abs=1e-7)
    # beta = 0.25: target margin 1/(2*0.25) = 2 = h  ->  zero loss
    assert float(ipo_loss(PC, PR, RC, RR, beta=0.25)) == pytest.approx(0.0, abs=1e-7)


def test_pdpo_golden_mix():
    want = 0.25 * math.log1p(math.exp(-1.0)) + 0.75 * math.log1p(math.exp(0.5))
    got = pdpo_loss(PC, PR, GC, GR, RC, RR, beta=0.5, alpha=0.25)
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_pipo_golden_mix():
    # generic h0 = -1, beta 0.5: (-1 - 1)^2 = 4;  0.5 * 1 + 0.5 * 4 = 2.5
    assert float(pipo_loss(PC, PR, GC, GR, RC, RR, beta=0.5, alpha=0.5)) == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equal_reference_gives_ln2(alpha, beta):
    """h = 0 for both terms -> -log sigma(0) = log 2 whatever alpha and beta."""
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(7, generator=g), torch.randn(7, generator=g)
    got = pdpo_loss(c, r, c.clone(), r.clone(), c.clone(), r.clone(), beta=beta, alpha=alpha)
    assert torch.allclose(got, torch.full((7,), math.log(2.0)), atol=1e-7)


def test_alpha_one_is_dpo_exactly():
    g = torch.Generator().manual_seed(1)
    pc, pr, gc, gr, rc, rr = (torch.randn(16, generator=g) for _ in range(6))
    assert torch.equal(pdpo_loss(pc, pr, gc, gr, rc, rr, beta=0.7, alpha=1.0), dpo_loss(pc, pr, rc, rr, beta=0.7))
    assert torch.equal(pdpo_loss(pc, pr, None, None, rc, rr, beta=0.7, alpha=1.0), dpo_loss(pc, pr, rc, rr, beta=0.7))


def test_alpha_zero_is_generic_dpo():
    g = torch.Generator().manual_seed(2)
    pc, pr, gc, gr, rc, rr = (torch.randn(5, generator=g) for _ in range(6))
    assert torch.allclose(pdpo_loss(pc, pr, gc, gr, rc, rr, beta=0.5, alpha=0.0), dpo_loss(gc, gr, rc, rr, beta=0.5))


def test_dpo_gradient_sign():
    """Minimizing DPO raises the chosen log-prob and lowers the rejected one."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.5).sum().backward()
    assert float(pc.grad) < 0 < float(pr.grad)
    # d/dpc of -log sigma(beta h) = -beta (1 - sigma(beta h)) = -0.5 * (1 - sigma(1))
    assert float(pc.grad) == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1.0))), abs=1e-6)


def test_bradley_terry_and_personalized_rm():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert torch.allclose(bradley_terry_loss(rc, rr), torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0)]))
    gc, gr = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.0])
    want = 0.6 * bradley_terry_loss(rc, rr) + 0.4 * bradley_terry_loss(gc, gr)
    assert torch.allclose(personalized_rm_loss(rc, rr, gc, gr, alpha=0.6), want)
    # Remark F.1: alpha = 0 leaves only the user-agnostic term
    assert torch.allclose(personalized_rm_loss(rc, rr, gc, gr, alpha=0.0), bradley_terry_loss(gc, gr))


def test_implicit_reward():
    assert torch.allclose(implicit_reward(torch.tensor([-3.0]), torch.tensor([-4.0]), 0.5), torch.tensor([0.5]))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="`alpha` must be a number in \\[0, 1\\]"):
        pdpo_loss(PC, PR, GC, GR, RC, RR, beta=0.5, alpha=alpha)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        dpo_loss(PC, PR, RC, RR, beta=beta)


def test_missing_generic_term_below_alpha_one():
    with pytest.raises(ValueError, match="needs the generic-user"):
        pdpo_loss(PC, PR, None, None, RC, RR, beta=0.5, alpha=0.5)


def test_unknown_loss():
    with pytest.raises(ValueError, match="`loss` must be one of dpo, ipo"):
        pdpo_loss(PC, PR, GC, GR, RC, RR, beta=0.5, alpha=0.5, loss="kto")
