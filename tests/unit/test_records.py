"""The shared pair-record reader and the readers built on it (Drift, P-DPO, PersRM, eval)."""

from __future__ import annotations

import json

import pytest

from personalign.eval import datasets
from personalign.personas import drift
from personalign.records import DatasetError, Pair, PairWording, pair_fields, read_pair_records
from personalign.training.pdpo import data as pdpo_data
from personalign.training.persrm import train as persrm_train

RECS = [{"prompt": "q1", "chosen": "a", "rejected": "b", "user_id": 7, "preference": "short", "group": "x"},
        {"prompt": "q2", "chosen": "c", "rejected": "d", "user_id": "u", "preference": "long", "group": 2}]


def _jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def _array(path, recs):
    path.write_text(json.dumps(recs, indent=1))
    return path


READERS = {
    "drift": lambda p: drift.fit_pairs(p)[0],
    "pdpo": lambda p: pdpo_data.read_training_pairs(p),
    "persrm": persrm_train.read_pairs,
    "eval": datasets.load_pairs,
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_reader_reads_a_json_array_as_json_lines(tmp_path, name):
    recs = [{k: v for k, v in r.items() if name != "pdpo" or k != "preference"} for r in RECS]
    lines = READERS[name](_jsonl(tmp_path / "p.jsonl", recs))
    array = READERS[name](_array(tmp_path / "p.json", recs))
    assert lines == array and len(lines) == 2
    assert all(isinstance(p, Pair) for p in lines)
    assert [(p.prompt, p.chosen, p.rejected) for p in lines] == [("q1", "a", "b"), ("q2", "c", "d")]


def test_optional_fields_and_integer_ids(tmp_path):
    (a, b) = pdpo_data.read_training_pairs(_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if k != "preference"}
                                                                for r in RECS]))
    assert (a.user_id, a.group, b.user_id, b.group) == ("7", "x", "u", "2")
    (c, d) = datasets.load_pairs(_jsonl(tmp_path / "e.jsonl", RECS))
    assert (c.user_id, c.preference, d.preference) == ("7", "short", "long")
    assert [r.preference for r in persrm_train.read_pairs(tmp_path / "e.jsonl")] == ["short", "long"]
    # a pair round-trips through its record
    assert pdpo_data.PreferencePair(**pair_fields(a.to_dict(), "x", optional=("user_id", "user_text", "group"))) == a
    assert c.group == "x"
    assert datasets.PreferencePair(**pair_fields(c.to_dict(), "x", optional=("user_id", "user_text", "preference",
                                                                             "group"))) == c
    assert "user_text" not in c.to_dict() and pdpo_data.PreferencePair("p", "a", "b").to_dict() == {"prompt": "p", "chosen": "a",
                                                                                          "rejected": "b"}


def test_pair_fields_errors_name_line_and_field(tmp_path):
    with pytest.raises(DatasetError, match=r"f:3: field `user_id` must be a string, got true"):
        pair_fields({"prompt": "p", "chosen": "a", "rejected": "b", "user_id": True}, "f:3")
    with pytest.raises(DatasetError, match=r"f:1: unknown field\(s\) \['score'\]"):
        pair_fields({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "f:1", strict=True)
    assert pair_fields({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "f:1")["user_id"] is None
    with pytest.raises(DatasetError, match=r"f:2: a pair record must be a JSON object with prompt, chosen, rejected"):
        pair_fields(["p", "a", "b"], "f:2")
    wording = PairWording(missing="no `{key}` here.")
    with pytest.raises(DatasetError, match=r"f:4: no `rejected` here\."):
        pair_fields({"prompt": "p", "chosen": "a"}, "f:4", wording=wording)
    with pytest.raises(DatasetError, match="does not exist"):
        list(read_pair_records(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="holds no pairs"):
        list(read_pair_records(_array(tmp_path / "empty.json", [])))
    bad = _array(tmp_path / "bad.json", [RECS[0], {"prompt": "p", "chosen": "", "rejected": "b"}])
    with pytest.raises(DatasetError, match=r"bad.json:10: field `chosen` must be a non-empty string, got ''"):
        list(read_pair_records(bad))
