"""``personalign train pdpo|dpo|prm`` and ``personalign generate --method pdpo`` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from personalign.cli.main import main
from personalign.training.pdpo.data import PreferencePair, write_pairs
from tests.conftest import make_tiny_lm, make_tokenizer

LONG, SHORT = "the cat is very happy and the dog is very sad", "the cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdpo_cli")
    tok = make_tokenizer()
    make_tiny_lm(len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    pairs = []
    for i in range(8):
        u = f"u{i % 2}"
        c, r = (LONG, SHORT) if u == "u0" else (SHORT, LONG)
        pairs.append(PreferencePair(prompt="tell me a story", chosen=c, rejected=r, user_id=u,
                                    user_text="she likes the sea" if u == "u1" else None))
    write_pairs(pairs, d / "pairs.jsonl")
    write_pairs(pairs[:2] + [PreferencePair(prompt="a story", chosen=LONG, rejected=SHORT, user_id="new")],
                d / "eval.jsonl")
    return d


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def train_args(files, objective="pdpo", out="ck", *extra):
    return ["train", objective, "--pairs", str(files / "pairs.jsonl"), "--eval-pairs", str(files / "eval.jsonl"),
            "--model", str(files / "model"), "--out", str(files / out), "--batch-size", "4", "--epochs", "1",
            "--no-progress", *extra]


def test_train_pdpo_then_generate(files, capsys, caplog):
    rc, out, err = run(train_args(files, "pdpo", "ck", "--user-model", "cluster", "--clusters", "2",
                                  "--user-tokens", "2", "--alpha", "0.5", "--beta", "0.5", "--lr", "0.01"), capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["n_top"] == 2 and summary["n_generic"] == 1 and 0 <= summary["accuracy_top"] <= 1
    record = json.loads((files / "ck" / "config.json").read_text())
    assert record["train"]["user_model"] == "cluster" and record["train"]["clusters"] == 2
    assert record["base_model"]["name"] == str((files / "model").resolve())
    # the base model comes from the checkpoint: no --model needed
    rc, out, err = run(["generate", "--method", "pdpo", "--checkpoint", str(files / "ck"), "--user", "u1",
                        "--prompt", "tell me a story", "--max-new-tokens", "4", "--no-chat-template", "--json"], capsys)
    assert rc == 0, err
    row = json.loads(out)
    assert row["stats"]["user_row"] == 2 and len(row["token_ids"]) <= 4
    rc, out, err = run(["generate", "--method", "pdpo", "--checkpoint", str(files / "ck"), "--user", "stranger",
                        "--user-text", "she likes the sea", "--prompt", "tell me a story", "--max-new-tokens", "4",
                        "--no-chat-template", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["stats"]["user_row"] == 0
    assert any("'stranger' is unknown" in r.message for r in caplog.records)  # logged


def test_train_dpo_baseline_and_prm(files, capsys):
    rc, out, err = run(train_args(files, "dpo", "ck_dpo"), capsys)
    assert rc == 0, err
    record = json.loads((files / "ck_dpo" / "config.json").read_text())
    assert (record["train"]["user_model"], record["train"]["user_tokens"], record["train"]["alpha"]) == ("uniform", 0, 1.0)
    rc, out, err = run(train_args(files, "pdpo", "ck_ipo", "--user-tokens", "1", "--loss", "ipo"), capsys)
    assert rc == 0, err
    assert json.loads((files / "ck_ipo" / "config.json").read_text())["objective"] == "pipo"
    rc, out, err = run(train_args(files, "prm", "ck_prm", "--user-tokens", "1", "--head", "linear"), capsys)
    assert rc == 2 and "`head` 'linear' takes no `user_text`" in err  # these users have text
    rc, out, err = run(train_args(files, "prm", "ck_prm", "--user-tokens", "2", "--head", "soft_prompt"), capsys)
    assert rc == 0, err
    assert (files / "ck_prm" / "value_head.safetensors").is_file()
    assert json.loads((files / "ck_prm" / "config.json").read_text())["objective"] == "prm"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--alpha", "1.5"], "`alpha` must be a number in [0, 1]"),
        (["--alpha", "-0.5"], "`alpha` must be a number in [0, 1]"),
        (["--beta", "0"], "`beta` must be a finite number > 0"),
        (["--user-model", "individual", "--user-tokens", "0"], "`user_tokens` (T_u) must be >= 1"),
        (["--user-model", "cluster", "--clusters", "0"], "`clusters` must be an integer >= 1"),
    ],
)
def test_train_bad_flags(files, capsys, extra, match):
    rc, _, err = run(train_args(files, "pdpo", "bad", *extra), capsys)
    assert rc == 2 and match in err and "Traceback" not in err
    assert not (files / "bad").exists()


def test_train_unknown_user_and_bad_files(files, capsys, tmp_path):
    (tmp_path / "users.txt").write_text("u0\n")
    rc, _, err = run(train_args(files, "pdpo", "bad", "--users", str(tmp_path / "users.txt")), capsys)
    assert rc == 2 and "`user_id` 'u1' is not in the user index" in err
    rc, _, err = run(["train", "pdpo", "--pairs", str(tmp_path / "none.jsonl"), "--model", str(files / "model"),
                      "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err


def test_generate_mismatched_base_model(files, capsys, tmp_path):
    if not (files / "ck" / "config.json").is_file():
        pytest.skip("needs the checkpoint of test_train_pdpo_then_generate")
    tok = make_tokenizer()
    make_tiny_lm(len(tok), hidden=16).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    rc, _, err = run(["generate", "--method", "pdpo", "--checkpoint", str(files / "ck"), "--model",
                      str(tmp_path / "other"), "--user", "u1", "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert rc == 2 and "was trained on base model" in err
    rc, _, err = run(["generate", "--method", "pdpo", "--model", str(files / "model"), "--prompt", "hi"], capsys)
    assert rc == 2 and "it needs a P-DPO checkpoint" in err and "`--checkpoint DIR`" in err
    rc, _, err = run(["generate", "--method", "pdpo", "--checkpoint", str(tmp_path), "--prompt", "hi"], capsys)
    assert rc == 2 and "is not a P-DPO checkpoint" in err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "pdpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--user-model" in out and "--alpha" in out and "--user-tokens" in out and "--clusters" in out
    assert main(["train"]) == 2
