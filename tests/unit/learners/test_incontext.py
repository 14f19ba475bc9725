"""The in-context learner's pieces: which earlier choices a request shows (relevance, token budget,
the stated preference first), which items a hypothesis is inferred from (the rule a delete and a
replay share), and an inference chat that always fits the model's context."""

from __future__ import annotations

import asyncio

import pytest

from personalign.learners.base import LearnerEnv, RequestView
from personalign.learners.incontext import (
    InContextConfig,
    InContextLearner,
    hypothesis_messages,
    hypothesis_window,
    rank_examples,
)
from personalign.server.store import StoredFeedback
from personalign.views import HFBackend


def _item(i: int, prompt: str, chosen: str = "yes", rejected: str = "no") -> StoredFeedback:
    return StoredFeedback(f"f{i}", "u", [{"role": "user", "content": prompt}], chosen, rejected, None, True, float(i),
                          pk=i)


class _Method:
    name = "preference_prompting"
    reads_preference = True


def test_hypothesis_window_is_a_function_of_the_items_in_order():
    items = [_item(i, f"q{i}") for i in range(7)]
    # inferences at items 0, 2, 4, 6 (every 2); the last reads the 3 items up to item 6, newest first
    assert hypothesis_window(items, 2, 3) == ["f6", "f5", "f4"]
    assert hypothesis_window(items[:6], 2, 3) == ["f4", "f3", "f2"]  # item 5 came after the last inference
    assert hypothesis_window(items[:1], 2, 3) == ["f0"]
    assert hypothesis_window([], 2, 3) == []
    assert hypothesis_window(items, 3, 10) == ["f6", "f5", "f4", "f3", "f2", "f1", "f0"]


def test_examples_rank_by_shared_rare_words_then_recency():
    items = [_item(3, "how to bake bread"), _item(2, "tell me about the moon"), _item(1, "bread or cake party")]
    ranked = rank_examples("good bread recipe", items)
    assert [f.feedback_id for f in ranked][:2] == ["f3", "f1"]  # both share "bread"; the newer first
    assert ranked[-1].feedback_id == "f2"
    assert [f.feedback_id for f in rank_examples("nothing in common", items)] == ["f3", "f2", "f1"]


def test_hypothesis_messages_hold_every_choice_in_order():
    msgs = hypothesis_messages([_item(2, "second", "B2", "b2"), _item(1, "first", "A1", "a1")], 100)
    text = msgs[0]["content"]
    assert text.index("Choice 1. Question: first") < text.index("Choice 2. Question: second")
    assert "Reply chosen: A1" in text and "Reply not chosen: b2" in text and "The user prefers" in text


@pytest.fixture()
def learner(tiny_lm, tiny_chat_tokenizer):
    lr = InContextLearner(InContextConfig(max_tokens=4096, max_examples=2))
    lr.bind(LearnerEnv(backend=HFBackend(tiny_lm, tiny_chat_tokenizer), methods={}, steer_key="main",
                       chat_template=True, max_tokens=1024))
    return lr


def _view(history, stated=None, prompt="bread please", profile=None):
    async def load(limit):
        return history[:limit]
    return RequestView(method="preference_prompting", method_obj=_Method(), messages=[{"role": "user", "content": prompt}],
                       stated=stated, profile=profile or {"user": "u", "learner": "incontext"}, history=load)


def test_a_request_gets_the_hypothesis_and_relevant_examples_within_the_token_budget(learner):
    tok = learner.env.backend.tokenizer("main")
    history = [_item(i, f"about bread {i}" if i % 2 else f"about the sea {i}", "x y", "z") for i in range(6, 0, -1)]
    state = {"hypothesis": "Short.", "based_on": ["f6"], "choices": 6}
    got = asyncio.run(learner.request(state, _view(history, stated="be kind")))
    text = got.preference
    assert text.startswith("be kind\n\n")  # the stated preference first
    assert "Short." in text
    assert got.info["incontext"]["examples"] and all(int(f[1:]) % 2 for f in got.info["incontext"]["examples"])
    learned = text[len("be kind\n\n"):]
    budget = learner.env.backend.context_length("main") // 4  # below max_tokens here: the prompt keeps its room
    assert len(tok(learned, add_special_tokens=False)["input_ids"]) <= budget  # the budget, in tokens
    assert got.info["incontext"]["tokens"] <= budget
    # a method that reads no preference gets nothing; nor does a profile whose learner is another
    plain = _view(history)
    plain.method_obj = type("M", (), {"name": "base", "reads_preference": False})()
    assert asyncio.run(learner.request(state, plain)).preference is None
    other = _view(history, profile={"user": "u", "learner": "drift"})
    assert asyncio.run(learner.request(state, other)).preference is None


def test_the_inference_chat_always_fits_the_context(learner):
    ctx = learner.env.backend.context_length("main")
    cfg = InContextConfig(hypothesis_tokens=16, example_chars=8000)
    huge = [_item(i, "word " * 2000, "long " * 2000, "other " * 2000) for i in range(6)]
    msgs = learner._bounded(huge, cfg)
    from personalign.personas.prompts import build_prompt_ids

    assert msgs is not None
    n = len(build_prompt_ids(learner.env.backend.tokenizer("main"), msgs, chat_template=True))
    assert n <= ctx - 16 - 1
