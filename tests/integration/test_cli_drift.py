"""``personalign fit drift`` and ``personalign generate --method drift`` end to end on the real tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from personalign.cli.main import main
from personalign.personas.drift import DriftProfile

PAIRS = [
    {"prompt": "Tell me a story.", "chosen": "Once upon a time there was a happy girl who loved to play.",
     "rejected": "Once upon a time there was a sad boy who cried all day."},
    {"prompt": "Tell me a story.", "chosen": "The sun was shining and the dog was happy.",
     "rejected": "The dog was sad and the sky was dark."},
    {"prompt": "Tell me a story.", "chosen": "same", "rejected": "same"},
]
ATTRS = {"mode": "replace", "base": "Here is a story.",
         "attributes": {"happy": "Here is a happy story.", "sad": "Here is a sad story.",
                        "short": "Here is a short story."}}


@pytest.fixture()
def files(tmp_path, stories):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps(ATTRS))
    return tmp_path, pairs, attrs


def _fit(tmp_path, pairs, attrs, *extra):
    from tests.conftest import STORIES

    return main(["fit", "drift", "--pairs", str(pairs), "--model", str(STORIES), "--out", str(tmp_path / "p.json"),
                 "--attributes", str(attrs), *extra])


def test_fit_report_generate(files, capsys):
    tmp_path, pairs, attrs = files
    assert _fit(tmp_path, pairs, attrs, "--top-m", "2", "--eval-pairs", str(pairs), "--json") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prof = DriftProfile.load(tmp_path / "p.json")
    assert out["num_pairs"] == prof.num_pairs == 2 and out["skipped_pairs"] == 1
    assert any("chosen == rejected" in w for w in out["warnings"])
    assert out["accuracy"] == pytest.approx(prof.accuracy(prof.wins, prof.losses))
    assert [s["name"] for s in out["selected"]] == [n for n, _, _ in prof.selected()]
    assert prof.stats["eval_accuracy"] == out["accuracy"]

    assert main(["fit", "drift", "--report", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "selected attributes" in text and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    from tests.conftest import STORIES

    assert main(["generate", "--method", "drift", "--profile", str(tmp_path / "p.json"), "--model", str(STORIES),
                 "--prompt", "Once upon a time", "--max-new-tokens", "8", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out.strip())
    assert gen["method"] == "drift" and len(gen["token_ids"]) == 8
    assert gen["stats"]["drift_attributes"] == {n: w for n, _, w in prof.selected()}


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "p", "chosen": "a"}, "pairs.jsonl:2: missing field `rejected`"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "pairs.jsonl:2: field `prompt` must be a non-empty text"),
])
def test_fit_bad_pairs(files, capsys, bad, match):
    tmp_path, pairs, attrs = files
    pairs.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(bad) + "\n")
    assert _fit(tmp_path, pairs, attrs) == 2
    assert match in capsys.readouterr().err


def test_fit_bad_options(files, capsys):
    tmp_path, pairs, attrs = files
    assert _fit(tmp_path, pairs, attrs, "--top-m", "4") == 2
    assert "`--top-m` must be in [1, 3]" in capsys.readouterr().err
    attrs.write_text('{"attributes": {"happy": "A.", "happy": "B."}}')
    assert _fit(tmp_path, pairs, attrs) == 2
    assert "appears twice" in capsys.readouterr().err


def test_fit_scores_64_response_tokens_by_default_and_0_scores_whole_responses(files, capsys):
    """The default scored length is the one docs/performance.md measured (64 tokens); 0 is the whole reply."""
    tmp_path, pairs, attrs = files
    story = " ".join(["The happy girl ran to the park and played with her big red ball in the sun."] * 8)
    pairs.write_text(json.dumps({"prompt": "Tell me a story.", "chosen": story,
                                 "rejected": story.replace("happy", "sad")}) + "\n")
    fits = {}
    for flag in ([], ["--max-response-tokens", "64"], ["--max-response-tokens", "0"]):
        assert _fit(tmp_path, pairs, attrs, "--top-m", "2", *flag) == 0
        fits[" ".join(flag) or "default"] = DriftProfile.load(tmp_path / "p.json")
    capsys.readouterr()
    default, at_64, whole = fits.values()
    assert default.max_response_tokens == 64 and whole.max_response_tokens is None
    assert torch.equal(default.wins, at_64.wins) and torch.equal(default.losses, at_64.losses)
    # the replies run well past 64 tokens: the whole-reply scores count the rest too
    assert not torch.allclose(default.losses, whole.losses, atol=1e-3)
    assert _fit(tmp_path, pairs, attrs, "--max-response-tokens", "-1") == 2
    assert "`--max-response-tokens` must be >= 0 (0 scores whole responses), got -1" in capsys.readouterr().err


def test_generate_rejects_profile_from_another_model(files, capsys, tiny_lm, tiny_tokenizer):
    tmp_path, pairs, attrs = files
    assert _fit(tmp_path, pairs, attrs, "--top-m", "1") == 0
    capsys.readouterr()
    other = tmp_path / "other"
    tiny_lm.save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert main(["generate", "--method", "drift", "--profile", str(tmp_path / "p.json"), "--model", str(other),
                 "--prompt", "once upon a time", "--max-new-tokens", "2"]) == 2
    assert "fitted with steering model" in capsys.readouterr().err
    from tests.conftest import STORIES

    assert main(["generate", "--method", "drift", "--profile", str(tmp_path / "p.json"), "--model", str(STORIES),
                 "--prompt", "Once", "--param", "beta=0"]) == 2
    assert "`beta` must be a finite number > 0" in capsys.readouterr().err


def test_fit_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--eval-pairs" in capsys.readouterr().out


def test_generate_with_a_separate_steering_model(files, capsys):
    """--steer-model loads a second model under the key "steer"; the profile check runs against it."""
    from tests.conftest import STORIES

    tmp_path, pairs, attrs = files
    assert _fit(tmp_path, pairs, attrs, "--top-m", "2") == 0
    capsys.readouterr()
    assert main(["generate", "--method", "drift", "--profile", str(tmp_path / "p.json"), "--model", str(STORIES),
                 "--steer-model", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "6",
                 "--json"]) == 0
    gen = json.loads(capsys.readouterr().out.strip())
    assert len(gen["token_ids"]) == 6
    # one forward per step for the LLM view and one for all steering views (the last token is not fed)
    assert gen["stats"]["batch_forwards"] == 2 * 5


@pytest.mark.slow
def test_fit_and_generate_on_smollm2(tmp_path, smollm2, capsys):
    """The embedded GGUF model end to end: fit on two pairs, evaluate, steer its own generation."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "What is photosynthesis?", "chosen": "Imagine leaves throwing a sunny party where light and "
         "water dance together to cook up sugar!", "rejected": "Photosynthesis is the process by which plants "
         "convert light energy, water and carbon dioxide into glucose and oxygen."},
        {"prompt": "How can I save money?", "chosen": "Ha, the eternal quest! Be a coupon-wielding superhero.",
         "rejected": "Plan a budget, compare unit prices and buy store brands."}]) + "\n")
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps({"mode": "replace", "attributes": {
        "humorous": "You are an assistant with a sense of humour who likes to make people laugh.",
        "formal": "You are an assistant who writes in a formal, professional register."}}))
    out = tmp_path / "p.json"
    assert main(["fit", "drift", "--pairs", str(pairs), "--model", "smollm2", "--out", str(out), "--attributes",
                 str(attrs), "--max-response-tokens", "24", "--eval-pairs", str(pairs), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy"] is not None and 0 <= summary["accuracy"] <= 1
    assert main(["generate", "--method", "drift", "--profile", str(out), "--model", "smollm2",
                 "--prompt", "How do I make friends in a new city?", "--max-new-tokens", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip())["token_ids"]) == 8
