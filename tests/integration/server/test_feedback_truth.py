"""The feedback log and the profile agree: deletes undo exactly what their item folded.

Random sequences (seeded) of posts — drawn from a few contents, so the same pair arrives under several
ids — and deletes for one user, sent one at a time and several at once, through a real HTTP client.
Afterwards the user's Drift profile must equal a fold, from scratch, of the items that survive (in
their order, under a fresh key), row for row to the float32 bound, and every surviving item says it is
folded.

Tolerance: a row entry is a sum over at most ``T`` reply tokens of the difference of two log-probs,
each of which may differ between the two runs (other folds batched beside it) by ``forward_atol`` of
the tiny model at |log p| ≤ 20, so entries differ by at most ``2 · T`` times that.
"""

from __future__ import annotations

import random

import pytest
import torch
from tests.integration.server.feedback_ops import CONTENTS, random_ops
from tests.numerics import forward_atol


def _rows(profile: dict) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    pairs = profile["drift_profile"]["pairs"] if profile.get("drift_profile") else {"ids": [], "wins": [], "losses": []}
    return list(pairs["ids"]), torch.tensor(pairs["wins"]).reshape(len(pairs["ids"]), -1), \
        torch.tensor(pairs["losses"]).reshape(len(pairs["ids"]), -1)


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, model) -> None:
    atol = 2 * 32 * forward_atol(model, torch.tensor([20.0]))  # T ≤ 32 tokens in CONTENTS under any prompt
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    assert got.shape == want.shape and diff <= atol, (tuple(got.shape), tuple(want.shape), diff, atol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_order_of_posts_and_deletes_equals_a_fold_of_the_survivors(live, tiny_lm, seed):
    key = live.new_key(f"truth{seed}")
    with live.client(key) as c:
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        order, content, _ = random_ops(c, random.Random(seed), 10)
        got = _rows(c.get("/v1/profiles/u").json())

    with live.client(live.new_key(f"scratch{seed}")) as c:  # the survivors, folded from scratch in their order
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        for fid in order:
            assert c.post("/v1/feedback", json={"id": fid, "user": "u", **content[fid]}).status_code == 201
        want = _rows(c.get("/v1/profiles/u").json())

    assert got[0] == want[0]  # the same rows, in the same order: one per surviving item and pair
    assert len(got[0]) == len(order)
    _assert_rows_close(got[1], want[1], tiny_lm)
    _assert_rows_close(got[2], want[2], tiny_lm)


def test_deleting_one_of_two_identical_items_keeps_the_other(live):
    with live.client(live.new_key("twins")) as c:
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        for fid in ("d1", "d2"):
            assert c.post("/v1/feedback", json={"id": fid, "user": "u", **CONTENTS[0]}).status_code == 201
        assert c.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == 2  # a pair folded twice counts twice
        r = c.delete("/v1/feedback/d1").json()
        assert r["deleted"] is True and r["unfolded"] is True
        assert c.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == 1
        assert c.get("/v1/feedback/d2").json()["folded"] is True
        assert c.delete("/v1/feedback/d2").json()["unfolded"] is True
        assert c.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == 0
