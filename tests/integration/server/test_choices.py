"""Alternatives and a user's choice among them, against a live server.

``n`` choices of one request decode as rows of one batch (seeded: reproducible; greedy: identical),
stream in OpenAI's chunk format with per-choice ``index`` and are all recorded;
``personalization.methods`` answers one prompt with several methods side by side; a choice
(``completion_id`` + ``chosen_index``) is feedback: the chosen reply against each other one, folded
into the user's Drift profile exactly as ``DriftProfile.add_choice`` folds it locally; and every bad
choice is refused by name with nothing stored.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from tests.numerics import drift_weights_atol

from personalign.learners.drift import DriftLearnerConfig
from personalign.personas import drift
from personalign.personas.identity import steer_identity
from personalign.records import choice_pairs
from personalign.server.folding import drift_prompt, item_pair_id

MSG = [{"role": "user", "content": "tell me a story about the cat"}]


def chat(c: httpx.Client, **kw) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 12, **kw})


def texts(body: dict) -> list[str]:
    assert [ch["index"] for ch in body["choices"]] == list(range(len(body["choices"])))
    return [ch["message"]["content"] for ch in body["choices"]]


def _err(r: httpx.Response, status: int, *needles: str, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    e = r.json()["error"]
    for n in needles:
        assert n in e["message"], (n, e["message"])
    if param is not None:
        assert e["param"] == param, e
    return e


@pytest.fixture(scope="module")
def client(live):
    with live.client(live.new_key("choices")) as c:
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        yield c


# ----------------------------------------------------------------------------- n choices
def test_seeded_choices_are_reproducible_distinct_and_recorded(client):
    r1 = chat(client, n=3, temperature=1.0, seed=7, user="u")
    assert r1.status_code == 200, r1.text
    a = texts(r1.json())
    assert len(a) == 3 and len(set(a)) > 1  # sampled rows differ from each other
    assert texts(chat(client, n=3, temperature=1.0, seed=7).json()) == a  # the seed reproduces every choice
    assert texts(chat(client, n=1, temperature=1.0, seed=7).json()) == a[:1]  # choice 0 samples as n = 1 does
    assert all(ch["method"] == "base" for ch in r1.json()["choices"])
    usage = r1.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stored = client.get(f"/v1/chat/completions/{r1.json()['id']}").json()
    assert [c["text"] for c in stored["choices"]] == a and stored["text"] == a[0]
    assert [c["index"] for c in stored["choices"]] == [0, 1, 2]


def test_greedy_choices_are_identical(client):
    a = texts(chat(client, n=2, temperature=0).json())
    assert a[0] == a[1] == texts(chat(client, temperature=0).json())[0]


def test_choices_decode_as_rows_of_one_batch(live_factory):
    lv = live_factory(max_batch=4)
    with lv.client(lv.new_key()) as c:
        cohorts, rows = lv.engine.stats.cohorts, lv.engine.stats.rows
        assert chat(c, n=4, temperature=1.0, seed=1).status_code == 200
        assert lv.engine.stats.cohorts - cohorts == 1 and lv.engine.stats.rows - rows == 4
        assert lv.engine.stats.max_cohort_rows == 4


def _stream(c: httpx.Client, **kw) -> list[dict]:
    body = {"model": "tiny", "messages": MSG, "max_tokens": 12, "stream": True, **kw}
    out = []
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_a_stream_carries_each_choice_by_index(client):
    want = chat(client, n=3, temperature=1.0, seed=5).json()
    chunks = _stream(client, n=3, temperature=1.0, seed=5, stream_options={"include_usage": True})
    got, finish, roles = ["", "", ""], {}, set()
    for ch in chunks[:-1]:
        (c,) = ch["choices"]
        roles |= {c["index"]} if c["delta"].get("role") == "assistant" else set()
        got[c["index"]] += c["delta"].get("content", "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert roles == {0, 1, 2} and got == texts(want)
    assert finish == {ch["index"]: ch["finish_reason"] for ch in want["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == want["usage"]


def test_the_official_client_gets_n_choices(live, client):
    openai = pytest.importorskip("openai")
    key = client.headers["authorization"].split()[1]
    oc = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key)
    r = oc.chat.completions.create(model="tiny", messages=MSG, n=2, temperature=1.0, seed=3, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == texts(chat(client, n=2, temperature=1.0, seed=3).json())
    parts = ["", ""]
    for ch in oc.chat.completions.create(model="tiny", messages=MSG, n=2, temperature=1.0, seed=3, max_tokens=12,
                                         stream=True):
        for c in ch.choices:
            parts[c.index] += c.delta.content or ""
    assert parts == [c.message.content for c in r.choices]


def test_methods_side_by_side(client):
    r = chat(client, temperature=0, personalization={"methods": ["base", "preference_prompting"],
                                                     "preference": "answer like a pirate"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ch["method"] for ch in body["choices"]] == ["base", "preference_prompting"]
    assert [ch["personalization"]["method"] for ch in body["choices"]] == ["base", "preference_prompting"]
    alone = [texts(chat(client, temperature=0, personalization={"method": m, "preference": "answer like a pirate"})
                   .json())[0] for m in ("base", "preference_prompting")]
    assert texts(body) == alone  # each choice is what its method answers alone
    stored = client.get(f"/v1/chat/completions/{body['id']}").json()
    assert [c["method"] for c in stored["choices"]] == ["base", "preference_prompting"]


@pytest.mark.parametrize(("kw", "param", "needle"), [
    ({"n": 5}, "n", "[1, 4]"),
    ({"n": 3, "personalization": {"methods": ["base", "base"]}}, "n", "names 2 methods"),
    ({"personalization": {"methods": ["base", "basee"]}}, "personalization.methods[1]", "unknown method"),
    ({"personalization": {"methods": ["base"] * 5}}, "n", "[1, 4]"),
    ({"personalization": {"method": "base", "methods": ["base"]}}, "personalization.methods", "not both"),
    ({"personalization": {"methods": []}}, "personalization.methods", ""),
])
def test_bad_choice_requests(client, kw, param, needle):
    _err(chat(client, **kw), 400, needle, param=param)


# ----------------------------------------------------------------------------- a choice is feedback
def _completion(c: httpx.Client, n: int = 3, seed: int = 9, user: str = "u") -> dict:
    r = chat(c, n=n, temperature=1.0, seed=seed, user=user)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_choice_folds_n_minus_one_pairs_as_add_choice_does(live, client):
    body = _completion(client, n=3, seed=21)
    choices = texts(body)
    before = client.get("/v1/profiles/u").json()["drift_profile"]
    r = client.post("/v1/feedback", json={"id": "pick-1", "completion_id": body["id"], "chosen_index": 1})
    assert r.status_code == 201, r.text
    fb = r.json()
    pairs = choice_pairs(drift_prompt(MSG), choices, 1)
    assert fb["folded"] and fb["user"] == "u" and fb["chosen_index"] == 1 and fb["completion_id"] == body["id"]
    assert fb["chosen"] == choices[1] and [fb["rejected"], *fb["also_rejected"]] == [p.rejected for p in pairs]
    prof = client.get("/v1/profiles/u").json()["drift_profile"]
    added = len(pairs)
    assert prof["num_pairs"] == (before["num_pairs"] if before else 0) + added
    ids = [item_pair_id("pick-1", p) for p in pairs]  # each item folds its own rows
    assert prof["pairs"]["ids"][-added:] == ids

    # the same fold through the Python API, on the same model
    be = live.backend
    local = drift.DriftProfile.empty(steer_identity(be.models["main"], be.tokenizer()), DriftLearnerConfig().pool)
    assert local.add_choice(be, drift_prompt(MSG), choices, 1) == added
    served = drift.DriftProfile.from_dict(prof)
    keep = [served.pair_ids.index(i) for i in ids]
    torch.testing.assert_close(served.wins[keep], local.wins, rtol=0, atol=1e-3)
    torch.testing.assert_close(served.losses[keep], local.losses, rtol=0, atol=1e-3)
    v = (local.wins - local.losses).sum(0)
    only = drift.DriftProfile(pool=served.pool, wins=served.wins[keep], losses=served.losses[keep],
                              pair_ids=[served.pair_ids[k] for k in keep], steer=served.steer)
    tol = drift_weights_atol(be, pairs, float(v.norm()))
    torch.testing.assert_close(only.weights, local.weights, rtol=0, atol=tol)

    # a retry is the same item; the same choice under another id is the first item; deleting unfolds it
    assert client.post("/v1/feedback", json={"id": "pick-1", "completion_id": body["id"],
                                             "chosen_index": 1}).status_code == 200
    again = client.post("/v1/feedback", json={"id": "pick-1b", "completion_id": body["id"], "chosen_index": 1})
    assert again.status_code == 200 and again.json()["id"] == "pick-1"
    assert client.get("/v1/feedback/pick-1b").status_code == 404
    assert client.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == prof["num_pairs"]
    d = client.delete("/v1/feedback/pick-1").json()
    assert d["unfolded"]
    after = client.get("/v1/profiles/u").json()["drift_profile"]
    assert not set(after["pairs"]["ids"]) & set(ids)
    assert after["num_pairs"] == prof["num_pairs"] - added


def test_bad_choices_are_refused_and_store_nothing(live, client):
    three = _completion(client, n=3, seed=31)
    one = _completion(client, n=1, seed=32)
    same = chat(client, n=2, temperature=0, user="u").json()
    n_pairs = (client.get("/v1/profiles/u").json()["drift_profile"] or {}).get("num_pairs", 0)
    folds = live.engine.stats.folds
    cases = [
        ({"completion_id": three["id"], "chosen_index": 3}, 400, "chosen_index", "[0, 2]"),
        ({"completion_id": three["id"], "chosen_index": -1}, 400, "chosen_index", "[0, 2]"),
        ({"completion_id": three["id"], "chosen_index": "1"}, 400, "chosen_index", ""),
        ({"completion_id": three["id"], "chosen_index": 1.0}, 400, "chosen_index", ""),
        ({"completion_id": three["id"], "chosen_index": True}, 400, "chosen_index", ""),
        ({"completion_id": three["id"]}, 400, "chosen_index", "required"),
        ({"chosen_index": 0}, 400, "completion_id", "required"),
        ({"completion_id": three["id"], "chosen_index": 0, "chosen": "x"}, 400, "chosen", "leave out"),
        ({"completion_id": one["id"], "chosen_index": 0}, 400, "chosen_index", "at least two"),
        ({"completion_id": same["id"], "chosen_index": 0}, 400, "chosen_index", "same text"),
        ({"completion_id": three["id"], "chosen_index": 0, "user": "v"}, 400, "user", "made for user"),
        ({"completion_id": "chatcmpl-nope", "chosen_index": 0}, 404, "completion_id", "unknown completion"),
    ]
    for i, (extra, status, param, needle) in enumerate(cases):
        _err(client.post("/v1/feedback", json={"id": f"bad-{i}", **extra}), status, needle, param=param)
        assert client.get(f"/v1/feedback/bad-{i}").status_code == 404, extra
    with live.client(live.new_key("other")) as other:  # another key's completion is not found
        other.post("/v1/profiles", json={"user": "u"})
        _err(other.post("/v1/feedback", json={"id": "x", "completion_id": three["id"], "chosen_index": 0}), 404,
             param="completion_id")
    assert client.post("/v1/feedback", json={"id": "first", "completion_id": three["id"],
                                             "chosen_index": 2}).status_code == 201
    _err(client.post("/v1/feedback", json={"id": "second", "completion_id": three["id"], "chosen_index": 0}), 409,
         "already judged", "chose choice 2", param="chosen_index")
    assert client.get("/v1/feedback/second").status_code == 404
    assert live.engine.stats.folds == folds + 1
    assert client.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == n_pairs + 2
