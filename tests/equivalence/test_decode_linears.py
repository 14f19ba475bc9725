"""The engine with its decode-step linears off, tuned, and forced into each formulation
(``views.linears``).

- Off, no linear of the model is touched, and the tuned path with ``stock`` chosen everywhere runs
  the same ops on the same shapes, so its log-probs are bit-identical to off.
- Each formulation reorders the sums of every linear, so its log-probs equal off's to the float32
  bound of ``tests.numerics.forward_atol`` (not bit for bit), on SmolLM2 at 3 and 9 rows.
- Greedy decoding in each formulation equals ``model.generate`` token for token, except at a
  near-tie: where tokens part, ``generate``'s best two log-probs must lie within twice that bound
  (``assert_greedy_matches``); after it nothing more is compared.
- PAD's lean LoRA rows (``views.adapters``) run the same path: the engine still picks what PAD's rule
  computed from separate full forwards picks.
"""

from __future__ import annotations

import pytest
import torch

from personalign import HFBackend, Request, generate, get_method
from personalign.decoding.loop import generate as loop_generate
from personalign.methods.pad import PADConfig
from personalign.personas.prompts import build_prompt_ids
from personalign.types import ViewSpec
from personalign.views.linears import FORMULATIONS, DecodeLinears
from tests.equivalence.test_generate_equivalence import hf_greedy
from tests.equivalence.test_pad_engine import PREFS, PROMPTS, _naive, _pad_on, _persrm
from tests.numerics import assert_close_logprobs, assert_greedy_matches

TUNED = [f for f in FORMULATIONS if f != "stock"]


def _teacher_forced(backend: HFBackend, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Log-probs of each one-token decode step of the rows ``prompts`` (one request with one view per
    prompt; its views share the generated tokens), fed the same fixed tokens whatever the path."""
    state = backend.prefill([[ViewSpec(prompt_ids=p) for p in prompts]])
    out = [state.last_logprobs.clone()]
    for s in range(steps):
        out.append(backend.step(state, torch.tensor([[37 * s % 400 + 30]])).clone())
    return out


def test_off_touches_nothing_and_stock_everywhere_is_bit_identical(stories, monkeypatch):
    ids = [list(build_prompt_ids(stories.tokenizer, p, chat_template=False))
           for p in ("Once upon a time", "Lily and Ben went to the park. Then", "Tom")]
    stock = _teacher_forced(HFBackend(stories.model, stories.tokenizer, decode_linears=DecodeLinears(force="stock")),
                            ids, 5)

    def never(*args, **kwargs):
        raise AssertionError("the tuned path ran while off")

    monkeypatch.setattr(DecodeLinears, "run", never)
    off_backend = HFBackend(stories.model, stories.tokenizer, decode_linears=False)
    assert off_backend.linears is None
    off = _teacher_forced(off_backend, ids, 5)
    assert all(torch.equal(a, b) for a, b in zip(off, stock))


@pytest.mark.numerics
def test_each_formulation_matches_stock_on_smollm2(smollm2):
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Hi"]
    ids = [list(build_prompt_ids(smollm2.tokenizer, p, chat_template=True)) for p in prompts]
    nine = [ids[k % 3] for k in range(9)]  # Drift's row count at 7 attributes
    off = HFBackend(smollm2.model, smollm2.tokenizer, decode_linears=False)
    want = {len(rows): _teacher_forced(off, rows, 2) for rows in (ids, nine)}
    for name in TUNED:
        forced = DecodeLinears(force=name, extra_bytes=1 << 32)  # every weight in the formulation
        on = HFBackend(smollm2.model, smollm2.tokenizer, decode_linears=forced)
        for rows in (ids, nine):
            got = _teacher_forced(on, rows, 2)
            assert torch.equal(want[len(rows)][0], got[0])  # the prefill runs the stock path in both
            for w, g in zip(want[len(rows)][1:], got[1:]):
                assert_close_logprobs(g, w, smollm2.model, tokens=64)
        ran = {r["shape"].split("x")[0] for r in forced.table() if r["choice"].startswith(name)}
        if name != "onednn" or torch.backends.mkldnn.is_available():
            assert ran == {"3", "9"}, (name, forced.table())  # the formulation really ran, at both row counts


@pytest.mark.parametrize("mode", ["off", "tuned", *TUNED])
def test_greedy_equals_generate_in_every_mode(stories, mode):
    lin = {"off": False, "tuned": DecodeLinears()}.get(mode) if mode in ("off", "tuned") else \
        DecodeLinears(force=mode, extra_bytes=1 << 32)
    backend = HFBackend(stories.model, stories.tokenizer, decode_linears=lin)
    prompts = ["Once upon a time", "Lily and Ben went to the park to play with their big red ball. Then", "Tom"]
    outs = generate(get_method("base")(), [Request(prompt=p) for p in prompts], backend, max_new_tokens=30,
                    chat_template=False)
    for p, out in zip(prompts, outs):
        ids = list(build_prompt_ids(stories.tokenizer, p, chat_template=False))
        ref, margins, atol = hf_greedy(stories, ids, 30)
        assert_greedy_matches(out.token_ids, ref, margins, atol)


@pytest.mark.parametrize("name", TUNED)
def test_pad_lora_rows_in_each_formulation_equal_the_rule(tiny_tokenizer, name):
    tok = tiny_tokenizer
    rm = _persrm(tok)
    cfg = PADConfig(k=5, beta=1.5, mode="eq13")
    forced = DecodeLinears(force=name, extra_bytes=1 << 32)
    backend = HFBackend(rm.base_lm, tok, share_prefix=False, decode_linears=forced)
    method = _pad_on(backend, rm, cfg)
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, PREFS)]
    outs = loop_generate(method, reqs, backend, max_new_tokens=6, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in outs] == _naive(rm, None, tok, cfg, 6)
    assert backend.linears.table(), "no linear ran the forced formulation"
