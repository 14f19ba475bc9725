"""Keys own their users: key A can neither see, change nor send feedback for key B's users (404; feedback
for a user id A has no profile for creates A's own user of that id)."""

from __future__ import annotations

import httpx
import pytest

MSG = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def two(live):
    a, b = live.client(live.new_key("A")), live.client(live.new_key("B"))
    assert b.post("/v1/profiles", json={"user": "bob", "preference": "formal", "method": "preference_prompting"}
                  ).status_code == 201
    r = b.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3, "user": "bob"})
    assert r.status_code == 200
    fb = b.post("/v1/feedback", json={"id": "b-1", "user": "bob", "prompt": "hi", "chosen": "yes", "rejected": "no"})
    assert fb.status_code == 201, fb.text
    yield a, b, r.json()["id"]
    a.close()
    b.close()


def test_cannot_see(two):
    a, b, _ = two
    assert a.get("/v1/profiles/bob").status_code == 404
    assert "bob" not in [p["user"] for p in a.get("/v1/profiles").json()["data"]]
    assert a.get("/v1/feedback/b-1").status_code == 404
    assert a.get("/v1/feedback", params={"user": "bob"}).json()["data"] == []
    assert b.get("/v1/profiles/bob").status_code == 200


def test_cannot_change(two):
    a, b, _ = two
    assert a.patch("/v1/profiles/bob", json={"preference": "rude"}).status_code == 404
    assert a.delete("/v1/profiles/bob").status_code == 404
    assert b.get("/v1/profiles/bob").json()["preference"] == "formal"


def test_cannot_use_in_chat_or_feedback(two):
    a, b, cid = two
    r = a.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3,
                                              "personalization": {"profile_id": "bob"}})
    assert r.status_code == 404
    # feedback for a user A has no profile for creates A's own user of that name (as the CLI creates a
    # profile file): B's bob is neither reached nor revealed
    r = a.post("/v1/feedback", json={"id": "a-1", "user": "bob", "prompt": "hi", "chosen": "yes", "rejected": "no"})
    assert r.status_code == 201, r.text
    assert a.get("/v1/profiles/bob").json()["preference"] is None
    assert b.get("/v1/profiles/bob").json()["preference"] == "formal"
    assert b.get("/v1/profiles/bob").json()["drift_profile"]["num_pairs"] == 1  # B's own item only
    # even with a profile of its own called bob, A cannot cite B's completion
    assert a.post("/v1/profiles", json={"user": "bob"}).status_code == 409
    r = a.post("/v1/feedback", json={"id": "a-2", "user": "bob", "chosen_completion_id": cid,
                                     "rejected": "something else"})
    assert r.status_code == 404
    # A's bob is a different user: B's profile is untouched and has B's feedback only
    assert [f["id"] for f in b.get("/v1/feedback", params={"user": "bob"}).json()["data"]] == ["b-1"]
    # the same feedback id is free for another key (ids are per key)
    r = a.post("/v1/feedback", json={"id": "b-1", "user": "bob", "prompt": "hi", "chosen": "x", "rejected": "y"})
    assert r.status_code == 201


def test_keys_are_admin_only_and_revocable(live, two):
    a, _, _ = two
    assert a.post("/v1/keys", json={"name": "mine"}).status_code == 403
    admin = {"Authorization": "Bearer admin-test-key"}
    r = httpx.post(f"{live.url}/v1/keys", json={"name": "temp"}, headers=admin).json()
    assert r["key"].startswith("pa-")
    with live.client(r["key"]) as c:
        assert c.get("/v1/profiles").status_code == 200
        assert httpx.delete(f"{live.url}/v1/keys/{r['id']}", headers=admin).status_code == 200
        assert c.get("/v1/profiles").status_code == 401
    assert httpx.delete(f"{live.url}/v1/keys/{r['id']}", headers=admin).status_code == 404
    # only the hash is stored
    assert r["key"] not in str(live.store.list_keys())
    from sqlalchemy import text

    with live.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).fetchall()
    assert all(r["key"] not in map(str, row) for row in rows)
    # the admin key is not a user key
    assert httpx.get(f"{live.url}/v1/profiles", headers=admin).status_code == 403
