"""The official ``openai`` client against a live server: completions and streams for every method.

Every registered method is served: the test session builds what the methods need from the tiny
model with the library's own APIs (an untrained PersRM for ``pad``, a randomly initialised
sequence-classification reward model for ``args`` and ``best_of_n``, an untrained P-DPO checkpoint
for ``pdpo``, a Drift profile learned from feedback over HTTP) and starts the server the way
``personalign serve`` does, from its command-line flags. Each served method's reply must equal what
the library's own loop produces for the same messages and preference (greedy; seeded where the
method samples), and a stream's deltas must add up to the non-streamed reply.
"""

from __future__ import annotations

import copy
import time

import httpx
import pytest
import torch
from tests.conftest import make_tiny_lm
from tests.integration.server.conftest import ADMIN, MODEL_ID, Live, start_server

from personalign.assembly import Resources, build_backend, build_methods
from personalign.cli.main import build_parser
from personalign.cli.serve import build_served
from personalign.decoding.loop import generate
from personalign.decoding.sampling import SamplingConfig
from personalign.methods import get_method, method_names
from personalign.server import EngineWorker, Limits, Store, create_app
from personalign.types import Request
from personalign.views import HFBackend

PREFERENCE = "concise and kind"
MESSAGES = [{"role": "user", "content": "tell me a story about the cat"}]
SEED = 11  # best_of_n samples its candidates: a seeded request is reproducible
PDPO_USERS = ["alice", "bob"]


# ------------------------------------------------------------------ what the methods need
def _model_dir(root, tiny_lm, tok):
    d = root / "model"
    tiny_lm.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _randomize_lora_(model, seed: int) -> None:
    """Give every LoRA B a random value: an untrained adapter is a no-op (B = 0), and then an adapter
    that leaked into the base model the other methods decode would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _persrm_dir(root, model_dir, tok):
    """An untrained PersRM (fresh LoRA, zero value head) on the tiny backbone, saved as `train pad` does."""
    from personalign.training.persrm.model import PersRM

    rm = PersRM.create(make_tiny_lm(len(tok)), tok, name=str(model_dir), lora_r=4)
    _randomize_lora_(rm.lm, 1)
    d = root / "persrm"
    rm.save(str(d))
    return d


def _reward_model_dir(root, tok):
    """A local Hugging Face sequence-classification reward model: tiny config, random head."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    d = root / "reward_model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _pdpo_dir(root, model_dir, tok):
    """An untrained P-DPO checkpoint: a LoRA adapter and a cluster user model over two seen users."""
    from peft import LoraConfig, get_peft_model

    from personalign.training.pdpo.checkpoint import save_checkpoint
    from personalign.training.pdpo.model import base_identity
    from personalign.training.user_model import UserIndex, UserModel

    base = make_tiny_lm(len(tok))
    identity = base_identity(base, str(model_dir))
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    _randomize_lora_(lm, 2)
    # cluster weights are drawn per user, so each seen user and the generic user e_0 differ untrained
    users = UserModel.for_model(base, kind="cluster", num_users=len(PDPO_USERS), clusters=2, user_tokens=2,
                                init_std=1.0)
    d = root / "pdpo"
    save_checkpoint(d, lm=lm, users=users, index=UserIndex(PDPO_USERS), objective="pdpo", train_config={},
                    base=identity)
    return d


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm, tiny_chat_tokenizer):
    """A live server for every registered method, configured by `personalign serve`'s own flags."""
    root = tmp_path_factory.mktemp("every_method")
    tok = tiny_chat_tokenizer
    model_dir = _model_dir(root, tiny_lm, tok)
    files = {"persrm": _persrm_dir(root, model_dir, tok), "reward_model": _reward_model_dir(root, tok),
             "checkpoint": _pdpo_dir(root, model_dir, tok), "model": model_dir}
    argv = ["serve", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu",
            "--persrm", str(files["persrm"]), "--reward-model", str(files["reward_model"]),
            "--checkpoint", str(files["checkpoint"])]
    args = build_parser().parse_args(argv)
    backend, methods, unavailable = build_served(args)
    engine = EngineWorker(backend, methods, max_pending=64, max_batch=16)
    store = Store(f"sqlite:///{root / 'server.db'}")
    app = create_app(engine, store, limits=Limits(max_tokens=64, default_max_tokens=16), model_id=MODEL_ID,
                     admin_key=ADMIN, unavailable=unavailable)
    url, server, thread = start_server(app)
    live = Live(url, store, engine, unavailable, backend)
    live.files = files
    yield live
    server.should_exit = True
    thread.join(timeout=30)
    store.close()


def _client(live):
    openai = pytest.importorskip("openai", reason="the `openai` client is an optional test dependency")
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.new_key("openai-client"), max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def oai(live):
    return _client(live)


@pytest.fixture(scope="module")
def oai_all(served):
    return _client(served)


def _expected(live, method: str, max_tokens: int, messages=MESSAGES, preference=PREFERENCE, params=None,
              seed=None, user=None) -> str:
    m = live.engine.methods[method]
    out = generate(m, [Request(prompt=messages, preference=preference, params=params or {}, seed=seed, user=user)],
                   live.backend, max_new_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0))
    return out[0].text


def _drift_user(live, key: str) -> tuple[dict, dict]:
    """A user whose Drift profile was learned from one feedback pair over HTTP."""
    with live.client(key) as c:
        c.post("/v1/profiles", json={"user": "drifter", "method": "drift"})
        r = c.post("/v1/feedback", json={"id": "drifter-1", "user": "drifter", "prompt": "tell me a story",
                                         "chosen": "the cat was happy", "rejected": "the dog was sad"})
        assert r.status_code in (200, 201), r.text
        profile = c.get("/v1/profiles/drifter").json()["drift_profile"]
    return {"user": "drifter"}, {"profile": profile}


def _judge_params(live, key: str) -> tuple[dict, dict]:
    """Persona-judge needs a second preference: it goes in `personalization` as a method parameter."""
    return {}, {"second_preference": "formal and long"}


def _pdpo_seen_user(live, key: str) -> tuple[dict, dict]:
    """A user the P-DPO checkpoint was trained with: the OpenAI `user` field names them."""
    return {"user": PDPO_USERS[0]}, {}


# methods that need more than a preference: how a test request gets it (request kwargs, method params)
USER_SETUP = {"drift": _drift_user, "persona_judge": _judge_params, "pdpo": _pdpo_seen_user}
# params that come from the user's stored state, not from the request's `personalization`
FROM_PROFILE = {"drift"}


def _complete_and_stream(oai, extra: dict, max_tokens: int = 8, **kw):
    """(reply, stream chunks) of one request, asked once without and once with ``stream``."""
    r = oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=max_tokens, temperature=0,
                                    seed=SEED, extra_body=extra, **kw)
    chunks = list(oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=max_tokens,
                                              temperature=0, seed=SEED, stream=True, extra_body=extra, **kw))
    return r, chunks


def test_every_registered_method_is_served(served):
    assert served.unavailable == {}
    assert sorted(served.engine.methods) == sorted(method_names())
    h = httpx.get(f"{served.url}/health").json()
    assert h["methods"] == sorted(method_names()) and h["unavailable_methods"] == {}


def test_models_and_health(live, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    h = httpx.get(f"{live.url}/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and "base" in h["methods"]


def test_adapters_leave_the_base_model_alone(served, oai_all, tiny_lm, tiny_chat_tokenizer):
    """With PAD's PersRM and the P-DPO adapter loaded (both non-zero), `base` and
    `preference_prompting` still decode the untouched base model, before any PAD request too."""
    pristine = HFBackend(copy.deepcopy(tiny_lm), tiny_chat_tokenizer)
    for method, pref in (("base", None), ("preference_prompting", PREFERENCE)):
        extra = {"personalization": {"method": method, **({"preference": pref} if pref else {})}}
        r, _ = _complete_and_stream(oai_all, extra)
        want = generate(get_method(method)(), [Request(prompt=MESSAGES, preference=pref)], pristine,
                        max_new_tokens=8, sampling=SamplingConfig(temperature=0.0))[0].text
        assert r.choices[0].message.content == want


@pytest.mark.parametrize("method", method_names())
def test_every_method_completes_and_streams(served, oai_all, method):
    assert method in served.engine.methods, f"{method} is not served: {served.unavailable.get(method)}"
    kw, params = USER_SETUP[method](served, oai_all.api_key) if method in USER_SETUP else ({}, {})
    extra = {"personalization": {"method": method, "preference": PREFERENCE,
                                 **({} if method in FROM_PROFILE else params)}}
    r, chunks = _complete_and_stream(oai_all, extra, **kw)
    text = r.choices[0].message.content
    assert text.strip(), f"{method} answered an empty completion"
    assert text == _expected(served, method, 8, params=params, seed=SEED, user=kw.get("user"))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.id.startswith("chatcmpl-")
    assert r.model_extra["personalization"]["method"] == method
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_pdpo_seen_unseen_and_profile_users(served, oai_all):
    """A seen user decodes with their own embedding, an unseen one with the generic e_0, and a profile's
    `pdpo_user_id` names the checkpoint's user for a profile of another name."""
    extra = {"personalization": {"method": "pdpo"}}
    pdpo = served.engine.methods["pdpo"]
    replies = {}
    for user in [*PDPO_USERS, "zed"]:
        r, chunks = _complete_and_stream(oai_all, extra, user=user)
        text = r.choices[0].message.content
        assert text.strip() and "".join(c.choices[0].delta.content or "" for c in chunks) == text
        assert text == _expected(served, "pdpo", 8, preference=None, user=user)
        replies[user] = text
    assert pdpo.index.row("zed", strict=False) == 0 and pdpo.index.row(PDPO_USERS[1], strict=False) == 2
    # the user embedding matters for this checkpoint: each of the three users gets another reply
    assert len(set(replies.values())) == 3, replies
    with served.client(oai_all.api_key) as c:
        r = c.post("/v1/profiles", json={"user": "carol", "method": "pdpo", "pdpo_user_id": PDPO_USERS[1]})
        assert r.status_code == 201, r.text
    r, chunks = _complete_and_stream(oai_all, {}, user="carol")
    assert r.model_extra["personalization"]["method"] == "pdpo"
    assert r.choices[0].message.content == replies[PDPO_USERS[1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == replies[PDPO_USERS[1]]


def test_persrm_methods_take_each_requests_preference(served, oai_all):
    """`pad` (and `args`/`best_of_n` rewarded by the PersRM alone) score with the request's own
    preference: a request without one is a 400 naming it; the PersRM is loaded once per backend."""
    with served.client(oai_all.api_key) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4,
                                                 "personalization": {"method": "pad"}})
    assert r.status_code == 400 and "preference" in r.json()["error"]["message"], r.text
    res = Resources(model=str(served.files["model"]), dtype="float32", device="cpu", persrm=str(served.files["persrm"]),
                    shared=True)
    backend = build_backend(res, ["pad", "args", "best_of_n"])
    methods, unavailable = build_methods(["pad", "args", "best_of_n"], backend, res)
    assert {"pad", "args", "best_of_n"} <= set(methods), unavailable
    rm = methods["pad"].persrm  # loaded once for the backend: the reward of args and best_of_n too
    for name in ("args", "best_of_n"):
        scorer = methods[name].scorer
        assert scorer.persrm is rm and scorer.preference is None
        with pytest.raises(ValueError, match="`preference` must be a non-empty text"):
            generate(methods[name], [Request(prompt=MESSAGES)], backend, max_new_tokens=2)
        two = generate(methods[name], [Request(prompt=MESSAGES, preference=p, seed=SEED) for p in ("kind", "funny")],
                       backend, max_new_tokens=3, sampling=SamplingConfig(temperature=0.0))
        alone = [generate(methods[name], [Request(prompt=MESSAGES, preference=p, seed=SEED)], backend,
                          max_new_tokens=3, sampling=SamplingConfig(temperature=0.0))[0] for p in ("kind", "funny")]
        assert [o.text for o in two] == [o.text for o in alone]


def test_base_is_the_default_and_preference_prompting_follows_a_preference(live, oai):
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == _expected(live, "base", 6)
    assert r.model_extra["personalization"]["method"] == "base"
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                    extra_body={"personalization": {"preference": PREFERENCE}})
    assert r.model_extra["personalization"]["method"] == "preference_prompting"
    assert r.choices[0].message.content == _expected(live, "preference_prompting", 6)


def test_stored_profile_is_the_default(live, oai):
    key = oai.api_key
    with live.client(key) as c:
        r = c.post("/v1/profiles", json={"user": "ann", "preference": "funny and very happy",
                                         "method": "preference_prompting"})
        assert r.status_code == 201, r.text
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, user="ann")
    info = r.model_extra["personalization"]
    assert info["method"] == "preference_prompting" and info["profile_id"] == "ann"
    assert r.choices[0].message.content == _expected(live, "preference_prompting", 6,
                                                     preference="funny and very happy")
    # the request's own personalization wins over the profile, field by field
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, user="ann",
                                    extra_body={"personalization": {"method": "base"}})
    assert r.model_extra["personalization"]["method"] == "base"
    assert r.choices[0].message.content == _expected(live, "base", 6)


def test_seeded_sampling_is_reproducible(oai):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7)
    a = oai.chat.completions.create(**kw).choices[0].message.content
    b = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_string_cuts_the_reply(live, oai):
    """With a stop string taken from the greedy reply, the reply is that reply's text before it."""
    full = _expected(live, "base", 16, preference=None)
    words = full.split()
    if len(words) < 3:
        pytest.skip(f"the tiny model's reply is too short to pick a stop word: {full!r}")
    stop = " " + words[2]
    want = full[: full.find(stop)]
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_completions_are_recorded(live, oai):
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, user="rec")
    owner = live.store.owner_of(oai.api_key)
    c = live.store.get_completion(owner, r.id)
    assert c is not None and c["text"] == r.choices[0].message.content and c["user"] == "rec"


def test_client_disconnect_cancels_the_row(live, oai):
    """A stream closed after its first chunk ends the row at the next step (no decoding to the budget)."""
    backend = live.backend
    real_step = backend.step

    def slow_step(*a, **kw):
        time.sleep(0.03)
        return real_step(*a, **kw)

    before = live.engine.stats.cancelled
    backend.step = slow_step
    try:
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {oai.api_key}"}, timeout=30) as c, \
                c.stream("POST", "/v1/chat/completions", json={
                    "model": "tiny", "messages": MESSAGES, "max_tokens": 64, "stream": True, "temperature": 0,
                    "personalization": {"method": "base"}}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.time() + 10
        while live.engine.stats.cancelled == before and time.time() < deadline:
            time.sleep(0.05)
    finally:
        del backend.step
    assert live.engine.stats.cancelled == before + 1
    assert live.engine.load()["running"] == 0


def test_raw_sse_format(live, oai):
    """Every event is a ``data:`` line of a chunk; usage comes last when asked for; then ``[DONE]``."""
    import json

    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {oai.api_key}"}, timeout=30) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
    assert text == _expected(live, "base", 5, preference=None)
