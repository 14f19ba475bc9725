"""A user the P-DPO checkpoint never saw learns their own embedding from their choices, live.

The server serves ``pdpo`` with an individual user model that knows one user ("seen"). A new user's
choice among two replies is folded into their Drift profile and, in the same merge, fits their P-DPO
embedding (a fold task in the engine's folding budget): the stored embedding makes the chosen reply
likelier than the generic user does, the next ``pdpo`` request decodes with it (the same tokens as
decoding locally with that embedding), a seen user keeps their own row, and a malformed embedding is
refused by name. Deletes undo exactly: any order of posts (duplicates included, several at once) and
deletes leaves the embedding equal to a fit of the surviving items from scratch (the items after a
deleted one are refitted in order from the embedding before it).
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
from tests.integration.server.conftest import ADMIN, MODEL_ID, TEST_LIMITS, pdpo_live, start_server
from tests.integration.server.feedback_ops import CONTENTS, random_ops

from personalign.decoding.loop import generate
from personalign.server import EngineWorker, Limits, create_app
from personalign.training.pdpo.data import PreferencePair, tokenize_pairs
from personalign.training.pdpo.model import sequence_logps
from personalign.training.pdpo.user_fit import UserEmbedding, generic_embedding
from personalign.types import Request

MSG = [{"role": "user", "content": "tell me a story about the cat"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm, tiny_chat_tokenizer):
    with pdpo_live(tmp_path_factory.mktemp("pdpo"), tiny_lm, tiny_chat_tokenizer) as (lv, users), \
            lv.client(lv.new_key("pdpo")) as c:
        yield lv, c, users


def choose(c, user: str, fid: str, seed: int = 3) -> tuple[dict, dict]:
    r = c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSG, "max_tokens": 10, "n": 2,
                                             "temperature": 1.0, "seed": seed, "user": user})
    assert r.status_code == 200, r.text
    comp = r.json()
    assert comp["choices"][0]["message"]["content"] != comp["choices"][1]["message"]["content"]
    f = c.post("/v1/feedback", json={"id": fid, "completion_id": comp["id"], "chosen_index": 1})
    assert f.status_code == 201 and f.json()["folded"], f.text
    return comp, c.get(f"/v1/profiles/{user}").json()


def test_a_new_users_choice_fits_their_embedding_and_pdpo_uses_it(served, tiny_lm, tiny_chat_tokenizer):
    lv, c, users = served
    assert c.post("/v1/profiles", json={"user": "zed"}).status_code == 201  # not a pdpo user: Drift only
    fits = lv.engine.stats.fits
    _, prof = choose(c, "zed", "z1")
    assert prof["pdpo_embedding"] is None and lv.engine.stats.fits == fits
    assert c.post("/v1/profiles", json={"user": "alice", "method": "pdpo"}).status_code == 201
    fits = lv.engine.stats.fits
    comp, prof = choose(c, "alice", "a1")
    assert lv.engine.stats.fits == fits + 1
    emb = UserEmbedding.from_dict(prof["pdpo_embedding"])
    assert emb.num_pairs == 1 and emb.shape == (2, tiny_lm.config.hidden_size)
    assert prof["drift_profile"]["num_pairs"] == 1  # the same item, the same merge
    # the fitted embedding prefers the chosen reply more than the generic user does (the DPO margin > 0)
    chosen, rejected = (comp["choices"][i]["message"]["content"] for i in (1, 0))
    [tp] = tokenize_pairs([PreferencePair(prompt=MSG, chosen=chosen, rejected=rejected)], tiny_chat_tokenizer,
                          max_prompt_tokens=256, max_response_tokens=128)
    e0 = generic_embedding(users)
    with torch.no_grad():
        def margin(e):
            lp = sequence_logps(tiny_lm, [tp.prompt_ids] * 2, [tp.chosen_ids, tp.rejected_ids], [e, e])
            return float(lp[0] - lp[1])
        assert margin(emb.tensor) > margin(e0) + 1e-3
    assert emb.loss is not None and emb.loss < math.log(2.0)

    # the next pdpo request decodes with it: the same tokens as decoding locally with that embedding
    r = c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSG, "max_tokens": 8, "temperature": 0,
                                             "user": "alice", "personalization": {"method": "pdpo"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["personalization"]["pdpo"] == {"fitted_embedding": True, "num_pairs": 1, "sha256": emb.digest}
    method = lv.engine.methods["pdpo"]

    def local(params):  # on the engine thread, between its rounds
        return lv.engine.call(lambda be: generate(method, [Request(prompt=MSG, params=params)], be, max_new_tokens=8,
                                                chat_template=True)[0]).result(timeout=60)
    want = local({"user_embedding": prof["pdpo_embedding"]})
    assert body["choices"][0]["message"]["content"] == want.text
    generic = local({})
    assert generic.stats["user_fitted_pairs"] is None and want.stats["user_fitted_pairs"] == 1

    # a second choice refits from the last embedding with both pairs
    _, prof2 = choose(c, "alice", "a2", seed=4)
    assert UserEmbedding.from_dict(prof2["pdpo_embedding"]).num_pairs == 2 and prof2["drift_profile"]["num_pairs"] == 2

    # undo: deleting the last item puts back the embedding the first one left, exactly
    d = c.delete("/v1/feedback/a2")
    assert d.status_code == 200 and d.json()["unfolded"]
    prof3 = c.get("/v1/profiles/alice").json()
    assert prof3["pdpo_embedding"] == prof["pdpo_embedding"] and prof3["drift_profile"]["num_pairs"] == 1
    assert c.delete("/v1/feedback/a1").json()["unfolded"]
    prof4 = c.get("/v1/profiles/alice").json()
    assert prof4["pdpo_embedding"] is None and prof4["drift_profile"]["num_pairs"] == 0


def test_a_seen_user_keeps_their_row(served):
    lv, c, _ = served
    assert c.post("/v1/profiles", json={"user": "bob", "method": "pdpo", "pdpo_user_id": "seen"}).status_code == 201
    fits = lv.engine.stats.fits
    _, prof = choose(c, "bob", "b1")
    assert prof["pdpo_embedding"] is None and lv.engine.stats.fits == fits


def test_a_malformed_embedding_is_refused_by_name(served):
    _, c, _ = served
    assert c.post("/v1/profiles", json={"user": "carol"}).status_code == 201
    bad = UserEmbedding(torch.zeros(2, 3)).to_dict()
    bad["shape"] = [2, 4]
    r = c.patch("/v1/profiles/carol", json={"pdpo_embedding": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pdpo_embedding", r.text
    assert "pdpo_embedding.data" in r.json()["error"]["message"]
    assert c.get("/v1/profiles/carol").json()["pdpo_embedding"] is None  # nothing stored
    # the right fields but the wrong shape for this checkpoint: a pdpo request names it
    wrong = UserEmbedding(torch.zeros(3, 5)).to_dict()
    assert c.patch("/v1/profiles/carol", json={"pdpo_embedding": wrong}).status_code == 200
    r = c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSG, "max_tokens": 4, "user": "carol",
                                             "personalization": {"method": "pdpo"}})
    assert r.status_code == 400 and "user_embedding" in r.json()["error"]["message"], r.text



@pytest.mark.parametrize("seed", [0, 1])
def test_any_order_of_posts_and_deletes_leaves_the_embedding_of_the_survivors(served, seed):
    """A fit does the same arithmetic whatever budget it ran in (``EmbeddingFit.advance``), so the
    replayed embedding and the one fitted from scratch are the same tensor, not merely close."""
    lv, _, _ = served
    with lv.client(lv.new_key(f"ptruth{seed}")) as c:
        assert c.post("/v1/profiles", json={"user": "u", "method": "pdpo"}).status_code == 201
        # steps 5 and 8 always delete (step 5 the earliest survivor: the most later items to replay)
        order, content, deletes = random_ops(c, random.Random(seed), 9, together=(2, 2), deletes_at={5: 0, 8: -1})
        assert deletes >= 2
        got = c.get("/v1/profiles/u").json()

    with lv.client(lv.new_key(f"pscratch{seed}")) as c:  # the survivors, folded from scratch in their order
        assert c.post("/v1/profiles", json={"user": "u", "method": "pdpo"}).status_code == 201
        for fid in order:
            assert c.post("/v1/feedback", json={"id": fid, "user": "u", **content[fid]}).status_code == 201
        want = c.get("/v1/profiles/u").json()

    assert got["drift_profile"]["pairs"]["ids"] == want["drift_profile"]["pairs"]["ids"]
    if not order:
        assert got["pdpo_embedding"] is None
        return
    g, w = UserEmbedding.from_dict(got["pdpo_embedding"]), UserEmbedding.from_dict(want["pdpo_embedding"])
    assert g.num_pairs == w.num_pairs == len(order)
    assert torch.equal(g.tensor, w.tensor), float((g.tensor - w.tensor).abs().max())


def test_a_replay_left_undone_by_a_stop_runs_at_the_next_start(served, tmp_path):
    """The stale marks are stored with the delete: a server started on the store replays them."""
    lv, _, _ = served
    with lv.client(lv.new_key("pstale")) as c:
        assert c.post("/v1/profiles", json={"user": "u", "method": "pdpo"}).status_code == 201
        for i, body in enumerate(CONTENTS):
            assert c.post("/v1/feedback", json={"id": f"s{i}", "user": "u", **body}).status_code == 201
        want = c.get("/v1/profiles/u").json()["pdpo_embedding"]
        owner = lv.store.owner_of(c.headers["Authorization"].split()[1])
    # as a stopped server leaves a delete of an earlier item: the later items stale, the profile rolled back
    s0 = lv.store.get_feedback(owner, "s0").learned
    version = lv.store.get_profile(owner, "u")["version"]
    lv.store.write_replay(owner, "u", {"s1": {"stale": True, "pdpo": None}, "s2": {"stale": True, "pdpo": None}},
                          {"pdpo_embedding": s0["pdpo"]}, version)
    assert (owner, "u", lv.store.get_feedback(owner, "s1").pk) in lv.store.stale_users()
    engine = EngineWorker(lv.backend, dict(lv.engine.methods), max_batch=8)
    app = create_app(engine, lv.store, limits=Limits(**TEST_LIMITS), model_id=MODEL_ID, admin_key=ADMIN)
    url, server, thread = start_server(app)  # its start-up replays s1 and s2
    try:
        deadline = time.time() + 120
        while lv.store.get_profile(owner, "u")["pdpo_embedding"] != want:
            assert time.time() < deadline
            time.sleep(0.05)
        assert not [u for u in lv.store.stale_users() if u[0] == owner]
        assert lv.store.get_feedback(owner, "s2").learned == {"pdpo": want}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
