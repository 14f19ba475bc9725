"""``pdpo`` generation: soft-prompted cached decoding == uncached recomputation; mixed users in one batch
== each alone; unknown users fall back to e_0 (logged); per-request user precedence; checkpoint loading."""

from __future__ import annotations

import logging

import pytest
import torch

from personalign.decoding.loop import generate
from personalign.methods.pdpo import PDPOMethod
from personalign.training.pdpo.data import PreferencePair
from personalign.training.pdpo.train import PDPOTrainConfig, train_pdpo
from personalign.training.user_model import UserIndex, UserModel, encode_user_text
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.loading import LoadedModel
from tests.conftest import make_tiny_lm
from tests.numerics import assert_close_logprobs

PROMPTS = ["tell me a story about a cat", "the dog", "once upon a time there was a little girl", "a happy story"]
USERS = ["alice", "bob", "nobody", "carol"]


@pytest.fixture()
def setup(tiny_tokenizer):
    model = make_tiny_lm(len(tiny_tokenizer))
    users = UserModel.for_model(model, kind="individual", num_users=3, user_tokens=3, seed=3)
    with torch.no_grad():
        users.offsets.copy_(torch.randn(users.offsets.shape, generator=torch.Generator().manual_seed(0)))
    method = PDPOMethod(users=users, index=UserIndex(["alice", "bob", "carol"]))
    return HFBackend(model, tiny_tokenizer), method, model, users


def naive_greedy(model, prefix, prompt_ids, n):
    """Recompute the whole sequence [e_u | prompt | generated] without a cache at every step."""
    emb = model.get_input_embeddings()
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            e = emb(torch.tensor([ids]))
            if prefix is not None:
                e = torch.cat([prefix[None], e], 1)
            logits = model(inputs_embeds=e, use_cache=False).logits[0, -1]
            t = int(torch.argmax(logits[: emb.weight.shape[0]]))
            out.append(t)
            ids.append(t)
    return out


def test_cached_batched_generation_equals_uncached_recomputation(setup, tiny_tokenizer):
    backend, method, model, users = setup
    reqs = [Request(prompt=p, user=u) for p, u in zip(PROMPTS, USERS)]
    outs = generate(method, reqs, backend, max_new_tokens=8, ignore_eos=True, chat_template=False)
    for r, o in zip(reqs, outs):
        row = method.index.row(r.user, strict=False)
        prefix = users.implicit(torch.tensor([row]))[0].detach()
        assert o.token_ids == naive_greedy(model, prefix, tiny_tokenizer(r.prompt)["input_ids"], 8)
    # each user's soft prompt really changes the output (otherwise the check above is weak)
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_step_logprobs_equal_recomputation(setup, tiny_tokenizer):
    """Backend-level: prefill + 3 cached steps with per-row soft prompts == full recompute."""
    backend, method, model, users = setup
    reqs = [Request(prompt=p, user=u) for p, u in zip(PROMPTS, USERS)]
    views = [method.build_views(r, method.config_for(r), backend, False) for r in reqs]
    state = backend.prefill(views)
    fed = [[] for _ in reqs]
    emb = model.get_input_embeddings()
    for step in range(3):
        toks = torch.tensor([[5 + step + b] for b in range(len(reqs))])
        backend.step(state, toks)
        for b in range(len(reqs)):
            fed[b].append(int(toks[b, 0]))
        for b, v in enumerate(views):
            spec = v[0]
            with torch.no_grad():
                e = emb(torch.tensor([list(spec.prompt_ids) + fed[b]]))
                if spec.prefix_embeds is not None:
                    e = torch.cat([spec.prefix_embeds[None], e], 1)
                want = torch.log_softmax(model(inputs_embeds=e).logits[0, -1].float(), -1)
            assert_close_logprobs(state.last_logprobs[b, 0], want, model)


def test_mixed_batch_equals_each_alone(setup):
    backend, method, _, _ = setup
    reqs = [Request(prompt=p, user=u) for p, u in zip(PROMPTS, USERS)]
    together = generate(method, reqs, backend, max_new_tokens=6, ignore_eos=True, chat_template=False)
    for r, o in zip(reqs, together):
        alone = generate(method, [r], backend, max_new_tokens=6, ignore_eos=True, chat_template=False)[0]
        assert alone.token_ids == o.token_ids


def test_unknown_user_falls_back_to_generic_and_is_logged(setup, caplog):
    backend, method, _, users = setup
    with caplog.at_level(logging.WARNING, logger="personalign.training.user_model"):
        outs = generate(method, [Request(prompt="the dog", user="zed"), Request(prompt="the dog")], backend,
                        max_new_tokens=4, ignore_eos=True, chat_template=False)
    assert any("'zed' is unknown" in r.message and "e_0" in r.message for r in caplog.records)
    assert outs[0].stats["user_row"] == 0 and outs[0].stats["user_known"] is False
    assert outs[1].stats["user_row"] == 0 and outs[1].token_ids == outs[0].token_ids  # no user = generic user
    seen = generate(method, [Request(prompt="the dog", user="alice")], backend, max_new_tokens=4,
                    ignore_eos=True, chat_template=False)[0]
    assert seen.stats["user_row"] == 1 and seen.stats["user_known"] is True


def test_user_precedence_and_text(setup, tiny_tokenizer):
    backend, method, _, users = setup
    cfg_default = PDPOMethod(method.config.__class__(user="bob"), users=users, index=method.index)
    r = Request(prompt="the dog", user="alice", params={"user": "carol"})
    assert cfg_default.resolve_user(r, cfg_default.config_for(r)) == ("carol", 3)
    r = Request(prompt="the dog", user="alice")
    assert cfg_default.resolve_user(r, cfg_default.config_for(r)) == ("alice", 1)
    r = Request(prompt="the dog")
    assert cfg_default.resolve_user(r, cfg_default.config_for(r)) == ("bob", 2)
    # explicit text: e_u = concat(implicit, text embeddings)
    r = Request(prompt="the dog", user="alice", params={"user_text": "she likes funny stories"})
    spec = method.build_views(r, method.config_for(r), backend, False)[0]
    text = encode_user_text(tiny_tokenizer, "she likes funny stories")
    assert spec.prefix_embeds.shape[0] == 3 + len(text)
    assert torch.equal(spec.prefix_embeds[3:], backend.models["main"].get_input_embeddings().weight[list(text)])
    # soft prompts are computed once per (row, text)
    n = len(method._cache)
    method.build_views(r, method.config_for(r), backend, False)
    assert len(method._cache) == n


def test_from_checkpoint_and_mismatch(tiny_tokenizer, tmp_path):
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    pairs = [PreferencePair(prompt="a story", chosen="the cat is happy", rejected="the cat", user_id=str(i % 2))
             for i in range(4)]
    res = train_pdpo(base, pairs, PDPOTrainConfig(user_tokens=2, batch_size=4, epochs=1, learning_rate=1e-2),
                     out=tmp_path / "ck", progress=False)
    from personalign.assembly import Resources, build_backend, build_method

    res_ = Resources(model=LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny"),
                     pdpo_checkpoint=str(tmp_path / "ck"))
    backend = build_backend(res_, ["pdpo"])
    method = build_method("pdpo", {}, backend, res_)
    out = generate(method, [Request(prompt="a story", user="1")], backend, max_new_tokens=5, ignore_eos=True,
                   chat_template=False)[0]
    # the merged model decodes like the trained adapter model under the user's soft prompt
    res.model.eval()
    prefix = res.model.users.implicit(torch.tensor([2]))[0].detach()
    assert out.token_ids == naive_greedy(res.model.lm, prefix, tiny_tokenizer("a story")["input_ids"], 5)
    other = Resources(model=LoadedModel(model=make_tiny_lm(len(tiny_tokenizer), hidden=16), tokenizer=tiny_tokenizer,
                                        name="other"), pdpo_checkpoint=str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="was trained on base model 'tiny'"):
        build_method("pdpo", {}, build_backend(other, ["pdpo"]), other)


def test_config_errors():
    with pytest.raises(ValueError, match="`user` must be a non-empty user id"):
        PDPOMethod.from_params({"user": " "})
    assert PDPOMethod.from_params({"user": 7}).config.user == "7"


def test_real_model_cached_equals_recomputation(stories):
    """The same property on the real stories260k Llama, users mixed in one batch (one unknown)."""
    model, tok = stories.model, stories.tokenizer
    users = UserModel.for_model(model, kind="cluster", num_users=3, user_tokens=4, clusters=2, seed=5)
    method = PDPOMethod(users=users, index=UserIndex(["a", "b", "c"]))
    backend = HFBackend(model, tok)
    prompts = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy"]
    reqs = [Request(prompt=p, user=u) for p, u in zip(prompts, ["a", "b", "zzz", "c"])]
    outs = generate(method, reqs, backend, max_new_tokens=10, ignore_eos=True, chat_template=False)
    for r, o in zip(reqs, outs):
        row = method.index.row(r.user, strict=False)
        prefix = users.implicit(torch.tensor([row]))[0].detach()
        assert o.token_ids == naive_greedy(model, prefix, tok(r.prompt)["input_ids"], 10)
