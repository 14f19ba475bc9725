"""The folding budget on simulated machines: a forward costs ``a + b·n`` seconds (times a seeded noise
factor for a loaded CPU). On every machine — including those whose fixed cost ``a`` alone exceeds the
idle budget, where the old budget fell back to the minimum for good — a fold of ``T`` tokens finishes in
a bounded number of forwards, and its time stays within twice its per-token work plus a few probes.

Bounds, derived: once the fit knows ``a`` and ``b``, every forward feeds at least
``f = min(a/b, max_tokens)`` tokens, so at most ``T/f + 1`` such forwards; before that, probes double
from the minimum, at most ``log2(max_tokens / least) + 1`` of them. Idle, a floor forward's fixed part
is at most half its time, so the fold's time is at most ``2·b·T`` plus ``a`` per probe and one more.
"""

from __future__ import annotations

import math
import random

import pytest

from personalign.server.fold_budget import FoldBudget, FoldCost

MACHINES = [  # (a seconds, b seconds per token): fast, the default-tuned one, slower and busier, a-dominated
    (0.01, 1e-4), (0.04, 1e-3), (0.5, 1e-3), (2.0, 1e-2), (1.0, 1e-5),
]


def _fold(a: float, b: float, total: int, *, busy: bool, noise: float = 0.0, decode: float = 0.1,
          share: float = 0.5, idle: float = 0.2, least: int = 4, max_tokens: int = 512):
    """Fold ``total`` tokens; returns (forwards, fold seconds, decode seconds, sizes)."""
    rng = random.Random(0)
    budget, cost = FoldBudget(share, idle, max_tokens), FoldCost()
    left, forwards, fold_s, decode_s, sizes = total, 0, 0.0, 0.0, []
    for _ in range(1_000_000):
        if left == 0:
            break
        if busy:
            decode_s += decode
        n = budget.plan(cost, least, busy, decode if busy else 0.0)
        if n is None:
            continue
        fed = min(n, left)
        dt = (a + b * fed) * (1 + noise * (2 * rng.random() - 1))
        cost.observe(fed, dt)
        budget.spent(dt, busy)
        left -= fed
        forwards, fold_s = forwards + 1, fold_s + dt
        sizes.append(fed)
    assert left == 0, "the fold never finished"
    return forwards, fold_s, decode_s, sizes


def _bound(a: float, b: float, total: int, least: int = 4, max_tokens: int = 512) -> int:
    f = min(a / b, max_tokens)
    return math.ceil(total / f) + 1 + int(math.log2(max_tokens / least)) + 1


@pytest.mark.parametrize(("a", "b"), MACHINES)
def test_idle_fold_finishes_in_bounded_forwards_and_time(a, b):
    total = 20_000
    forwards, seconds, _, sizes = _fold(a, b, total, busy=False)
    assert forwards <= _bound(a, b, total), (forwards, sizes[:12])
    probes = int(math.log2(512 / 4)) + 2
    assert seconds <= max(2 * b * total, total / 512 * (a + 512 * b)) + probes * a + (a + 512 * b)


@pytest.mark.parametrize(("a", "b"), MACHINES)
def test_noisy_machine_still_progresses(a, b):
    """±40 % noise on every forward (a CPU shared with other work): the fit may err, the fold does not crawl."""
    total = 20_000
    forwards, _, _, sizes = _fold(a, b, total, busy=False, noise=0.4)
    assert forwards <= 2 * _bound(a, b, total), (forwards, sizes[:12])
    tail = sizes[len(sizes) // 2:-1]  # once the fit has settled: never back at the minimum for good
    assert not tail or sum(tail) / len(tail) >= min(a / b, 512) / 3, tail[:12]


@pytest.mark.parametrize(("a", "b"), MACHINES)
def test_busy_fold_takes_its_share_and_finishes(a, b):
    """Beside decoding (0.1 s a round), folding takes about ``share`` of the decoding time — never more
    than that plus one forward — and, even where one forward costs more than the idle budget (the old
    credit cap), it finishes."""
    total = 5_000
    forwards, fold_s, decode_s, sizes = _fold(a, b, total, busy=True)
    assert fold_s <= 0.5 * decode_s + (a + 512 * b) * 2, (fold_s, decode_s)
    assert forwards <= _bound(a, b, total), (forwards, sizes[:12])


def test_cost_fit_separates_fixed_and_per_token_parts():
    cost = FoldCost()
    assert cost.fit() == (0.0, 1e-3, False)
    cost.observe(100, 0.3)
    a, b, known = cost.fit()
    assert not known and a == 0.0 and b == pytest.approx(0.003)  # one size: no lower than the true per-token cost
    cost.observe(200, 0.4)
    assert not cost.fit()[2]  # two forwards: a line through any two points, noise or not
    cost.observe(400, 0.6)
    a, b, known = cost.fit()
    assert known and a == pytest.approx(0.2) and b == pytest.approx(0.001)


def test_a_slope_made_of_noise_does_not_lock_the_forwards_small():
    """A busy machine: a 40 ms fixed part, 0.05 ms a token, and times off by up to 20 ms. The first
    forwards (4, 8 tokens) happen to suggest 5 ms a token, which would put ``a / b`` at 4 tokens and
    keep every later forward there (measured once under load: 118 forwards of about 5 tokens). The slope is not
    twice its standard error, so the floor keeps probing until the sizes show the truth."""
    budget, cost = FoldBudget(0.5, 0.005, max_tokens=512), FoldCost()
    noise = [0.0, 0.02, -0.003, 0.012, -0.01, 0.015, 0.0, -0.005, 0.01, 0.004, -0.008, 0.006]
    sizes = []
    for i in range(12):
        n = budget.plan(cost, 4, busy=False, decode_seconds=0.0)
        sizes.append(n)
        cost.observe(n, 0.040 + 0.00005 * n + noise[i])
    assert sizes[1] == 2 * sizes[0] and sizes[2] == 2 * sizes[1]  # probing, not trusting the first slope
    assert max(sizes) == 512 and sizes[-1] >= 256, sizes  # the fixed part dominates: big forwards


def test_floor_probes_while_the_fit_cannot_tell_and_respects_the_limits():
    budget, cost = FoldBudget(0.5, 0.2, max_tokens=64), FoldCost()
    assert budget.floor(cost, 4) == 4  # nothing known yet
    cost.observe(4, 1.0)
    assert budget.floor(cost, 4) == 8  # one size seen: probe at twice it
    cost.observe(8, 1.0)  # equal times: b is not positive, the fit still cannot tell
    assert budget.floor(cost, 4) == 16
    cost.observe(40, 1.0 + 1e-6)
    assert budget.floor(cost, 4) == 64  # a/b is huge: capped at max_tokens
    assert budget.floor(cost, 100) == 100  # the caller's minimum wins over the cap
    with pytest.raises(ValueError, match="max_tokens"):
        FoldBudget(0.5, 0.2, max_tokens=0)
