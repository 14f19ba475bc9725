"""Greedy decoding through our loop equals ``model.generate(do_sample=False)`` token for token.

On real models (stories260k from ../shared and SmolLM2-135M-Instruct), for one prompt and for a
batch of prompts of different lengths, where every row also equals its own batch-of-one result.

Tie rule: the two decode with other kernels (batch shapes, cached keys), so their log-probs agree to
the float32 bound of ``tests.numerics.forward_atol``, not bit for bit. Tokens must be equal except
where ``generate``'s best two log-probs lie within twice that bound (a near-tie either may break);
after such a point the texts differ and nothing more is compared (``assert_greedy_matches``).
"""

from __future__ import annotations

import pytest
import torch

from personalign import HFBackend, Request, generate, get_method
from personalign.personas.prompts import build_prompt_ids
from tests.numerics import assert_greedy_matches, forward_atol


def hf_greedy(lm, ids: list[int], n: int) -> tuple[list[int], list[float], float]:
    """``generate``'s greedy tokens, its (best − second) log-prob margin per step, and the tie tolerance."""
    with torch.no_grad():
        out = lm.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id or 0,
                                output_scores=True, return_dict_in_generate=True)
    lps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    margins = [float(t[0] - t[1]) for t in (lp.topk(2).values for lp in lps)]
    atol = 2 * max(forward_atol(lm.model, lp, tokens=len(ids) + n) for lp in lps)
    return out.sequences[0, len(ids):].tolist(), margins, atol


def check_model(lm, prompts, n, chat_template):
    backend = HFBackend(lm.model, lm.tokenizer)
    base = get_method("base")()
    batch = generate(base, [Request(prompt=p) for p in prompts], backend, max_new_tokens=n, chat_template=chat_template)
    for p, out in zip(prompts, batch):
        ids = list(build_prompt_ids(lm.tokenizer, p, chat_template=chat_template))
        assert out.prompt_token_ids == ids
        ref, margins, atol = hf_greedy(lm, ids, n)
        assert_greedy_matches(out.token_ids, ref, margins, atol)
        alone = generate(base, [Request(prompt=p)], backend, max_new_tokens=n, chat_template=chat_template)[0]
        assert_greedy_matches(alone.token_ids, ref, margins, atol)


def test_greedy_equals_generate_stories(stories):
    prompts = ["Once upon a time", "Lily and Ben went to the park to play with their big red ball. Then", "Tom"]
    check_model(stories, prompts[:1], 40, chat_template=False)
    check_model(stories, prompts, 40, chat_template=False)


def test_greedy_equals_generate_smollm2(smollm2):
    prompts = ["What is the capital of France?",
               "Write a haiku about the sea, then explain in one sentence why you chose its images.",
               "Hi"]
    check_model(smollm2, prompts[:1], 24, chat_template=True)
    check_model(smollm2, prompts, 24, chat_template=True)


@pytest.mark.parametrize("chat_template", [True, False])
def test_plain_prompt_encoded_as_tokenizer_does(smollm2, chat_template):
    ids = build_prompt_ids(smollm2.tokenizer, "Hello there", chat_template=chat_template)
    if chat_template:
        assert list(ids) == smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        assert list(ids) == smollm2.tokenizer("Hello there")["input_ids"]
