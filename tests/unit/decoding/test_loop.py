"""The decoding loop: budgets, per-row EOS, stop strings, streaming, seeds, validation errors."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_lm

from personalign import HFBackend, Request, SamplingConfig, generate, get_method, stream
from personalign.decoding.loop import decode
from personalign.decoding.method import TokenMethod


class ForcedMethod(TokenMethod):
    """Emits a scripted token sequence per row (to test the loop without model randomness)."""

    name = "forced"

    def __init__(self, script):
        super().__init__()
        self.script = script

    def build_views(self, request, config, backend, chat_template):
        return get_method("base")().build_views(request, config, backend, chat_template)

    def combine(self, logprobs, state):
        t = len(state.generated[0]) if False else state.extra.setdefault("t", 0)
        state.extra["t"] = t + 1
        out = torch.full_like(logprobs[:, 0], -1e9)
        for b, seq in enumerate(self.script):
            out[b, seq[min(t, len(seq) - 1)]] = 0.0
        return out


@pytest.fixture()
def backend(tiny_lm, tiny_tokenizer):
    return HFBackend(tiny_lm, tiny_tokenizer)


def test_per_row_eos_and_budget(backend):
    eos = backend.tokenizer().eos_token_id
    m = ForcedMethod([[10, 11, eos, 12], [13, 14, 15, 16, 17, 18]])
    outs = generate(m, [Request(prompt="the cat"), Request(prompt="a dog")], backend, max_new_tokens=5)
    assert outs[0].token_ids == [10, 11, eos] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == [13, 14, 15, 16, 17] and outs[1].finish_reason == "length"
    assert outs[0].text == backend.tokenizer().decode([10, 11])


def test_ignore_eos_and_per_row_budgets(backend):
    eos = backend.tokenizer().eos_token_id
    m = ForcedMethod([[eos], [13]])
    outs = generate(m, [Request(prompt="the cat"), Request(prompt="a dog")], backend, max_new_tokens=[3, 2],
                    ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [3, 2]


def test_stop_string_ends_row(backend, tiny_tokenizer):
    script = tiny_tokenizer("run fast and stop", add_special_tokens=False)["input_ids"]
    outs = generate(ForcedMethod([script + [8] * 5]), [Request(prompt="go")], backend, max_new_tokens=20,
                    stop=["and"])
    assert outs[0].text == "run fast " and outs[0].finish_reason == "stop"


def test_stream_deltas_concatenate_to_text(backend):
    reqs = [Request(prompt="the cat"), Request(prompt="tell me a story about a dog")]
    kw = dict(max_new_tokens=12, sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(3))
    outs = generate(get_method("base")(), reqs, backend, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    parts: dict[int, str] = {0: "", 1: ""}
    finals = {}
    for d in stream(get_method("base")(), reqs, backend, **kw):
        parts[d.row] += d.text
        if d.finish_reason:
            finals[d.row] = d.finish_reason
    assert parts == {0: outs[0].text, 1: outs[1].text}
    assert finals == {0: outs[0].finish_reason, 1: outs[1].finish_reason}


def test_same_seed_same_sample_and_own_seed_row_independent(backend):
    base = get_method("base")()
    samp = SamplingConfig(temperature=1.0, top_p=0.95)

    def run(reqs, seed):
        return generate(base, reqs, backend, max_new_tokens=10, sampling=samp,
                        generator=torch.Generator().manual_seed(seed))

    r = [Request(prompt="the cat"), Request(prompt="a dog")]
    assert [o.token_ids for o in run(r, 1)] == [o.token_ids for o in run(r, 1)]
    mine = Request(prompt="the cat", seed=42)
    alone = run([mine], 0)[0].token_ids
    together = run([Request(prompt="big red car"), mine, Request(prompt="a dog")], 99)[1].token_ids
    assert alone == together


def test_inputs_are_not_mutated(backend):
    reqs = [Request(prompt="the cat", preference="funny", params={})]
    before = repr(reqs)
    generate(get_method("preference_prompting")(), reqs, backend, max_new_tokens=3)
    assert repr(reqs) == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Request(prompt=""), "`prompt`"),
        (lambda: Request(prompt=[]), "`prompt`"),
        (lambda: Request(prompt=[{"role": "user"}]), "prompt\\[0\\]"),
    ],
)
def test_bad_request(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_budget_and_method(backend):
    with pytest.raises(ValueError, match="`max_new_tokens` must be an integer >= 1"):
        generate(get_method("base")(), [Request(prompt="hi")], backend, max_new_tokens=0)
    with pytest.raises(ValueError, match="valid methods: .*base.*Did you mean 'preference_prompting'"):
        get_method("preference_prompt")
    with pytest.raises(ValueError, match="`preference` must be a non-empty text"):
        generate(get_method("preference_prompting")(), [Request(prompt="hi")], backend, max_new_tokens=2)


def test_budget_clamped_to_context(tiny_tokenizer):
    small = make_tiny_lm(len(tiny_tokenizer), ctx=12)
    be = HFBackend(small, tiny_tokenizer)
    out = generate(get_method("base")(), [Request(prompt="the cat is")], be, max_new_tokens=50, ignore_eos=True)[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 12


def test_decode_yields_events_then_outputs(backend):
    events = list(decode(get_method("base")(), [Request(prompt="the cat")], backend, max_new_tokens=3,
                         ignore_eos=True))
    assert isinstance(events[-1], list) and len(events) == 4
    assert sum(len(e.tokens) for e in events[:-1]) == 3
