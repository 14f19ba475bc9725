"""Random sequences of feedback posts (duplicates included, several at once) and deletes for one user,
through a real HTTP client: the driver of the delete-truth property tests (Drift rows in
``test_feedback_truth.py``, the P-DPO embedding in ``test_pdpo_fit.py``)."""

from __future__ import annotations

import asyncio
import random
import time

import httpx

CONTENTS = [
    {"prompt": "tell me about the cat", "chosen": "the cat was happy", "rejected": "no"},
    {"prompt": "tell me about the dog", "chosen": "the dog ran and ran", "rejected": "the dog"},
    {"prompt": "what is the sun", "chosen": "a big warm star", "rejected": "hot"},
]


def settle(c: httpx.Client, timeout: float = 180) -> None:
    """Wait until no fold waits or runs and no replay is pending."""
    deadline = time.time() + timeout
    q = c.get("/health").json()["queue"]
    while q["folds_waiting"] + q["folds_running"] + q["replays_pending"]:
        assert time.time() < deadline, q
        time.sleep(0.05)
        q = c.get("/health").json()["queue"]


async def _post_many(c: httpx.Client, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=str(c.base_url), headers=dict(c.headers), timeout=120) as ac:
        return await asyncio.gather(*(ac.post("/v1/feedback", json=b) for b in bodies))


def random_ops(c: httpx.Client, rng: random.Random, steps: int, *, together: tuple[int, int] = (2, 3),
               deletes_at: dict[int, int] | None = None) -> tuple[list[str], dict[str, dict], int]:
    """Post and delete at random for user ``u`` (its profile exists), then wait for every fold.

    ``together``: how many posts go at once (inclusive range); ``deletes_at``: steps that delete, with
    the index of the surviving item to delete (-1: a random one). Returns the surviving ids in order
    of acknowledgement (read back from the server), each id's content, and the number of deletes."""
    alive: list[str] = []
    content: dict[str, dict] = {}
    n = deletes = 0
    deletes_at = deletes_at or {}
    for step in range(steps):
        op = rng.random()
        if (op < 0.35 or step in deletes_at) and alive:  # delete one: folded, folding or queued
            i = deletes_at.get(step, -1)
            fid = alive.pop(rng.randrange(len(alive)) if i < 0 else i)
            assert c.delete(f"/v1/feedback/{fid}").json()["deleted"] is True
            deletes += 1
        elif op < 0.65:  # several at once
            bodies = []
            for _ in range(rng.randint(*together)):
                fid, n = f"f{n}", n + 1
                content[fid] = rng.choice(CONTENTS)
                bodies.append({"id": fid, "user": "u", **content[fid], "wait": rng.random() < 0.5})
            for r in asyncio.run(_post_many(c, bodies)):
                assert r.status_code in (201, 202), r.text
            # concurrent posts are acknowledged in an order of the server's choosing: read it back
            alive += [b["id"] for b in bodies]
        else:
            fid, n = f"f{n}", n + 1
            content[fid] = rng.choice(CONTENTS)
            r = c.post("/v1/feedback", json={"id": fid, "user": "u", **content[fid], "wait": rng.random() < 0.5})
            assert r.status_code in (201, 202), r.text
            alive.append(fid)
    settle(c)
    order = [f["id"] for f in c.get("/v1/feedback", params={"user": "u", "limit": 100}).json()["data"]]
    assert sorted(order) == sorted(alive)
    assert all(c.get(f"/v1/feedback/{fid}").json()["folded"] for fid in order)
    return order, content, deletes
