"""Backend equivalences: cached stepping, batching, prefix sharing, ragged steps, truncation, soft prompts.

Every check compares the batched, cached backend against a plain uncached forward of the same text
(``naive_next_logprobs``), in float32, to the float32 bound of ``tests.numerics.forward_atol``: the
two sum in other orders (other batch shapes, cached keys), never exactly alike across CPUs.
"""

from __future__ import annotations

import pytest
import torch

from personalign.types import ViewSpec
from personalign.views.hf import HFBackend
from tests.conftest import make_tiny_lm, make_tokenizer
from tests.numerics import assert_close_logprobs


def naive_next_logprobs(model, ids, prefix=None) -> torch.Tensor:
    """log π(· | ids) by one uncached forward of the whole sequence (batch of one)."""
    with torch.no_grad():
        if prefix is None:
            logits = model(input_ids=torch.tensor([ids])).logits
        else:
            emb = model.get_input_embeddings()(torch.tensor([ids]))
            logits = model(inputs_embeds=torch.cat([prefix[None], emb], 1)).logits
    return torch.log_softmax(logits[0, -1].float(), -1)


PROMPTS = [[1, 8, 36, 14, 55], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 60]]


@pytest.fixture()
def backend(tiny_lm, tiny_tokenizer):
    return HFBackend(tiny_lm, tiny_tokenizer)


def test_kv_cache_stepping_equals_recompute(backend, tiny_lm):
    state = backend.prefill([[ViewSpec(prompt_ids=p)] for p in PROMPTS])
    seqs = [list(p) for p in PROMPTS]
    for b, s in enumerate(seqs):
        assert_close_logprobs(state.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, s), tiny_lm)
    for step in range(6):
        tok = torch.tensor([[(7 * step + 3 * b) % 100 + 8] for b in range(len(seqs))])
        backend.step(state, tok)
        for b, s in enumerate(seqs):
            s.append(int(tok[b, 0]))
            assert_close_logprobs(state.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, s), tiny_lm)


def test_k_views_batched_equal_separate(backend, tiny_lm):
    views = [[ViewSpec(prompt_ids=p) for p in PROMPTS]]  # one request, three views
    state = backend.prefill(views)
    tok = torch.tensor([[20, 21, 22]])
    lp = backend.step(state, tok)  # [1, 3, 3, V]
    for k, p in enumerate(PROMPTS):
        alone = backend.prefill([[ViewSpec(prompt_ids=p)]])
        lp1 = backend.step(alone, tok)
        assert_close_logprobs(lp[0, k], lp1[0, 0], tiny_lm)


def test_row_does_not_depend_on_neighbours(backend, tiny_lm):
    target = [1, 9, 10, 11]
    outs = []
    for neighbours in ([], [[1, 50]], [[1] + list(range(8, 40))], [[1, 70, 71], [1, 72, 73, 74, 75]]):
        state = backend.prefill([[ViewSpec(prompt_ids=target)]] + [[ViewSpec(prompt_ids=n)] for n in neighbours])
        toks = []
        for _ in range(5):
            t = state.last_logprobs[:, 0].argmax(-1)
            toks.append(int(t[0]))
            backend.step(state, t[:, None])
        outs.append((toks, state.last_logprobs[0, 0].clone()))
    for toks, lp in outs[1:]:
        assert toks == outs[0][0]
        assert_close_logprobs(lp, outs[0][1], tiny_lm)


def test_shared_prefix_prefilled_once_equals_unshared(tiny_lm, tiny_tokenizer):
    common = [1, 30, 31, 32, 33, 34, 35]
    prompts = [common + [40, 41], common + [42], common + [43, 44, 45, 46]]
    views = [[ViewSpec(prompt_ids=p) for p in prompts]]
    shared, plain = HFBackend(tiny_lm, tiny_tokenizer), HFBackend(tiny_lm, tiny_tokenizer, share_prefix=False)
    s1, s2 = shared.prefill(views), plain.prefill(views)
    assert shared.forward_count == 2 and plain.forward_count == 1  # shared prefix forward + suffixes
    # the suffix batch is narrower than the unshared one: the prefix ran once
    assert s1.groups[0].mask.shape[1] == len(common) + 4 and s2.groups[0].mask.shape[1] == len(prompts[2])
    assert_close_logprobs(s1.last_logprobs, s2.last_logprobs, tiny_lm)
    tok = torch.tensor([[50, 51]])
    assert_close_logprobs(shared.step(s1, tok), plain.step(s2, tok), tiny_lm)
    for k, p in enumerate(prompts):
        assert_close_logprobs(s1.last_logprobs[0, k], naive_next_logprobs(tiny_lm, p + [50, 51]), tiny_lm)


def test_ragged_step_equals_separate(backend, tiny_lm):
    state = backend.prefill([[ViewSpec(prompt_ids=p)] for p in PROMPTS])
    tokens = torch.tensor([[20, 21, 22], [23, 0, 0], [24, 25, 0]])
    lengths = torch.tensor([3, 1, 2])
    lp = backend.step(state, tokens, lengths)
    for b, p in enumerate(PROMPTS):
        n = int(lengths[b])
        for i in range(n):
            assert_close_logprobs(lp[b, 0, i], naive_next_logprobs(tiny_lm, p + tokens[b, : i + 1].tolist()), tiny_lm)
        assert_close_logprobs(state.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, p + tokens[b, :n].tolist()), tiny_lm)
    assert state.fed[:, 0].tolist() == [3, 1, 2]
    # keep going after the ragged step: positions and masks stay right
    backend.step(state, torch.tensor([[30], [31], [32]]))
    for b, p in enumerate(PROMPTS):
        seq = p + tokens[b, : int(lengths[b])].tolist() + [30 + b]
        assert_close_logprobs(state.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, seq), tiny_lm)


def test_truncate_equals_fresh_prefill(backend, tiny_lm):
    state = backend.prefill([[ViewSpec(prompt_ids=p)] for p in PROMPTS])
    backend.step(state, torch.tensor([[20, 21, 22, 23]] * 3))
    backend.truncate(state, torch.tensor([1, 4, 0]))  # drop 3, 0, 4 tokens
    assert state.fed[:, 0].tolist() == [1, 4, 0]
    assert torch.isnan(state.last_logprobs[0, 0]).all() and not torch.isnan(state.last_logprobs[1, 0]).any()
    backend.step(state, torch.tensor([[40], [41], [42]]))
    kept = [[20], [20, 21, 22, 23], []]
    for b, p in enumerate(PROMPTS):
        assert_close_logprobs(state.last_logprobs[b, 0], naive_next_logprobs(tiny_lm, p + kept[b] + [40 + b]), tiny_lm)


def test_truncate_all_rows_crops_cache(backend):
    state = backend.prefill([[ViewSpec(prompt_ids=p)] for p in PROMPTS])
    width = state.cache_length()
    backend.step(state, torch.tensor([[20, 21, 22]] * 3))
    backend.truncate(state, torch.tensor([0, 0, 0]))
    assert state.cache_length() == width
    assert state.groups[0].cache.get_seq_length() == width


def test_groups_advance_independently(backend, tiny_lm):
    p = PROMPTS[0]
    state = backend.prefill([[ViewSpec(prompt_ids=p), ViewSpec(prompt_ids=PROMPTS[1])]], groups=[[0], [1]])
    backend.step(state, torch.tensor([[20]]), views=[0])
    backend.step(state, torch.tensor([[21]]), views=[0])
    assert state.fed.tolist() == [[2, 0]]
    lp = backend.step(state, torch.tensor([[20, 21]]), views=[1])
    assert lp.shape[1] == 1
    assert_close_logprobs(state.last_logprobs[0, 1], naive_next_logprobs(tiny_lm, PROMPTS[1] + [20, 21]), tiny_lm)
    assert_close_logprobs(state.last_logprobs[0, 0], naive_next_logprobs(tiny_lm, p + [20, 21]), tiny_lm)
    with pytest.raises(ValueError, match="share one cache"):
        st = backend.prefill([[ViewSpec(prompt_ids=p), ViewSpec(prompt_ids=p)]])
        backend.step(st, torch.tensor([[1]]), views=[0])


def test_soft_prompt_prefix_cached_equals_recompute(backend, tiny_lm):
    g = torch.Generator().manual_seed(7)
    prefix = torch.randn(3, tiny_lm.config.hidden_size, generator=g)
    views = [[ViewSpec(prompt_ids=PROMPTS[0], prefix_embeds=prefix)], [ViewSpec(prompt_ids=PROMPTS[1])]]
    state = backend.prefill(views)
    assert_close_logprobs(state.last_logprobs[0, 0], naive_next_logprobs(tiny_lm, PROMPTS[0], prefix), tiny_lm)
    assert_close_logprobs(state.last_logprobs[1, 0], naive_next_logprobs(tiny_lm, PROMPTS[1]), tiny_lm)
    backend.step(state, torch.tensor([[20], [21]]))
    assert_close_logprobs(state.last_logprobs[0, 0], naive_next_logprobs(tiny_lm, PROMPTS[0] + [20], prefix), tiny_lm)
    with pytest.raises(ValueError, match="prefix_embeds"):
        backend.prefill([[ViewSpec(prompt_ids=PROMPTS[0], prefix_embeds=torch.zeros(2, 5))]])


def test_views_on_two_models_and_padded_vocab(tiny_tokenizer, tiny_lm):
    steer = make_tiny_lm(len(tiny_tokenizer), hidden=16, extra_vocab_rows=14)  # embedding rounded up
    be = HFBackend({"main": tiny_lm, "steer": steer}, tiny_tokenizer)
    assert be.vocab_size == len(tiny_tokenizer)
    views = [[ViewSpec(prompt_ids=p), ViewSpec(prompt_ids=p, model="steer")] for p in PROMPTS[:2]]
    state = be.prefill(views)
    assert state.last_logprobs.shape == (2, 2, len(tiny_tokenizer))
    backend_calls = be.forward_count
    be.step(state, torch.tensor([[20], [21]]))
    assert be.forward_count == backend_calls + 2  # one forward per model
    for b, p in enumerate(PROMPTS[:2]):
        ref = torch.log_softmax(steer(torch.tensor([p + [20 + b]])).logits[0, -1, : len(tiny_tokenizer)].float(), -1)
        assert_close_logprobs(state.last_logprobs[b, 1], ref.detach(), steer)


def test_mismatched_tokenizers_name_both_models(tiny_tokenizer, tiny_lm):
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match="'main'.*'steer'"):
        HFBackend({"main": tiny_lm, "steer": tiny_lm}, {"main": tiny_tokenizer, "steer": other})


def test_prompt_longer_than_context(tiny_tokenizer):
    small = make_tiny_lm(len(tiny_tokenizer), ctx=16)
    be = HFBackend(small, tiny_tokenizer)
    with pytest.raises(ValueError, match="context is 16 tokens"):
        be.prefill([[ViewSpec(prompt_ids=list(range(8, 28)))]])


def test_sequence_logprobs_match_naive(backend, tiny_lm):
    conts = [[20, 21], [22], [23, 24, 25]]
    got = backend.sequence_logprobs(PROMPTS, conts)
    for p, c, g in zip(PROMPTS, conts, got):
        ref = [float(naive_next_logprobs(tiny_lm, p + c[:i])[c[i]]) for i in range(len(c))]
        assert_close_logprobs(g, torch.tensor(ref), tiny_lm)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_token_steps_of_padded_rows_take_the_additive_mask(tiny_tokenizer, attn, monkeypatch):
    """Padded rows' one-token steps hand attention a prepared additive 4-D mask (built once a step):
    the same log-probs as transformers' own mask from the 2-D one, and as a full recompute."""
    lm = make_tiny_lm(len(tiny_tokenizer))
    lm.config._attn_implementation = attn
    built = []
    real = HFBackend._decode_mask
    monkeypatch.setattr(HFBackend, "_decode_mask", lambda self, *a: built.append(1) or real(self, *a))
    runs = []
    for additive in (True, False):
        be = HFBackend(lm, tiny_tokenizer)
        be._additive_mask["main"] = additive
        state = be.prefill([[ViewSpec(prompt_ids=p)] for p in PROMPTS])
        seqs, lps = [list(p) for p in PROMPTS], []
        for step in range(4):
            tok = torch.tensor([[(5 * step + 3 * b) % 90 + 8] for b in range(len(seqs))])
            lps.append(be.step(state, tok)[:, 0, -1])
            for b, s in enumerate(seqs):
                s.append(int(tok[b, 0]))
        runs.append(lps)
        if additive:
            assert len(built) == 4
            for b, s in enumerate(seqs):
                assert_close_logprobs(lps[-1][b], naive_next_logprobs(lm, s), lm)
    assert len(built) == 4  # the 2-D run built none
    for a, b in zip(*runs):
        assert_close_logprobs(a, b, lm)
