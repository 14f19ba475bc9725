"""Loaders on good and broken files, pair checks, and layout round trips."""

from __future__ import annotations

import gzip
import json

import pytest

from personalign.eval.datasets import (
    DatasetError,
    PreferencePair,
    check_pairs,
    convert,
    dsp_to_pairs,
    load_pairs,
    load_prompts,
    pairs_to_dsp,
    split_hh_dialogue,
)
from tests.conftest import SHARED


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_prompts_json_array_and_jsonl(tmp_path):
    a = _write(tmp_path / "p.json", json.dumps([{"id": "x", "prompt": "Hi?"}, {"index": 3, "question": "Why?"}, "Bare"]))
    recs = load_prompts(a)
    assert [(r.id, r.prompt) for r in recs] == [("x", "Hi?"), ("3", "Why?"), ("2", "Bare")]
    b = _write(tmp_path / "p.jsonl", '{"prompt": "one"}\n\n{"prompt": "two"}\n')
    assert [r.prompt for r in load_prompts(b)] == ["one", "two"]
    assert len(load_prompts(b, limit=1)) == 1


@pytest.mark.parametrize(("text", "where", "what"), [
    ('[\n {"id": 1, "prompt": "ok"},\n {"id": 2, "prompt": ""}\n]', ":3:", "`prompt` must be a non-empty string"),
    ('[\n {"id": 1, "prompt": "ok"},\n {"id": 2}\n]', ":3:", "missing field `prompt`"),
    ('[\n {"id": 1, "prompt": "ok"},\n {"id": 1, "prompt": "again"}\n]', ":3:", "duplicate `id`"),
    ('[\n {"id": 1, "prompt": "ok"}\n {"id": 2, "prompt": "x"}\n]', ":3:", "expected ','"),
    ('[\n {"id": 1, "prompt": "ok"},\n {"id": [1], "prompt": "x"}]', ":3:", "field `id`"),
    ('[\n {"id": 1, "prompt": "ok"},\n {"id": 2, "prompt": "x"', ":3:", "invalid JSON"),
])
def test_broken_prompt_files_name_file_line_field(tmp_path, text, where, what):
    f = _write(tmp_path / "bad.json", text)
    with pytest.raises(DatasetError) as e:
        load_prompts(f)
    assert str(f) + where in str(e.value) and what in str(e.value)


def test_trl_pairs_good_and_broken(tmp_path):
    good = [{"prompt": "q", "chosen": "a", "rejected": "b", "user_id": 7, "preference": "short"},
            {"prompt": "q2", "chosen": "c", "rejected": "d"}]
    f = _write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in good) + "\n")
    pairs = load_pairs(f)
    assert pairs[0] == PreferencePair("q", "a", "b", user_id="7", preference="short")
    assert pairs[0].origin == f"{f}:1" and pairs[1].user_id is None
    bad = _write(tmp_path / "bad.jsonl", json.dumps(good[0]) + "\n" + '{"prompt": "q", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(DatasetError, match=rf"{bad}:2: field `rejected` must be a non-empty string"):
        load_pairs(bad)
    errs: list[str] = []
    assert len(load_pairs(bad, on_error="skip", errors=errs)) == 1 and ":2:" in errs[0]
    bad2 = _write(tmp_path / "bad2.jsonl", json.dumps(good[0]) + "\n" + '{"prompt": "q", "chosen": "a", "rejected": "b", "user_text": 5}\n')
    with pytest.raises(DatasetError, match=r":2: field `user_text` must be a string"):
        load_pairs(bad2)
    with pytest.raises(DatasetError, match=r":1: invalid JSON"):
        load_pairs(_write(tmp_path / "b3.jsonl", '{"prompt": "q",\n'))
    with pytest.raises(DatasetError, match="not a preference pair"):
        load_pairs(_write(tmp_path / "b4.jsonl", '{"prompt": "q"}\n'))


def test_duplicates_contradictions_degenerate(tmp_path):
    recs = [{"prompt": "q", "chosen": "a", "rejected": "b", "user_id": "u"},
            {"prompt": "q", "chosen": "a", "rejected": "b", "user_id": "u"},   # duplicate of line 1
            {"prompt": "q", "chosen": "b", "rejected": "a", "user_id": "u"},   # contradicts 1-2
            {"prompt": "q", "chosen": "b", "rejected": "a", "user_id": "v"},   # another user: fine
            {"prompt": "q", "chosen": "z", "rejected": "z"}]                   # degenerate
    f = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in recs))
    rep = check_pairs(load_pairs(f))
    assert rep.duplicates == [[f"{f}:1", f"{f}:2"]]
    assert rep.contradictions == [[f"{f}:1", f"{f}:2", f"{f}:3"]] or rep.contradictions == [[f"{f}:3", f"{f}:1", f"{f}:2"]]
    assert rep.degenerate == [f"{f}:5"] and not rep.ok
    assert "1 duplicated, 1 contradictory, 1 with chosen == rejected" in rep.summary()


DSP_REC = {"query": "Q?", "responses": {"academy": "A", "business": "B", "entertainment": "E", "literature": "L",
                                        "normal": "N"}}


def test_dsp_pairs_and_round_trip(tmp_path):
    pairs = dsp_to_pairs([DSP_REC])
    assert len(pairs) == 16  # 4 users x 4 other responses
    assert {(p.chosen, p.rejected) for p in pairs if p.user_id == "academy"} == {("A", x) for x in "BELN"}
    assert pairs_to_dsp(pairs) == [DSP_REC]
    src = _write(tmp_path / "dsp.json", json.dumps([DSP_REC]))
    n, rep = convert(src, tmp_path / "trl.jsonl", to="trl")
    assert n == 16 and rep.ok
    n2, _ = convert(tmp_path / "trl.jsonl", tmp_path / "back.json", to="dsp")
    assert n2 == 1 and json.loads((tmp_path / "back.json").read_text()) == [DSP_REC]
    broken = dict(DSP_REC, responses={**DSP_REC["responses"], "normal": ""})
    with pytest.raises(DatasetError, match=r"dsp2.json:1: field `responses.normal`"):
        load_pairs(_write(tmp_path / "dsp2.json", json.dumps([broken])))


def test_hh_layouts_and_round_trip(tmp_path):
    hist = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    rec = {"chosen": hist + " Why did the chicken cross the road?", "rejected": hist + " No."}
    assert split_hh_dialogue(rec["chosen"], rec["rejected"]) == (hist, "Why did the chicken cross the road?", "No.")
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps(rec) + "\n")
    (p,) = load_pairs(f)
    assert (p.prompt, p.chosen, p.rejected) == (hist, "Why did the chicken cross the road?", "No.")
    # the {"text": [..], "score": [..]} variant: the higher score is chosen
    t = _write(tmp_path / "t.json", json.dumps([{"text": [rec["rejected"], rec["chosen"]], "score": [0.0, 1.0]}]))
    assert load_pairs(t)[0] == p
    convert(f, tmp_path / "trl.jsonl", to="trl")
    convert(tmp_path / "trl.jsonl", tmp_path / "hh2.jsonl", to="hh")
    assert load_pairs(tmp_path / "hh2.jsonl")[0] == p
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: field `chosen`/`rejected`"):
        load_pairs(_write(tmp_path / "bad.jsonl", json.dumps({"chosen": "x", "rejected": "y"})))


def test_convert_pairs_to_prompts_and_errors(tmp_path):
    f = _write(tmp_path / "p.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
               '{"prompt": "q", "chosen": "c", "rejected": "d"}\n{"prompt": "r", "chosen": "a", "rejected": "b"}\n')
    n, _ = convert(f, tmp_path / "prompts.jsonl", to="prompts")
    assert n == 2 and [r.prompt for r in load_prompts(tmp_path / "prompts.jsonl")] == ["q", "r"]
    with pytest.raises(ValueError, match="cannot become `trl`"):
        convert(tmp_path / "prompts.jsonl", tmp_path / "x.jsonl", to="trl")
    with pytest.raises(ValueError, match="user_id"):
        convert(f, tmp_path / "x.json", to="dsp")


def test_data_cli(tmp_path, capsys):
    from personalign.cli.main import main

    src = _write(tmp_path / "dsp.json", json.dumps([DSP_REC]))
    assert main(["data", "convert", str(src), str(tmp_path / "o.jsonl"), "--to", "trl", "--users", "academy"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 4
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "q", "chosen": "a"}\n')
    assert main(["data", "check", str(bad)]) == 2
    assert f"{bad}:1: missing field `rejected`" in capsys.readouterr().err
    mixed = _write(tmp_path / "mixed.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    assert main(["data", "convert", str(mixed), str(tmp_path / "m.jsonl"), "--to", "hh"]) == 2
    assert main(["data", "convert", str(mixed), str(tmp_path / "m.jsonl"), "--to", "hh", "--skip-invalid"]) == 0
    assert f"skipped: {mixed}:2: missing field `rejected`" in capsys.readouterr().err
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data absent")
def test_shared_files_load():
    assert len(load_prompts(SHARED / "data/prompts/koala_eval_50.json")) == 50
    pairs = load_pairs(SHARED / "data/dsp/helpful.test.json")
    assert len(pairs) == 2352 and pairs[0].prompt.endswith("Assistant:")


def test_convert_skip_invalid_drops_degenerate_pairs_and_the_report_names_a_line_once(tmp_path):
    """One DSP record whose business and literature replies are the same text: the academy user's pairs
    A ≻ B and A ≻ L are one pair twice from one line (the report names that line once, ×2), and the
    business user's B ≻ L is no preference at all (written without ``--skip-invalid``, skipped and
    listed with it)."""
    from personalign.eval.datasets import convert

    rec = {"query": "Q?", "responses": {"academy": "A", "business": "B", "entertainment": "E", "literature": "B",
                                        "normal": "N"}}
    src = _write(tmp_path / "d.json", json.dumps([rec]))
    n_all, rep_all = convert(src, tmp_path / "all.jsonl", to="trl", layout="dsp")
    assert len(rep_all.degenerate) == 2  # business: B ≻ L, literature: L ≻ B
    errors: list[str] = []
    n, rep = convert(src, tmp_path / "kept.jsonl", to="trl", layout="dsp", on_error="skip", errors=errors)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert n == n_all - 2 == len(kept) and all(k["chosen"] != k["rejected"] for k in kept)
    assert len(errors) == 2 and all("same text" in e for e in errors)
    assert not rep.degenerate and rep.duplicates
    line = [g for g in rep.summary().splitlines() if g.startswith("  duplicate (user academy):")]
    assert line and all(part.count(":1") == 1 for part in line) and "(×2)" in line[0], line
