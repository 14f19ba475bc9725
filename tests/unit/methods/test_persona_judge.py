"""persona_judge: config validation, crafted-logit exact outcomes, alternation, caches after roll-back.

Crafted backend (``tests/crafted_backend.py``): view k's next-token distribution is a fixed table, so
the outcome of every round is known in advance:

* view 0 puts all its mass on token A, view 1 on token B ≠ A: the judge gives the draft probability
  0, so every round keeps nothing (n = 0) and the resample is the judge's own token
  (``norm(max(0, p - q))`` = one-hot on the judge's token). With alternating roles the output is
  B, A, B, A, ... (round r judged by view (r + 1) mod 2), with fixed roles B, B, B, ...
* identical tables: every draft is kept, each round emits λ + 1 tokens.
"""

from __future__ import annotations

import pytest
import torch

from personalign import HFBackend, Request, SamplingConfig, generate
from personalign.methods import get_method
from personalign.methods.persona_judge import PersonaJudgeConfig, PersonaJudgeMethod
from personalign.types import ViewSpec
from tests.crafted_backend import CraftedBackend
from tests.numerics import assert_close_logprobs

PJ = get_method("persona_judge")
TOK_A, TOK_B, TOK_C = 40, 50, 60


def one_hot_tables(tokens, V):
    t = torch.full((len(tokens), V), -1e4)
    for k, tok in enumerate(tokens):
        t[k, tok] = 0.0
    return t


def req(pref="funny and kind", prompt="tell me a story about a cat", **params):
    return Request(prompt=prompt, preference=pref, params=params)


# ---------------------------------------------------------------- config and bad input
@pytest.mark.parametrize("kw, msg", [
    (dict(draft_tokens=0), "`draft_tokens` must be an integer >= 1"),
    (dict(draft_tokens=-2), "`draft_tokens` must be an integer >= 1"),
    (dict(draft_tokens=True), "`draft_tokens` must be an integer >= 1"),
    (dict(first_drafter=2), r"`first_drafter` must be an integer in \[0, 1\] \(a view index\)"),
    (dict(extra_preferences=("x",), alternate=False), "`extra_preferences` needs `alternate=true`"),
    (dict(extra_preferences=("",)), r"`extra_preferences\[0\]` must be a non-empty text"),
    (dict(residual_eps=-1.0), "`residual_eps` must be a number in"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PersonaJudgeConfig(**kw)


def test_bad_config_from_params_strings():
    with pytest.raises(ValueError, match="`draft_tokens` must be an integer >= 1"):
        PJ.from_params({"draft_tokens": "0"})
    m = PJ.from_params({"second_preference": "be concise", "draft_tokens": "3", "alternate": "false"})
    assert m.config.draft_tokens == 3 and m.config.alternate is False


def test_missing_preferences_are_clear_errors(tiny_chat_tokenizer):
    be = CraftedBackend(one_hot_tables([TOK_A, TOK_B], len(tiny_chat_tokenizer)), tiny_chat_tokenizer)
    with pytest.raises(ValueError, match="`second_preference` must be a non-empty text"):
        generate(PJ(), [req()], be, max_new_tokens=2)
    with pytest.raises(ValueError, match="`preference` must be a non-empty text"):
        generate(PJ(second_preference="x"), [Request(prompt="hi")], be, max_new_tokens=2)
    with pytest.raises(ValueError, match="same number of preferences|same number of views"):
        generate(PJ(second_preference="x"), [req(), req(extra_preferences=["y"])], be, max_new_tokens=2)


# ---------------------------------------------------------------- crafted exact outcomes
SCHEDULES = ["lockstep", "block"]


def run_crafted(tokenizer, tokens, n_tokens=8, sampling=None, **cfg):
    V = len(tokenizer)
    be = CraftedBackend(one_hot_tables(tokens, V), tokenizer)
    out = generate(PJ(second_preference="be concise", **cfg), [req()], be, max_new_tokens=n_tokens,
                   sampling=sampling, ignore_eos=True, generator=torch.Generator().manual_seed(0))[0]
    return out, be


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampling", [None, SamplingConfig(temperature=1.0)])
def test_alternation_is_real_and_disagreement_keeps_nothing(tiny_chat_tokenizer, sampling, schedule):
    out, be = run_crafted(tiny_chat_tokenizer, [TOK_A, TOK_B], n_tokens=6, sampling=sampling, schedule=schedule)
    st = out.stats
    assert st["drafter_per_round"] == [0, 1, 0, 1, 0, 1]
    assert st["accepted_per_round"] == [0] * 6  # the judge gives the draft probability 0
    assert out.token_ids == [TOK_B, TOK_A] * 3  # each round's token is its judge's
    assert st["acceptance_rate"] == 0.0 and st["tokens_per_judge_forward"] == 1.0
    if schedule == "block":
        # each round: λ drafter forwards (the first also feeds the pending token; in round 0 nothing is
        # pending, so it is skipped) + ONE judge forward of pending + λ drafts
        assert be.forward_count == 6 * (4 + 1) - 1
        judge_feeds = [(k, lens) for k, lens in be.fed_log if lens[0] >= 4]
        assert judge_feeds == [(1, [4])] + [((r + 1) % 2, [5]) for r in range(1, 6)]
    else:
        # every view is fed each emitted token once (the crafted backend counts one forward per view):
        # the first draft is judged as soon as it is drafted and rejected, so nothing is ever rolled back
        assert be.fed_log == [(0, [1]), (1, [1])] * 5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_first_drafter_and_fixed_roles(tiny_chat_tokenizer, schedule):
    out, _ = run_crafted(tiny_chat_tokenizer, [TOK_A, TOK_B], n_tokens=4, first_drafter=1, schedule=schedule)
    assert out.stats["drafter_per_round"] == [1, 0, 1, 0] and out.token_ids == [TOK_A, TOK_B] * 2
    out, _ = run_crafted(tiny_chat_tokenizer, [TOK_A, TOK_B], n_tokens=4, alternate=False, schedule=schedule)
    assert out.stats["drafter_per_round"] == [0, 0, 0, 0] and out.token_ids == [TOK_B] * 4


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_three_preferences_take_turns(tiny_chat_tokenizer, schedule):
    out, _ = run_crafted(tiny_chat_tokenizer, [TOK_A, TOK_B, TOK_C], n_tokens=6, extra_preferences=("be formal",),
                         schedule=schedule)
    assert out.stats["drafter_per_round"] == [0, 1, 2, 0, 1, 2]
    assert out.token_ids == [TOK_B, TOK_C, TOK_A] * 2  # judged by 1, 2, 0, ...


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampling", [None, SamplingConfig(temperature=1.0)])
def test_identical_views_accept_every_draft(tiny_chat_tokenizer, sampling, schedule):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, len(tiny_chat_tokenizer), len(tiny_chat_tokenizer), generator=g).expand(2, -1, -1)
    be = CraftedBackend(table, tiny_chat_tokenizer)
    out = generate(PJ(second_preference="x", draft_tokens=3, schedule=schedule), [req()], be, max_new_tokens=12,
                   ignore_eos=True,
                   sampling=sampling, generator=torch.Generator().manual_seed(1))[0]
    assert out.stats["accepted_per_round"] == [3, 3, 3] and out.stats["acceptance_rate"] == 1.0
    assert out.stats["tokens_per_judge_forward"] == 4.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rows_advance_by_different_amounts(tiny_tokenizer, schedule):
    """One batch, λ = 2. Tables keyed on the last token (no chat template, so prompts end in their
    own word): after "cat" and A both views say A (row 0 keeps every draft: 3 tokens per round);
    after "dog", B or C view 0 says B and view 1 says C (row 1 keeps nothing: 1 token per round,
    alternating C, B, ... as view 1 judges first). Row 0 finishes after 2 rounds, row 1 after 6."""
    V = len(tiny_tokenizer)
    cat, dog = tiny_tokenizer.convert_tokens_to_ids(["cat", "dog"])
    table = torch.full((2, V, V), -1e4)
    table[:, :, TOK_A] = 0.0
    for last in (dog, TOK_B, TOK_C):
        table[:, last] = -1e4
        table[0, last, TOK_B] = 0.0
        table[1, last, TOK_C] = 0.0
    be = CraftedBackend(table, tiny_tokenizer)
    reqs = [req(prompt="tell me about a cat"), req(prompt="tell me about a dog")]
    outs = generate(PJ(second_preference="x", draft_tokens=2, schedule=schedule), reqs, be, max_new_tokens=6,
                    ignore_eos=True, chat_template=False)
    assert outs[0].stats["accepted_per_round"] == [2, 2] and outs[0].token_ids == [TOK_A] * 6
    assert outs[1].stats["accepted_per_round"] == [0] * 6 and outs[1].token_ids == [TOK_C, TOK_B] * 3


# ---------------------------------------------------------------- real model: caches after roll-back
def _two_row_state(be, method, K):
    """A prepared two-request ``DecodeState`` (sampled at T = 1.5) and the requests' view specs."""
    from personalign.decoding.method import DecodeState
    from personalign.decoding.sampling import SamplingParams

    reqs = [req(pref="very funny"), req(pref="sad story", prompt="why is the sky blue ?")]
    cfgs = [method.config_for(r) for r in reqs]
    views = [method.build_views(r, c, be, True) for r, c in zip(reqs, cfgs)]
    st = DecodeState(requests=reqs, configs=cfgs, views=be.prefill(views, method.view_groups(K)),
                     sampling=SamplingParams.from_configs([SamplingConfig(temperature=1.5)] * 2),
                     row_generators=[None, None], generated=[[], []], finished=torch.zeros(2, dtype=torch.bool))
    method.prepare(st, be)
    return st, views


@pytest.mark.parametrize("extra", [(), ("be kind",)])
def test_caches_after_rejection_equal_fresh_prefill(tiny_lm, tiny_chat_tokenizer, extra):
    """Block schedule: drive rounds by hand; after each, every view fed its pending tokens equals a
    fresh prefill. With three views, the view sitting out a round lags by several tokens and catches
    up here."""
    be = HFBackend(tiny_lm, tiny_chat_tokenizer)
    method = PJ(second_preference="be formal and concise please", draft_tokens=3, extra_preferences=extra,
                schedule="block")
    K = 2 + len(extra)
    st, views = _two_row_state(be, method, K)
    g = torch.Generator().manual_seed(0)
    rejected = 0
    for _ in range(4):
        method.step(st, be, g)
        rejected += sum(n < 3 for b in range(2) for n in st.row_stats(b)["accepted_per_round"][-1:])
        for k in range(K):
            acc = st.extra["accepted"]
            fed = st.views.fed[:, k].tolist()
            assert all(f < len(a) for f, a in zip(fed, acc))  # the last token is always pending
            pend = [a[f:] for a, f in zip(acc, fed)]
            W = max(len(p) for p in pend)
            toks = torch.tensor([p + [0] * (W - len(p)) for p in pend])
            be.step(st.views, toks, torch.tensor([len(p) for p in pend]), views=[k])
            fresh = be.prefill([[ViewSpec(prompt_ids=views[b][k].prompt_ids + tuple(acc[b]))] for b in range(2)])
            assert_close_logprobs(st.views.last_logprobs[:, k], fresh.last_logprobs[:, 0], tiny_lm)
    assert rejected >= 2  # rejections happened, so roll-backs were exercised


@pytest.mark.parametrize("extra", [(), ("be kind",)])
def test_lockstep_caches_equal_fresh_prefill(tiny_lm, tiny_chat_tokenizer, extra):
    """Lockstep schedule: after every step each view, fed the step's token, equals a fresh prefill of
    its prompt + the emitted text — nothing is ever drafted into a cache and rolled back."""
    be = HFBackend(tiny_lm, tiny_chat_tokenizer)
    method = PJ(second_preference="be formal and concise please", draft_tokens=3, extra_preferences=extra)
    K = 2 + len(extra)
    st, views = _two_row_state(be, method, K)
    assert len(st.views.groups) == 1  # all views in one cache
    g = torch.Generator().manual_seed(0)
    emitted = [[], []]
    for _ in range(24):
        out = method.step(st, be, g)
        for b in range(2):
            emitted[b] += out.tokens[b, : int(out.n_tokens[b])].tolist()
        st.next_logprobs(be)  # feed the step's token
        assert st.views.fed.tolist() == [[len(e)] * K for e in emitted]
        fresh = be.prefill([[ViewSpec(prompt_ids=views[b][k].prompt_ids + tuple(emitted[b])) for k in range(K)]
                            for b in range(2)])
        assert_close_logprobs(st.views.last_logprobs, fresh.last_logprobs, tiny_lm)
    rejected = sum(n < 3 for b in range(2) for n in st.row_stats(b)["accepted_per_round"])
    assert rejected >= 1  # rounds ended early (a rejection), not only after λ + 1 tokens


def test_schedule_is_validated_and_batch_wide(tiny_chat_tokenizer):
    with pytest.raises(ValueError, match="`schedule` must be one of lockstep, block"):
        PersonaJudgeConfig(schedule="eager")
    be = CraftedBackend(one_hot_tables([TOK_A, TOK_B], len(tiny_chat_tokenizer)), tiny_chat_tokenizer)
    with pytest.raises(ValueError, match="`schedule` sets the cache layout of the whole batch"):
        generate(PJ(second_preference="x"), [req(), req(schedule="block")], be, max_new_tokens=2)


def test_bench_preset_and_registration(tiny_lm, tiny_chat_tokenizer):
    from personalign.eval.bench import bench_method
    from personalign.views.loading import LoadedModel

    main = LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")
    method, _, note = bench_method("persona_judge", main, HFBackend(tiny_lm, tiny_chat_tokenizer))
    assert isinstance(method, PersonaJudgeMethod) and method.config.second_preference and "λ=4" in note
