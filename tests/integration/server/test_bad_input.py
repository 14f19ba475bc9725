"""Bad input answers 4xx with an OpenAI-style error body that says what is wrong; never a 500."""

from __future__ import annotations

import pytest

MSG = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def client(live):
    with live.client(live.new_key("bad-input")) as c:
        yield c


def _err(r, status: int, *needles: str, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    msg = body["error"]["message"]
    for n in needles:
        assert n in msg, (n, msg)
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4, **body})


def test_malformed_json(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                    headers={"Content-Type": "application/json"})
    _err(r, 400, "malformed JSON")


def test_unknown_method_lists_the_valid_ones(live, client):
    e = _err(chat(client, personalization={"method": "telepathy"}), 400, "telepathy", "base",
             "preference_prompting", param="personalization.method")
    for name in live.engine.methods:
        assert name in e["message"]


def test_unknown_profile(client):
    _err(chat(client, personalization={"profile_id": "nobody"}), 404, "nobody", param="personalization.profile_id")


@pytest.mark.parametrize("value", [-1, 0, 65])
def test_max_tokens_out_of_range(client, value):
    _err(chat(client, max_tokens=value), 400, "max_tokens", str(value), param="max_tokens")


def test_over_long_message(client):
    msgs = [{"role": "user", "content": "the " * 1000}]
    _err(chat(client, messages=msgs), 400, "4000 characters", "2000", param="messages[0].content")


def test_too_many_messages(client):
    _err(chat(client, messages=MSG * 17), 400, "17 messages", "16", param="messages")


def test_body_too_large(client):
    _err(client.post("/v1/chat/completions", content=b"x" * 70_000, headers={"Content-Type": "application/json"}),
         413, "exceeds")


@pytest.mark.parametrize(("field", "value", "param"), [
    ("max_tokens", "ten", "max_tokens"),
    ("temperature", "hot", "temperature"),
    ("stream", "yes", "stream"),
    ("messages", "hello", "messages"),
    ("messages", [{"role": "user"}], "messages[0].content"),
    ("messages", [{"role": "robot", "content": "hi"}], "messages[0].role"),
    ("seed", 1.5, "seed"),
    ("stop", 3, "stop"),
    ("personalization", "concise", "personalization"),
    ("n", "two", "n"),
    ("n", 0, "n"),
    ("n", 5, "n"),  # over Limits.max_n (4)
    ("n", 2.0, "n"),
])
def test_wrong_types(client, field, value, param):
    e = _err(chat(client, **{field: value}), 400, f"`{param}`")
    assert e["param"] == param


def test_missing_field(client):
    _err(client.post("/v1/chat/completions", json={"model": "tiny"}), 400, "`messages` is required")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("temperature", -0.5, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p")])
def test_sampling_out_of_range(client, field, value, needle):
    _err(chat(client, **{field: value}), 400, needle)


def test_method_params_are_validated(client):
    _err(chat(client, personalization={"method": "base", "beta": 2}), 400, "beta", "no parameters",
         param="personalization.beta")


def test_method_needing_a_preference(client):
    _err(chat(client, personalization={"method": "preference_prompting"}), 400, "preference")


def test_unknown_model(client):
    _err(chat(client, model="gpt-5"), 404, "gpt-5", "tiny", param="model")


def test_empty_user_message(client):
    _err(chat(client, messages=[{"role": "user", "content": "  "}]), 400, "user message")


def test_auth_errors(live):
    import httpx

    _err(httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", "messages": MSG}), 401, "API key")
    _err(httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", "messages": MSG},
                    headers={"Authorization": "Bearer nope"}), 401, "invalid")


def test_unknown_route_and_profile_body_errors(client):
    _err(client.get("/v1/nothing"), 404, "no such route")
    _err(client.post("/v1/profiles", json={"preference": "x"}), 400, "`user` is required")
    _err(client.post("/v1/profiles", json={"user": "u", "method": "nope"}), 400, "nope", "base")
    _err(client.post("/v1/profiles", json={"user": "u", "method": "base", "params": {"beta": 1}}), 400, "beta")
    _err(client.post("/v1/profiles", json={"user": "u", "colour": "red"}), 400, "colour")


def test_feedback_body_errors(client):
    assert client.post("/v1/profiles", json={"user": "fb-user"}).status_code == 201
    base = {"id": "f1", "user": "fb-user"}
    _err(client.post("/v1/feedback", json={**base, "prompt": "p", "chosen": "a"}), 400, "`rejected`")
    _err(client.post("/v1/feedback", json={**base, "prompt": "p", "chosen": "a", "rejected": "a"}), 400, "same")
    _err(client.post("/v1/feedback", json=base), 400, "`prompt`", "chosen_completion_id")
    _err(client.post("/v1/feedback", json={**base, "chosen_completion_id": "chatcmpl-none"}), 404, "chatcmpl-none")
    # a user with no profile gets one with their first valid item (as `personalign feedback` creates a
    # profile file); an item that is refused creates nothing
    _err(client.post("/v1/feedback", json={"id": "f3", "user": "ghost2", "prompt": "p", "chosen": "a",
                                          "rejected": "a"}), 400, "same")
    assert client.get("/v1/profiles/ghost2").status_code == 404
    r = client.post("/v1/feedback", json={"id": "f2", "user": "ghost", "prompt": "p", "chosen": "a", "rejected": "b"})
    assert r.status_code == 201, r.text
    assert client.get("/v1/profiles/ghost").json()["drift_profile"]["num_pairs"] == 1


def test_the_server_is_healthy_after_the_battery(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code \
        == 200
