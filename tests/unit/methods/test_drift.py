"""Drift decoding (seed 002, Eq. 9): the formula, per-row weights, config validation, model checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from personalign.decoding.loop import generate
from personalign.methods import get_method
from personalign.methods.drift import DriftConfig, DriftMethod, drift_scores
from personalign.personas.attributes import Attribute, AttributePool
from personalign.personas.drift import DriftProfile, steer_identity
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request
from personalign.views import HFBackend
from tests.numerics import forward_atol

POOL = AttributePool("you are a friend", (
    Attribute("formal", "you are a formal friend"),
    Attribute("concise", "you are a concise friend"),
    Attribute("funny", "you are a funny friend"),
    Attribute("sad", "you are a sad friend"),
))


@pytest.fixture(scope="module")
def steer_lm(tiny_chat_tokenizer):
    from tests.conftest import make_tiny_lm

    return make_tiny_lm(len(tiny_chat_tokenizer), hidden=16)


def _profile(model, tok, weights, top_m):
    return DriftProfile.from_weights(POOL, weights, steer_identity(model, tok, "tiny"), top_m=top_m)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 3), st.floats(0.05, 5.0), st.integers(0, 2**31 - 1))
def test_one_hot_weights_reduce_to_one_attribute_difference(S, j, beta, seed):
    """With p = e_j: scores = h_LLM + (h_j − h_base)/β exactly (other attributes drop out)."""
    j = j % S
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(3, 2 + S, 11, generator=g), -1)
    w = torch.zeros(3, S)
    w[:, j] = 1.0
    out = drift_scores(lp, w, torch.full((3,), beta))
    ref = lp[:, 0] + (lp[:, 2 + j] - lp[:, 1]) / beta
    # exact: the einsum adds S − 1 products 0·x = +0 to the one term 1·(h_j − h_base), in any order,
    # then divides by β as the reference does
    assert torch.equal(out, ref)
    # zero weights: the plain LLM
    assert torch.equal(drift_scores(lp, torch.zeros(3, S), torch.full((3,), beta)), lp[:, 0])


def test_masked_tokens_stay_masked():
    lp = torch.log_softmax(torch.randn(1, 3, 5), -1)
    lp[0, :, 2] = float("-inf")
    out = drift_scores(lp, torch.ones(1, 1), torch.ones(1))
    assert out[0, 2] == float("-inf") and torch.isfinite(out[0, [0, 1, 3, 4]]).all()


class _Recording(DriftMethod):
    def combine(self, logprobs, state):
        scores = super().combine(logprobs, state)
        state.extra.setdefault("trace", []).append(scores.clone())
        return scores


def _naive_step(models, specs, tokens, weights, beta):
    """Formula from separate, uncached forwards of each view's prompt + generated tokens."""
    lps = []
    for model, ids in zip(models, specs):
        with torch.no_grad():
            logits = model(torch.tensor([list(ids) + tokens])).logits[0, -1]
        lps.append(torch.log_softmax(logits.double(), -1))
    h = torch.stack(lps)
    scores = h[0] + sum(w * (h[2 + i] - h[1]) for i, w in enumerate(weights)) / beta
    return torch.log_softmax(scores, -1)


@pytest.mark.parametrize("same_model", [False, True])
def test_decoding_equals_formula_from_separate_uncached_forwards(tiny_lm, steer_lm, tiny_chat_tokenizer, same_model):
    """Two rows with different profiles (one padded slot) share a batch; every step's scores equal
    log_softmax(h_LLM + (1/β) Σ p_i (h_i − h_base)) computed view by view without cache or batching."""
    tok = tiny_chat_tokenizer
    steer = tiny_lm if same_model else steer_lm
    key = "main" if same_model else "steer"
    models = {"main": tiny_lm} if same_model else {"main": tiny_lm, "steer": steer_lm}
    backend = HFBackend(models, tok)
    p0 = _profile(steer, tok, {"formal": 0.8, "funny": -0.6}, 2)
    p1 = _profile(steer, tok, {"sad": 1.0}, 1)
    method = _Recording(DriftConfig(top_m=2, top_p=1.0, beta=0.5, steer_model=key))
    reqs = [Request(prompt="tell me a story", params={"profile": p0}),
            Request(prompt="why is the sky blue ?", params={"profile": p1, "beta": 2.0})]
    captured = {}
    orig = method.prepare

    def prepare(state, be):
        orig(state, be)
        captured["state"] = state
    method.prepare = prepare
    outs = generate(method, reqs, backend, max_new_tokens=4, ignore_eos=True)
    trace = captured["state"].extra["trace"]
    assert len(trace) == 4
    for b, (req, prof, beta) in enumerate(zip(reqs, [p0, p1], [0.5, 2.0])):
        sel = prof.selected()
        specs = [build_prompt_ids(tok, req.prompt), build_prompt_ids(tok, req.prompt, system=POOL.base)]
        specs += [build_prompt_ids(tok, req.prompt, system=s) for _, s, _ in sel]
        view_models = [tiny_lm] + [steer] * (len(specs) - 1)
        for t in range(4):
            ref = _naive_step(view_models, specs, outs[b].token_ids[:t], [w for _, _, w in sel], beta)
            # every view's log-probs to the float32 bound, amplified by the formula's (1/β) Σ|p_i| · 2
            amp = 1 + 2 * sum(abs(w) for _, _, w in sel) / beta
            atol = amp * max(forward_atol(m, ref.float()) for m in view_models)
            assert float((trace[t][b].double() - ref).abs().max()) <= atol, (b, t)
        assert outs[b].token_ids[0] == int(trace[0][b].argmax())  # greedy follows the Drift scores
    assert outs[0].stats["drift_attributes"] == {n: w for n, _, w in p0.selected()}


def test_steering_views_advance_in_one_forward(tiny_lm, steer_lm, tiny_chat_tokenizer):
    backend = HFBackend({"main": tiny_lm, "steer": steer_lm}, tiny_chat_tokenizer)
    prof = _profile(steer_lm, tiny_chat_tokenizer, {"formal": 0.6, "funny": 0.8}, 2)
    out = generate(DriftMethod(profile=prof), [Request(prompt="tell me a story")] * 3, backend,
                   max_new_tokens=5, ignore_eos=True)
    # after prefill: 4 steps x 2 groups (LLM, all steering views); the last token is not fed
    assert out[0].stats["batch_forwards"] == 4 * 2


def test_nucleus_of_the_drift_distribution(tiny_lm, tiny_chat_tokenizer):
    from personalign.decoding.filters import top_p_keep

    backend = HFBackend(tiny_lm, tiny_chat_tokenizer)
    prof = _profile(tiny_lm, tiny_chat_tokenizer, {"formal": 1.0}, 1)
    full = _Recording(DriftConfig(profile=prof, top_p=1.0, steer_model="main"))
    nuc = _Recording(DriftConfig(profile=prof, top_p=0.3, steer_model="main"))
    traces = []
    from personalign.decoding.sampling import SamplingConfig

    for m in (full, nuc):
        st_ = {}
        orig = m.prepare
        m.prepare = lambda s, be, orig=orig, st_=st_: (orig(s, be), st_.setdefault("s", s))
        # sampled: the distribution drawn from is the nucleus (a greedy row skips it, its token unchanged:
        # test_greedy_rows_skip_the_nucleus_without_changing_a_token)
        generate(m, [Request(prompt="tell me a story")], backend, max_new_tokens=1,
                 sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(0))
        traces.append(st_["s"].extra["trace"][0][0])
    keep = top_p_keep(traces[0][None], 0.3)[0]
    assert torch.equal(torch.isfinite(traces[1]), keep) and 0 < int(keep.sum()) < len(keep)
    assert torch.allclose(traces[1][keep], traces[0][keep])


def test_config_validation(tiny_lm, tiny_chat_tokenizer):
    prof = _profile(tiny_lm, tiny_chat_tokenizer, {"formal": 1.0}, 1)
    for bad, match in [({"beta": 0.0}, "`beta` must be a finite number > 0"), ({"beta": -1}, "`beta` must be a finite number > 0"),
                       ({"top_p": 0.0}, "`top_p`"), ({"top_m": 0}, "`top_m`"),
                       ({"top_m": 5, "profile": prof}, "attribute pool size 4"),
                       ({"profile": 3}, "`profile` must be"), ({"profile": "/nope.json"}, "does not exist")]:
        with pytest.raises(ValueError, match=match):
            DriftConfig(**bad)
    with pytest.raises(ValueError, match="beta"):
        get_method("drift").from_params({"beta": "-0.5"})


def test_generation_errors(tiny_lm, steer_lm, tiny_chat_tokenizer, stories):
    tok = tiny_chat_tokenizer
    backend = HFBackend(tiny_lm, tok)
    req = [Request(prompt="tell me a story")]
    with pytest.raises(ValueError, match="needs a `profile`"):
        generate(DriftMethod(steer_model="main"), req, backend, max_new_tokens=1)
    prof = _profile(tiny_lm, tok, {"formal": 1.0}, 1)
    with pytest.raises(ValueError, match="`steer_model` 'steer' is not a model"):
        generate(DriftMethod(profile=prof), req, backend, max_new_tokens=1)
    other = _profile(steer_lm, tok, {"formal": 1.0}, 1)  # fitted with another steering model
    with pytest.raises(ValueError, match="fitted with steering model"):
        generate(DriftMethod(profile=other, steer_model="main"), req, backend, max_new_tokens=1)
    with pytest.raises(ValueError, match="must be <= the method's 1"):
        generate(DriftMethod(profile=prof, steer_model="main"),
                 [Request(prompt="tell me a story", params={"top_m": 3})], backend, max_new_tokens=1)


@pytest.mark.parametrize("sampling_kw", [{"temperature": 1.0, "top_k": 3}, {"temperature": 0.7, "top_p": 0.5}])
def test_sampled_tokens_come_from_the_drift_distribution(tiny_lm, tiny_chat_tokenizer, generator, sampling_kw):
    """Under top-k / top-p sampling every emitted token lies in that filter of the Drift scores."""
    from personalign.decoding.filters import top_k_keep, top_p_keep
    from personalign.decoding.sampling import SamplingConfig

    backend = HFBackend(tiny_lm, tiny_chat_tokenizer)
    prof = _profile(tiny_lm, tiny_chat_tokenizer, {"formal": 0.6, "sad": -0.8}, 2)
    method = _Recording(DriftConfig(profile=prof, steer_model="main", top_p=1.0))
    st_ = {}
    orig = method.prepare
    method.prepare = lambda s, be: (orig(s, be), st_.setdefault("s", s))
    out = generate(method, [Request(prompt="tell me a story")] * 4, backend, max_new_tokens=6, ignore_eos=True,
                   sampling=SamplingConfig(**sampling_kw), generator=generator)
    trace = st_["s"].extra["trace"]
    for b in range(4):
        for t, tok_id in enumerate(out[b].token_ids):
            scores = trace[t][b][None]
            if "top_k" in sampling_kw:
                allowed = top_k_keep(scores, sampling_kw["top_k"])[0]
            else:
                allowed = top_p_keep(torch.log_softmax(scores / sampling_kw["temperature"], -1), 0.5)[0]
            assert bool(allowed[tok_id]), (b, t)


def test_greedy_rows_skip_the_nucleus_without_changing_a_token(tiny_lm, tiny_chat_tokenizer):
    """The nucleus is taken over Drift's own distribution, so its best token is always kept: greedy
    decoding with the nucleus skipped (top_p 0.5, no sampled row) emits exactly the tokens of the same
    decoding with the nucleus applied at every step, and the skip happens (no sort runs)."""
    from unittest import mock

    from personalign.decoding.sampling import SamplingConfig
    from personalign.methods import drift as drift_module

    tok = tiny_chat_tokenizer
    backend = HFBackend({"main": tiny_lm}, tok)
    prof = _profile(tiny_lm, tok, {"formal": 0.8, "funny": -0.6, "sad": 0.3}, 3)
    reqs = [Request(prompt="tell me a story", params={"profile": prof}),
            Request(prompt="why is the sky blue ?", params={"profile": prof, "top_p": 0.3})]
    greedy = SamplingConfig(temperature=0.0)

    class _AlwaysNucleus(DriftMethod):  # the reference: the mask applied at every step, as before
        def prepare(self, state, be):
            super().prepare(state, be)
            state.extra["nucleus"] = True

    cfg = DriftConfig(top_m=3, top_p=0.5, beta=0.5, steer_model="main")
    want = generate(_AlwaysNucleus(cfg), reqs, backend, max_new_tokens=12, sampling=greedy)
    with mock.patch.object(drift_module, "top_p_keep", side_effect=AssertionError("sorted")):
        got = generate(DriftMethod(cfg), reqs, backend, max_new_tokens=12, sampling=greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    sampled = SamplingConfig(temperature=1.0, top_p=1.0)
    with mock.patch.object(drift_module, "top_p_keep", wraps=drift_module.top_p_keep) as spy:
        generate(DriftMethod(cfg), reqs, backend, max_new_tokens=2, sampling=sampled,
                 generator=torch.Generator().manual_seed(0))
    assert spy.called  # a sampled row still gets its nucleus
