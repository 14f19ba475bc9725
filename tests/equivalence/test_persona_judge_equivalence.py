"""persona_judge equivalences on real weights.

* Identical draft and judge prompts, greedy: every round emits the judge's argmax chain, which is
  greedy decoding of that one prompt — equal to ``base`` on the same prompt token for token.
* Fixed roles (Persona-judge-Base), greedy, different preferences: speculative greedy is lossless, so
  the output equals greedy ``preference_prompting`` with the judge's preference.
* Batched ≡ separate: rows that advance by different amounts per round give what they give alone
  (greedy, and sampling with per-request seeds).
"""

from __future__ import annotations

import pytest

from personalign import HFBackend, Request, SamplingConfig, generate
from personalign.methods import get_method

PJ, BASE, PP = get_method("persona_judge"), get_method("base"), get_method("preference_prompting")
STORY_PREF = "Tom was a happy boy who loved his dog."
STORY_PROMPTS = ["Once upon a time", "Lily went to the park"]


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_identical_views_greedy_equals_base(stories, draft_tokens):
    be = HFBackend(stories.model, stories.tokenizer)
    for prompt in STORY_PROMPTS:
        pj = generate(PJ(second_preference=STORY_PREF, draft_tokens=draft_tokens),
                      [Request(prompt=prompt, preference=STORY_PREF)], be, max_new_tokens=40, ignore_eos=True)[0]
        # without a chat template the preference is the plain-text prefix "{pref}\n\n{prompt}"
        ref = generate(BASE(), [Request(prompt=f"{STORY_PREF}\n\n{prompt}")], be, max_new_tokens=40,
                       ignore_eos=True)[0]
        assert pj.token_ids == ref.token_ids
        assert pj.stats["acceptance_rate"] == 1.0


def test_fixed_roles_greedy_equals_judge_prompt_alone(stories):
    be = HFBackend(stories.model, stories.tokenizer)
    draft, judge = "Sue was very sad and cried.", STORY_PREF
    reqs = [Request(prompt=p, preference=draft) for p in STORY_PROMPTS]
    pj = generate(PJ(second_preference=judge, alternate=False), reqs, be, max_new_tokens=40, ignore_eos=True)
    ref = generate(PP(), [Request(prompt=p, preference=judge) for p in STORY_PROMPTS], be, max_new_tokens=40,
                   ignore_eos=True)
    assert [o.token_ids for o in pj] == [o.token_ids for o in ref]
    rates = [o.stats["acceptance_rate"] for o in pj]
    assert min(rates) < 1.0 and max(rates) > 0.0, rates  # drafts were both kept and rejected


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0, top_k=50)])
def test_batched_equals_separate(tiny_lm, tiny_chat_tokenizer, sampling):
    be = HFBackend(tiny_lm, tiny_chat_tokenizer)
    method = PJ(second_preference="be formal and concise please", draft_tokens=3)
    reqs = [Request(prompt="tell me a story about a cat", preference="very funny", seed=1),
            Request(prompt="why is the sky blue ?", preference="sad", seed=2, params={"draft_tokens": 2}),
            Request(prompt="what is a big red car ?", preference="kind friend", seed=3, params={"first_drafter": 1})]
    batched = generate(method, reqs, be, max_new_tokens=16, sampling=sampling, ignore_eos=True)
    for r, out in zip(reqs, batched):
        alone = generate(method, [r], be, max_new_tokens=16, sampling=sampling, ignore_eos=True)[0]
        assert out.token_ids == alone.token_ids
        assert out.stats["accepted_per_round"] == alone.stats["accepted_per_round"]
    assert len({tuple(o.stats["accepted_per_round"]) for o in batched}) > 1  # rows advanced differently


def test_mixed_greedy_and_sampled_rows(tiny_lm, tiny_chat_tokenizer):
    be = HFBackend(tiny_lm, tiny_chat_tokenizer)
    method = PJ(second_preference="be formal", draft_tokens=2)
    reqs = [Request(prompt="tell me a story", preference="funny", seed=5),
            Request(prompt="why is the sky blue ?", preference="sad", seed=6)]
    samplings = [SamplingConfig(), SamplingConfig(temperature=0.8)]
    both = generate(method, reqs, be, max_new_tokens=12, sampling=samplings, ignore_eos=True)
    for r, s, out in zip(reqs, samplings, both):
        alone = generate(method, [r], be, max_new_tokens=12, sampling=s, ignore_eos=True)[0]
        assert out.token_ids == alone.token_ids


def test_context_room_cuts_drafts(tiny_chat_tokenizer):
    """A 40-position model: λ shrinks near the end so the judge never feeds past the context, and the
    row still fills exactly the room the loop allows (40 - prompt length)."""
    from tests.conftest import make_tiny_lm

    be = HFBackend(make_tiny_lm(len(tiny_chat_tokenizer), ctx=40), tiny_chat_tokenizer)
    method = PJ(second_preference="be formal")
    r = Request(prompt="tell me a story", preference="funny")
    longest = max(len(v.prompt_ids) for v in method.build_views(r, method.config, be, True))
    out = generate(method, [r], be, max_new_tokens=64, ignore_eos=True)[0]
    assert len(out.token_ids) == 40 - longest
    assert all(0 <= t < be.vocab_size for t in out.token_ids)


@pytest.mark.slow
def test_identical_views_greedy_equals_base_smollm2(smollm2):
    """The same on the chat model: the preference as system message in both views == base on the
    prompt with that system message."""
    be = HFBackend(smollm2.model, smollm2.tokenizer)
    pref = "Generate a response that is concise and to the point, without being verbose."
    prompt = "Why is the sky blue?"
    pj = generate(PJ(second_preference=pref), [Request(prompt=prompt, preference=pref)], be, max_new_tokens=32)[0]
    ref = generate(BASE(), [Request(prompt=[{"role": "system", "content": pref}, {"role": "user", "content": prompt}])],
                   be, max_new_tokens=32)[0]
    assert pj.token_ids == ref.token_ids and pj.stats["acceptance_rate"] == 1.0


# ---------------------------------------------------------------- lockstep ≡ block
def _same_rounds(lock, block):
    """Same tokens; lockstep's completed rounds are block's rounds (block also records the round cut
    by the token budget, which lockstep has not finished)."""
    assert lock.token_ids == block.token_ids
    a, b = lock.stats["accepted_per_round"], block.stats["accepted_per_round"]
    assert a == b[: len(a)] and len(b) - len(a) <= 1
    assert lock.stats["drafter_per_round"] == block.stats["drafter_per_round"][: len(a)]


@pytest.mark.parametrize("alternate, extra", [(True, ()), (False, ()), (True, ("be kind",))])
def test_lockstep_equals_block_crafted_sampling(tiny_chat_tokenizer, alternate, extra):
    """Context-dependent random tables (each view a Markov chain over 12 live tokens), temperature 1:
    lockstep draws the round's random numbers in the block schedule's order, so a batch of one on the
    shared generator, and rows on their own seeds, emit exactly the block schedule's tokens."""
    import torch

    from tests.crafted_backend import CraftedBackend

    V, K = len(tiny_chat_tokenizer), 2 + len(extra)
    g = torch.Generator().manual_seed(4)
    tables = torch.full((K, V, V), -1e4)
    live = torch.arange(40, 52)
    tables[:, :, live] = torch.randn(K, 1, 12, generator=g)
    tables[:, live[:, None], live[None, :]] = torch.randn(K, 12, 12, generator=g) * 1.5
    sampling = SamplingConfig(temperature=1.0)
    reqs = [Request(prompt="tell me a story", preference="funny", seed=s, params=p)
            for s, p in ((11, {}), (12, {"draft_tokens": 2}), (13, {}))]
    runs = {}
    for schedule in ("lockstep", "block"):
        m = PJ(second_preference="formal", draft_tokens=3, alternate=alternate, extra_preferences=extra,
               schedule=schedule)
        seeded = generate(m, reqs, CraftedBackend(tables, tiny_chat_tokenizer), max_new_tokens=30, sampling=sampling,
                          ignore_eos=True)
        shared = generate(m, [Request(prompt="tell me a story", preference="funny")],
                          CraftedBackend(tables, tiny_chat_tokenizer), max_new_tokens=30, sampling=sampling,
                          ignore_eos=True, generator=torch.Generator().manual_seed(5))
        runs[schedule] = seeded + shared
    for lock, block in zip(runs["lockstep"], runs["block"]):
        _same_rounds(lock, block)
    rates = [o.stats["acceptance_rate"] for o in runs["lockstep"]]
    assert min(rates) > 0.0 and max(rates) < 1.0  # drafts were both kept and rejected


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0, top_k=50)])
def test_lockstep_equals_block_real_weights(tiny_lm, tiny_chat_tokenizer, sampling):
    """Real (tiny, fixed-init) weights, a batch with per-request λ and first drafter: the one-forward-
    per-token lockstep schedule emits the block schedule's tokens (greedy, and sampling per seed)."""
    be = HFBackend(tiny_lm, tiny_chat_tokenizer)
    reqs = [Request(prompt="tell me a story about a cat", preference="very funny", seed=1),
            Request(prompt="why is the sky blue ?", preference="sad", seed=2, params={"draft_tokens": 2}),
            Request(prompt="what is a big red car ?", preference="kind friend", seed=3, params={"first_drafter": 1})]
    outs = {s: generate(PJ(second_preference="be formal and concise please", draft_tokens=3, schedule=s), reqs, be,
                        max_new_tokens=20, sampling=sampling, ignore_eos=True) for s in ("lockstep", "block")}
    for lock, block in zip(outs["lockstep"], outs["block"]):
        _same_rounds(lock, block)


def test_lockstep_equals_block_stories_greedy(stories):
    """A real pretrained model, two different preferences, alternating roles, λ = 4: same tokens, and
    lockstep runs one forward per emitted token (block: λ + 1 forwards per round)."""
    be = HFBackend(stories.model, stories.tokenizer)
    reqs = [Request(prompt=p, preference="Sue was very sad and cried.") for p in STORY_PROMPTS]
    outs, forwards = {}, {}
    for s in ("lockstep", "block"):
        f0 = be.forward_count
        outs[s] = generate(PJ(second_preference=STORY_PREF, schedule=s), reqs, be, max_new_tokens=40, ignore_eos=True)
        forwards[s] = be.forward_count - f0
    for lock, block in zip(outs["lockstep"], outs["block"]):
        _same_rounds(lock, block)
    assert forwards["lockstep"] == 1 + 39  # the prefill, then one forward per token after the first
    assert forwards["block"] > forwards["lockstep"]


@pytest.mark.slow
def test_lockstep_equals_block_smollm2(smollm2):
    """The chat model, a batch of 3 with different preferences, greedy, 48 tokens: same tokens."""
    from personalign.eval.bench import BENCH_PREFERENCES, BENCH_PROMPTS

    be = HFBackend(smollm2.model, smollm2.tokenizer)
    reqs = [Request(prompt=BENCH_PROMPTS[i], preference=BENCH_PREFERENCES[i]) for i in range(3)]
    outs = {s: generate(PJ(second_preference=BENCH_PREFERENCES[4], schedule=s), reqs, be, max_new_tokens=48)
            for s in ("lockstep", "block")}
    for lock, block in zip(outs["lockstep"], outs["block"]):
        assert lock.token_ids == block.token_ids
