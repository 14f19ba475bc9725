"""``personalign generate --n`` and ``personalign feedback``: alternatives, then a choice folded into a
Drift profile without a server, equal to ``DriftProfile.add_choice`` through the Python API."""

from __future__ import annotations

import json

import torch

from personalign.cli.main import main
from personalign.personas.drift import DriftProfile
from personalign.personas.identity import steer_identity
from personalign.records import choice_pairs
from personalign.views import HFBackend
from tests.conftest import STORIES

PROMPT = "Once upon a time"


def _generate(capsys, *extra: str) -> list[dict]:
    assert main(["generate", "--model", str(STORIES), "--prompt", PROMPT, "--prompt", "The dog", "--n", "3",
                 "--temperature", "1.0", "--seed", "4", "--max-new-tokens", "10", "--json", *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_generate_n_then_feedback(stories, tmp_path, capsys):
    out = _generate(capsys)
    assert len(out) == 2 and [o["prompt"] for o in out] == [PROMPT, "The dog"]
    texts = [c["text"] for c in out[0]["choices"]]
    assert [c["index"] for c in out[0]["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert _generate(capsys) == out  # --seed reproduces every choice
    comp = tmp_path / "choices.jsonl"
    comp.write_text("\n".join(json.dumps(o) for o in out) + "\n")

    prof_path = tmp_path / "user.json"
    assert main(["feedback", "--model", str(STORIES), "--profile", str(prof_path), "--completion", str(comp),
                 "--chosen-index", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    pairs = choice_pairs(PROMPT, texts, 2)
    assert summary["created"] and summary["pairs_added"] == summary["num_pairs"] == len(pairs)

    be = HFBackend(stories.model, stories.tokenizer)
    want = DriftProfile.empty(steer_identity(stories.model, stories.tokenizer))
    assert want.add_choice(be, PROMPT, texts, 2) == len(pairs)
    got = DriftProfile.load(prof_path)
    assert got.pair_ids == [p.pair_id for p in pairs]
    torch.testing.assert_close(got.wins, want.wins, rtol=0, atol=0)  # the same scoring on the same model
    torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=0)

    # a second choice updates the profile; the profile decodes
    second = [c["text"] for c in out[1]["choices"]]
    assert main(["feedback", "--model", str(STORIES), "--profile", str(prof_path), "--completion", str(comp),
                 "--line", "2", "--chosen-index", "0", "--json"]) == 0
    s2 = json.loads(capsys.readouterr().out)
    assert not s2["created"] and s2["num_pairs"] == len(pairs) + len(choice_pairs("The dog", second, 0))
    assert main(["generate", "--method", "drift", "--profile", str(prof_path), "--model", str(STORIES),
                 "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "drift"


def test_feedback_bad_input_names_the_field_and_writes_nothing(stories, tmp_path, capsys):
    prof = tmp_path / "p.json"
    cases = [
        (["--prompt", PROMPT, "--choice", "a happy dog", "--choice", "a sad cat", "--chosen-index", "2"],
         "`chosen_index` must be an integer in [0, 1]"),
        (["--prompt", PROMPT, "--choice", "only one", "--chosen-index", "0"], "at least two alternatives"),
        (["--prompt", PROMPT, "--choice", "same", "--choice", "same", "--chosen-index", "0"], "same text"),
        (["--chosen-index", "0"], "give `--completion FILE.jsonl`"),
    ]
    for extra, needle in cases:
        assert main(["feedback", "--model", str(STORIES), "--profile", str(prof), *extra]) == 2
        assert needle in capsys.readouterr().err
        assert not prof.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "text": "not choices"}\n')
    assert main(["feedback", "--model", str(STORIES), "--profile", str(prof), "--completion", str(bad),
                 "--chosen-index", "0"]) == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err and not prof.exists()
    assert main(["generate", "--model", str(STORIES), "--prompt", PROMPT, "--n", "0"]) == 2
    assert "`--n` must be an integer >= 1" in capsys.readouterr().err
