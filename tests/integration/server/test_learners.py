"""The learner contract, live, for every registered learner (``personalign.learners``): a profile that
names the learner learns from its user's choices (and no other learner does), any order of posts
(several at once, duplicates) and deletes leaves the state a fold of the surviving items from scratch
gives — so undo is exact and one user's folds merge in order — and bad learner fields are refused by
name. A newly registered learner fails ``test_every_learner_has_a_conformance_view`` until it is
given its view here."""

from __future__ import annotations

import random

import pytest
import torch
from tests.integration.server.conftest import ADMIN, MODEL_ID, TEST_LIMITS, pdpo_live, start_server
from tests.integration.server.feedback_ops import random_ops

from personalign.learners import LEARNERS, field_learner
from personalign.server import EngineWorker, Limits, create_app
from personalign.training.pdpo.user_fit import UserEmbedding

# the method each learner's user decodes with, and what of its state must equal the from-scratch fold
METHOD = {"drift": "drift", "pdpo": "pdpo", "incontext": "preference_prompting"}


def _view(name: str, state: dict | None):
    if state is None:
        return None
    if name == "drift":
        return state["pairs"]["ids"]
    if name == "pdpo":
        emb = UserEmbedding.from_dict(state)
        return emb.num_pairs, emb.tensor
    if name == "incontext":
        return state["choices"], state["based_on"], state["hypothesis"], bool(state.get("stale"))
    raise AssertionError(f"learner {name!r} has no conformance view: add it to _view and METHOD")


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm, tiny_chat_tokenizer):
    with pdpo_live(tmp_path_factory.mktemp("learners"), tiny_lm, tiny_chat_tokenizer) as (lv, _):
        yield lv


def test_every_learner_has_a_conformance_view():
    assert set(LEARNERS.names()) == set(METHOD)


def test_health_lists_the_learners(served):
    with served.client(served.new_key()) as c:
        h = c.get("/health").json()
    assert h["learners"] == sorted(LEARNERS.names()) and h["unavailable_learners"] == {}


@pytest.mark.parametrize("name", sorted(METHOD))
def test_a_learner_learns_undoes_exactly_and_folds_in_order(served, name):
    field = field_learner(name)
    profile = {"user": "u", "learner": name, "method": METHOD[name]}
    with served.client(served.new_key(f"{name}-ops")) as c:
        assert c.post("/v1/profiles", json=profile).status_code == 201
        # step 4 deletes the earliest survivor (the most later items to take back), step 7 a random one
        order, content, deletes = random_ops(c, random.Random(7), 8, together=(2, 3), deletes_at={4: 0, 7: -1})
        assert deletes >= 2 and order
        got = c.get("/v1/profiles/u").json()
        assert all(got[field_learner(n)] is None for n in METHOD if n != name)  # only the named learner learns
        assert got[field] is not None
    with served.client(served.new_key(f"{name}-scratch")) as c:
        assert c.post("/v1/profiles", json=profile).status_code == 201
        for fid in order:
            r = c.post("/v1/feedback", json={"id": fid, "user": "u", **content[fid]})
            assert r.status_code == 201 and r.json()["folded"], r.text
        want = c.get("/v1/profiles/u").json()
    assert _same(_view(name, got[field]), _view(name, want[field])), (got[field], want[field])


def test_bad_learner_fields_are_refused_by_name(served):
    with served.client(served.new_key("bad")) as c:
        r = c.post("/v1/profiles", json={"user": "a", "learner": "incontxt"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner"
        assert "incontext" in r.json()["error"]["message"]  # the valid ones, and the close match
        r = c.post("/v1/profiles", json={"user": "a", "learner": "incontext", "method": "base"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner", r.text
        assert "base" in r.json()["error"]["message"]
        r = c.post("/v1/profiles", json={"user": "a", "learner": "drift", "method": "amulet"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner", r.text
        r = c.post("/v1/profiles", json={"user": "a", "learner": "incontext", "learner_params": {"form": "poems"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner_params", r.text
        assert "form" in r.json()["error"]["message"]
        r = c.post("/v1/profiles", json={"user": "a", "learner_params": {"form": "examples"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner_params", r.text
        r = c.post("/v1/profiles", json={"user": "a", "incontext": {"hypothesis": 3}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "incontext", r.text
        assert c.post("/v1/profiles", json={"user": "a", "learner": "incontext"}).status_code == 201
        r = c.patch("/v1/profiles/a", json={"method": "drift"})  # the profile's learner cannot teach it
        assert r.status_code == 400 and r.json()["error"]["param"] == "learner", r.text
        assert c.get("/v1/profiles/a").json()["method"] is None  # nothing stored


def test_explore_alternatives_decode_draws_of_the_drift_weights(served):
    with served.client(served.new_key("explore")) as c:
        for i, (chosen, rejected) in enumerate([("a happy cat", "no"), ("the sun is warm", "hot"),
                                                ("a long happy story", "short")]):
            r = c.post("/v1/feedback", json={"id": f"e{i}", "user": "u", "prompt": f"tell me {i}", "chosen": chosen,
                                             "rejected": rejected})
            assert r.status_code == 201, r.text
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 6,
                "temperature": 0, "seed": 11, "user": "u",
                "personalization": {"method": "drift", "alternatives": "explore"}}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        again = c.post("/v1/chat/completions", json=body).json()
        assert [ch["message"]["content"] for ch in again["choices"]] == \
            [ch["message"]["content"] for ch in r.json()["choices"]]  # the same seed, the same draw
        # the first choice is the estimate: greedy, it writes what plain drift writes for this user
        plain = c.post("/v1/chat/completions", json={**body, "n": 1, "personalization": {"method": "drift"}}).json()
        assert r.json()["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        for bad in ({"n": 1}, {"personalization": {"method": "base", "alternatives": "explore"}},
                    {"user": "nobody", "personalization": {"method": "drift", "alternatives": "explore"}}):
            r = c.post("/v1/chat/completions", json={**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] in (
                "personalization.alternatives", "personalization.method"), r.text
        r = c.post("/v1/chat/completions", json={**body, "personalization": {"method": "drift", "alternatives": "x"}})
        assert r.status_code == 400 and "alternatives" in r.text


def test_a_stale_in_context_state_left_by_a_stop_is_inferred_again_at_the_next_start(served):
    import time

    from personalign.learners.incontext import hypothesis_window

    with served.client(served.new_key("ic-stale")) as c:
        assert c.post("/v1/profiles", json={"user": "u", "learner": "incontext"}).status_code == 201
        for i, (chosen, rejected) in enumerate([("a happy cat", "no"), ("the sun", "hot"), ("a story", "x")]):
            r = c.post("/v1/feedback", json={"id": f"s{i}", "user": "u", "prompt": f"q{i}", "chosen": chosen,
                                             "rejected": rejected})
            assert r.status_code == 201, r.text
        owner = served.store.owner_of(c.headers["Authorization"].split()[1])
    # as a stopped server leaves a delete that changed the items the hypothesis reads
    state = served.store.get_profile(owner, "u")["incontext"]
    served.store.update_profile(owner, "u", {"incontext": {**state, "hypothesis": None, "based_on": [],
                                                           "stale": True}})
    assert (owner, "u") in served.store.stale_states()
    engine = EngineWorker(served.backend, dict(served.engine.methods), max_batch=8)
    app = create_app(engine, served.store, limits=Limits(**TEST_LIMITS), model_id=MODEL_ID, admin_key=ADMIN)
    url, server, thread = start_server(app)  # its start-up infers it again
    try:
        deadline = time.time() + 120
        while (owner, "u") in served.store.stale_states():
            assert time.time() < deadline
            time.sleep(0.05)
        got = served.store.get_profile(owner, "u")["incontext"]
        items = served.store.folded_items(owner, "u")
        assert got["based_on"] == hypothesis_window(items, 2, 6) == state["based_on"]
        assert got["hypothesis"] == state["hypothesis"] and got["choices"] == 3  # as before the stop
    finally:
        server.should_exit = True
        thread.join(timeout=30)
