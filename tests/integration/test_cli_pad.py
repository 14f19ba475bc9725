"""``personalign train pad`` and ``personalign generate --method pad|args|best_of_n`` end to end (stories260k)."""

from __future__ import annotations

import json

import pytest

from personalign.cli.main import main
from tests.conftest import STORIES

PAIRS = [
    {"prompt": "Once upon a time", "chosen": "there was a happy cat who loved to play.",
     "rejected": "there was a sad dog who cried all day.", "preference": "a happy story"},
    {"prompt": "Lily went to the park", "chosen": "and she smiled at the sun.",
     "rejected": "and she fell and was sad.", "preference": "a happy story"},
    {"prompt": "Tom had a toy", "chosen": "but it broke and he cried.",
     "rejected": "and he played with his friend.", "preference": "a sad story"},
    {"prompt": "The bird sang", "chosen": "until the storm came and it was gone.",
     "rejected": "a happy song for everyone.", "preference": "a sad story"},
]


@pytest.fixture()
def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    return p


def test_train_then_generate(pairs_file, tmp_path, capsys, stories):
    out = tmp_path / "ckpt"
    rc = main(["train", "pad", "--pairs", str(pairs_file), "--model", str(STORIES), "--out", str(out),
               "--epochs", "1", "--head-epochs", "2", "--eval-fraction", "0.25", "--quiet", "--batch-size", "2"])
    assert rc == 0
    assert (out / "adapter").is_dir() and (out / "head.safetensors").is_file()
    meta = json.loads((out / "persrm.json").read_text())
    assert meta["config"]["backbone"] == str(STORIES) and meta["config"]["fingerprint"]
    assert len(meta["history"]["stage1"]) == 1 and len(meta["history"]["stage2"]) == 2
    capsys.readouterr()
    for extra in (["--method", "pad"], ["--method", "pad", "--param", "mode=released"],
                  ["--method", "best_of_n", "--param", "n=2"], ["--method", "args", "--param", "k=3"]):
        rc = main(["generate", "--model", str(STORIES), "--persrm", str(out), "--preference", "a happy story",
                   "--prompt", "Once upon a time", "--max-new-tokens", "6", "--no-chat-template", "--json", *extra])
        assert rc == 0, extra
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rec["method"] == extra[1] and len(rec["token_ids"]) >= 1


def test_cli_bad_input(pairs_file, tmp_path, capsys, stories):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({**PAIRS[1], "preference": ""}) + "\n")
    assert main(["train", "pad", "--pairs", str(bad), "--model", str(STORIES), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2: `preference` must be a non-empty string" in capsys.readouterr().err
    assert main(["generate", "--model", str(STORIES), "--method", "pad", "--preference", "happy",
                 "--prompt", "Once", "--no-chat-template"]) == 2
    err = capsys.readouterr().err
    assert "it needs a PersRM" in err and "`--persrm DIR`" in err
    assert main(["generate", "--model", str(STORIES), "--method", "pad", "--persrm", str(tmp_path),
                 "--preference", "happy", "--prompt", "Once", "--param", "k=0"]) == 2
    assert "`k` must be an integer >= 1" in capsys.readouterr().err
    assert main(["generate", "--model", str(STORIES), "--method", "best_of_n", "--param", "n=0",
                 "--prompt", "Once", "--reward-model", str(tmp_path)]) == 2
    assert "`n` must be an integer >= 1" in capsys.readouterr().err


def test_generate_with_a_reward_function_file(tmp_path, capsys, stories):
    """`--reward-function path/file.py:name`: args and best_of_n score with a Python function of
    (prompt, response, preference); the CLI's tokens equal the library's with the same function."""
    from personalign.decoding.loop import generate
    from personalign.methods.args import ARGSConfig, ARGSMethod
    from personalign.types import Request
    from personalign.views import HFBackend
    from personalign.views.loading import load_model
    from personalign.views.reward import FunctionScorer, import_object

    f = tmp_path / "rewards.py"
    f.write_text("def named_words(prompt, response, preference):\n"
                 "    return float(sum(w.strip('.,') in preference.split() for w in response.split()))\n")
    target = f"{f}:named_words"
    rc = main(["generate", "--model", str(STORIES), "--method", "args", "--reward-function", target,
               "--preference", "happy cat sun", "--prompt", "Once upon a time", "--param", "k=5", "--param", "w=2",
               "--max-new-tokens", "8", "--no-chat-template", "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_model(str(STORIES))
    lib = generate(ARGSMethod(ARGSConfig(k=5, w=2.0), scorer=FunctionScorer(import_object(target))),
                   [Request(prompt="Once upon a time", preference="happy cat sun")], HFBackend(m.model, m.tokenizer),
                   max_new_tokens=8, chat_template=False)[0]
    assert rec["token_ids"] == lib.token_ids
    rc = main(["generate", "--model", str(STORIES), "--method", "best_of_n", "--reward-function", target,
               "--preference", "happy cat sun", "--prompt", "Once upon a time", "--param", "n=2",
               "--max-new-tokens", "6", "--no-chat-template", "--json"])
    assert rc == 0
    assert main(["generate", "--model", str(STORIES), "--method", "args", "--reward-function", f"{f}:nope",
                 "--preference", "x", "--prompt", "Once", "--no-chat-template"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
