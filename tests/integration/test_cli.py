"""The CLI contract: ``personalign generate ... --json`` shape, errors as one line and exit 2, bench."""

from __future__ import annotations

import json

import pytest

from personalign.cli.main import main
from tests.conftest import STORIES


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "bench", "demo"):
        assert cmd in out


def test_generate_help_shows_contract(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--gguf-file", "--prompt", "--preference", "--method", "--param", "--max-new-tokens",
                 "--temperature", "--top-k", "--top-p", "--seed", "--no-chat-template", "--json"):
        assert flag in out


def test_generate_json_on_real_model(capsys, stories):
    rc, out, _ = run_cli(capsys, "generate", "--model", str(STORIES), "--prompt", "Once upon a time",
                         "--prompt", "Tom had a dog", "--max-new-tokens", "8", "--json")
    assert rc == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 2
    for row, prompt in zip(rows, ["Once upon a time", "Tom had a dog"]):
        assert {"prompt", "method", "text", "prompt_token_ids", "token_ids"} <= set(row)
        assert row["prompt"] == prompt and row["method"] == "base"
        assert row["prompt_token_ids"] == stories.tokenizer(prompt)["input_ids"]
        assert len(row["token_ids"]) == 8
        assert row["text"] == stories.tokenizer.decode(row["token_ids"], skip_special_tokens=True)


def test_generate_streams_text_without_json(capsys, stories):
    rc, out, _ = run_cli(capsys, "generate", "--model", str(STORIES), "--prompt", "Once upon a time",
                         "--max-new-tokens", "10", "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    assert rc == 0 and len(out.strip()) > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "bse"], "unknown method 'bse'; valid methods:"),
        (["--max-new-tokens", "0"], "`--max-new-tokens` must be > 0"),
        (["--temperature", "-1"], "`temperature` must be a finite number >= 0"),
        (["--top-p", "0"], "`top_p` must lie in (0, 1]"),
        (["--top-k", "-2"], "`top_k` must be an integer >= 0"),
        (["--prompt", ""], "`prompt` must be a non-empty string"),
        (["--method", "preference_prompting"], "`preference` must be a non-empty text"),
        (["--param", "oops"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, stories, args, message):
    base = ["generate", "--model", str(STORIES), "--prompt", "Once"]
    rc, _, err = run_cli(capsys, *base, *args)
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_missing_model_path(capsys):
    rc, _, err = run_cli(capsys, "generate", "--model", "./no/such/model", "--prompt", "hi")
    assert rc == 2 and "`model` path './no/such/model' does not exist" in err


def test_prompt_longer_than_context(capsys, stories):
    rc, _, err = run_cli(capsys, "generate", "--model", str(STORIES), "--prompt", "Once upon a time " * 200)
    assert rc == 2 and "the model's context is 512 tokens" in err


def test_bench_json_rows_and_ratio(capsys, stories):
    rc, out, _ = run_cli(capsys, "bench", "--model", str(STORIES), "--methods", "base,preference_prompting",
                         "--batch-size", "2", "--max-new-tokens", "4", "--repeats", "1", "--json")
    assert rc == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["method"] for r in rows] == ["generate", "base", "preference_prompting"]
    assert rows[0]["time_ratio"] == 1.0
    for r in rows:
        assert r["ms_per_token"] > 0 and r["batch_size"] == 2 and r["environment"]["torch"]


def test_a_missing_reward_model_path_is_one_clear_line(capsys, tmp_path, tiny_lm, tiny_tokenizer):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "m"), "--method", "args", "--reward-model",
                         str(tmp_path / "no-such-rm"), "--prompt", "the cat")
    assert rc == 2 and "`reward_model` path" in err and "does not exist" in err and "Repo id" not in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("personalign")
