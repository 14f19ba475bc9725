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

import asyncio
import random
import time

import httpx
import pytest
import torch
from tests.numerics import forward_atol

CONTENTS = [
    {"prompt": "tell me about the cat", "chosen": "the cat was happy", "rejected": "no"},
    {"prompt": "tell me about the dog", "chosen": "the dog ran and ran", "rejected": "the dog"},
    {"prompt": "what is the sun", "chosen": "a big warm star", "rejected": "hot"},
]


def _settle(c: httpx.Client) -> None:
    deadline = time.time() + 120
    q = c.get("/health").json()["queue"]
    while q["folds_waiting"] + q["folds_running"]:
        assert time.time() < deadline, q
        time.sleep(0.05)
        q = c.get("/health").json()["queue"]


def _rows(profile: dict) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    pairs = profile["drift_profile"]["pairs"] if profile.get("drift_profile") else {"ids": [], "wins": [], "losses": []}
    return list(pairs["ids"]), torch.tensor(pairs["wins"]).reshape(len(pairs["ids"]), -1), \
        torch.tensor(pairs["losses"]).reshape(len(pairs["ids"]), -1)


async def _post_many(url: str, key: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as ac:
        return await asyncio.gather(*(ac.post("/v1/feedback", json=b) for b in bodies))


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, model) -> None:
    atol = 2 * 32 * forward_atol(model, torch.tensor([20.0]))  # T ≤ 32 tokens in CONTENTS under any prompt
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    assert got.shape == want.shape and diff <= atol, (tuple(got.shape), tuple(want.shape), diff, atol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_order_of_posts_and_deletes_equals_a_fold_of_the_survivors(live, tiny_lm, seed):
    rng = random.Random(seed)
    key = live.new_key(f"truth{seed}")
    alive: list[str] = []  # surviving ids, in order of acknowledgement
    content: dict[str, dict] = {}
    n = 0
    with live.client(key) as c:
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        for _ in range(10):
            op = rng.random()
            if op < 0.35 and alive:  # delete one (folded, folding or queued)
                fid = alive.pop(rng.randrange(len(alive)))
                assert c.delete(f"/v1/feedback/{fid}").json()["deleted"] is True
            elif op < 0.65:  # several at once
                bodies = []
                for _ in range(rng.randint(2, 3)):
                    fid, n = f"f{n}", n + 1
                    content[fid] = rng.choice(CONTENTS)
                    bodies.append({"id": fid, "user": "u", **content[fid], "wait": rng.random() < 0.5})
                for r in asyncio.run(_post_many(live.url, key, bodies)):
                    assert r.status_code in (201, 202), r.text
                # concurrent posts are acknowledged in an order of the server's choosing: read it back
                alive += [b["id"] for b in bodies]
            else:
                fid, n = f"f{n}", n + 1
                content[fid] = rng.choice(CONTENTS)
                r = c.post("/v1/feedback", json={"id": fid, "user": "u", **content[fid], "wait": rng.random() < 0.5})
                assert r.status_code in (201, 202), r.text
                alive.append(fid)
        _settle(c)
        order = [f["id"] for f in c.get("/v1/feedback", params={"user": "u", "limit": 100}).json()["data"]]
        assert sorted(order) == sorted(alive)
        assert all(c.get(f"/v1/feedback/{fid}").json()["folded"] for fid in order)
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
