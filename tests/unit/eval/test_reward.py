"""Reward scorers: a local sequence-classification model (batched == one by one), functions,
objects, and config-built scorers."""

from __future__ import annotations

import pytest
import torch

from personalign.eval.reward import build_scorer
from personalign.views.reward import (
    FunctionScorer,
    HFRewardScorer,
    as_scorer,
    import_object,
)
from tests.conftest import fixed_init_
from tests.numerics import assert_close_forward


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_chat_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tiny_chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    model = fixed_init_(LlamaForSequenceClassification(cfg)).eval()
    d = tmp_path_factory.mktemp("rm")
    model.save_pretrained(d)
    tiny_chat_tokenizer.save_pretrained(d)
    return d


def test_hf_scorer_batched_equals_single_and_direct(rm_dir):
    prompts = ["why is the sky blue", "tell me a story", "hi"]
    responses = ["the sun", "once upon a time there was a little cat", "yes"]
    batched = HFRewardScorer(str(rm_dir), batch_size=3, label=1)
    single = HFRewardScorer(str(rm_dir), batch_size=1, label=1)
    a, b = batched.score(prompts, responses), single.score(prompts, responses)
    assert_close_forward(torch.tensor(a), torch.tensor(b), batched.model)  # batch shapes differ: float32 sums
    # the score is logit 1 of the head on the chat-rendered pair
    text = batched.render(prompts[1], responses[1])
    assert "<|user|> tell me a story" in text and "<|assistant|> once upon a time" in text
    enc = batched.tokenizer(text, return_tensors="pt", add_special_tokens=False)  # the template writes BOS
    with torch.no_grad():
        direct = float(batched.model(**enc).logits[0, 1])
    assert_close_forward(torch.tensor(a[1]), torch.tensor(direct), batched.model)
    hh = HFRewardScorer(batched.model, batched.tokenizer, template="hh")
    assert hh.render("q", "r") == "\n\nHuman: q\n\nAssistant: r"
    with pytest.raises(ValueError, match="`label` must be in"):
        HFRewardScorer(batched.model, batched.tokenizer, label=2)
    with pytest.raises(ValueError, match="`reward_model` path .* does not exist"):
        HFRewardScorer(str(rm_dir / "missing"))


def longer_is_better(prompt: str, response: str) -> float:
    return float(len(response))


class LengthRM:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, prompts, responses):
        return [self.scale * len(r) for r in responses]


def test_function_object_and_config_scorers(rm_dir):
    assert FunctionScorer(longer_is_better).score(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    assert as_scorer(longer_is_better).score(["a"], ["abc"]) == [3.0]
    obj = LengthRM()
    assert as_scorer(obj) is obj
    mod = __name__
    assert build_scorer({"kind": "function", "target": f"{mod}:longer_is_better"}).score(["q"], ["ab"]) == [2.0]
    assert build_scorer({"kind": "object", "target": f"{mod}:LengthRM", "args": {"scale": 2}}).score(["q"], ["ab"]) == [4.0]
    assert len(build_scorer({"kind": "hf", "path": str(rm_dir)}).score(["q"], ["a"])) == 1
    with pytest.raises(ValueError, match="kind` must be one of"):
        build_scorer({"kind": "magic"})
    with pytest.raises(ValueError, match="has no attribute"):
        import_object(f"{mod}:nope")
    with pytest.raises(ValueError, match="unknown `scorer` keys"):
        build_scorer({"kind": "hf", "path": str(rm_dir), "lable": 1})
    with pytest.raises(ValueError, match="same length"):
        FunctionScorer(longer_is_better).score(["a"], [])


def _by_preference(prompt: str, response: str, preference: str) -> float:
    """Words of the response that appear in the preference text."""
    return float(sum(w in preference.split() for w in response.split()))


def test_function_scorer_with_a_preference():
    fs = FunctionScorer(_by_preference)
    assert fs.uses_preference and not FunctionScorer(longer_is_better).uses_preference
    assert fs.score(["q", "q"], ["a happy cat", "a sad cat"], preferences=["happy cat", "sad"]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="needs a non-empty `preference`"):
        fs.score(["q"], ["a"])  # neither a fixed preference nor one per row
    with pytest.raises(ValueError, match="non-empty `preference`"):
        fs.score(["q"], ["a"], preferences=[""])
    with pytest.raises(ValueError, match=r"`preferences` \(2\) and `prompts` \(1\)"):
        fs.score(["q"], ["a"], preferences=["x", "y"])
    assert FunctionScorer(_by_preference, preference="cat").score(["q"], ["a cat"]) == [1.0]
    with pytest.raises(ValueError, match="takes no `preference` parameter"):
        FunctionScorer(longer_is_better, preference="x")


def test_import_object_from_a_python_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def shouty(prompt, response):\n    return float(response.count('!'))\n")
    fn = import_object(f"{f}:shouty")
    assert fn("q", "hi!!") == 2.0 and import_object(f"{f}:shouty") is fn  # loaded once
    assert build_scorer({"kind": "function", "target": f"{f}:shouty"}).score(["q"], ["a!"]) == [1.0]
    with pytest.raises(ValueError, match="no Python file"):
        import_object(f"{tmp_path / 'missing.py'}:shouty")
    with pytest.raises(ValueError, match="has no attribute 'loud'"):
        import_object(f"{f}:loud")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="running .*broken.py.* failed: RuntimeError: boom"):
        import_object(f"{broken}:x")
    with pytest.raises(ValueError, match="must look like"):
        import_object("no_colon")


@pytest.fixture(scope="module")
def persrm_dir(tmp_path_factory, tiny_chat_tokenizer):
    """A PersRM on a saved tiny backbone, its adapter and head set to random values (rewards that
    depend on the preference)."""
    from personalign.training.persrm.model import PersRM
    from tests.conftest import make_tiny_lm

    d = tmp_path_factory.mktemp("persrm")
    backbone_dir = d / "backbone"
    lm = make_tiny_lm(vocab_size=len(tiny_chat_tokenizer))
    lm.save_pretrained(backbone_dir)
    tiny_chat_tokenizer.save_pretrained(backbone_dir)
    rm = PersRM.create(lm, tiny_chat_tokenizer, name=str(backbone_dir))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    rm.save(str(d / "ckpt"))
    return d / "ckpt"


def test_persrm_scorer_in_the_reward_metric_and_preference_accuracy(persrm_dir):
    """`{kind: persrm}` loads the checkpoint with its recorded backbone; without a fixed preference
    the reward metric scores each response under its own preference, and preference accuracy each
    pair under its `preference` field."""
    from personalign.eval.datasets import PreferencePair
    from personalign.eval.metrics import get_metric, preference_accuracy

    scorer = build_scorer({"kind": "persrm", "path": str(persrm_dir)})
    prompts, texts = ["why is the sky blue", "tell me a story"], ["the sun is big", "once upon a time"]
    prefs = ["short answers", "long happy stories"]
    direct = scorer.persrm.sequence_reward(prompts, texts, prefs)
    metric = get_metric("reward").bind(scorer=scorer)
    assert metric.compute(prompts, texts, prefs) == pytest.approx(direct)
    swapped = metric.compute(prompts, texts, prefs[::-1])
    assert swapped != pytest.approx(direct)  # the preference matters
    with pytest.raises(ValueError, match="every response needs one"):
        metric.compute(prompts, texts)
    fixed = build_scorer({"kind": "persrm", "path": str(persrm_dir), "preference": prefs[0]})
    assert get_metric("reward").bind(scorer=fixed).compute(prompts, texts) == pytest.approx(
        scorer.persrm.sequence_reward(prompts, texts, [prefs[0]] * 2))
    pairs = [PreferencePair(prompt=p, chosen=a, rejected=b, preference=q)
             for p, a, b, q in zip(prompts, texts, texts[::-1], prefs)]
    rc = scorer.persrm.sequence_reward(prompts, texts, prefs)
    rr = scorer.persrm.sequence_reward(prompts, texts[::-1], prefs)
    assert preference_accuracy(scorer, pairs) == sum((a > b) + 0.5 * (a == b) for a, b in zip(rc, rr)) / 2
    with pytest.raises(ValueError, match="lack"):
        preference_accuracy(scorer, [PreferencePair(prompt="q", chosen="a", rejected="b", origin="f.jsonl:3")])
    with pytest.raises(ValueError, match="unknown `scorer` keys"):
        build_scorer({"kind": "persrm", "path": str(persrm_dir), "prefrence": "x"})


def test_reward_metric_with_a_preference_function():
    from personalign.eval.metrics import get_metric

    metric = get_metric("reward").bind(scorer=FunctionScorer(_by_preference))
    assert metric.compute(["q", "q"], ["a cat", "a cat"], ["cat", "dog"]) == [1.0, 0.0]
    # a scorer without a preference ignores the preferences
    assert get_metric("reward").bind(scorer=FunctionScorer(longer_is_better)).compute(["q"], ["ab"], ["x"]) == [2.0]
    assert get_metric("length").compute(["q"], ["a b c"], ["x"]) == [3.0]
    with pytest.raises(ValueError, match=r"`preferences` \(2\)"):
        metric.compute(["q"], ["a"], ["x", "y"])
