"""benchmarks/psoups_pairs.py: P-SOUPS pairing (chosen under X, rejected under X's opposite) and its files
read back by the library's own pair loader."""

from __future__ import annotations

import importlib.util

import pytest

from personalign.eval.datasets import load_pairs
from tests.conftest import REPO


@pytest.fixture(scope="module")
def psoups():
    spec = importlib.util.spec_from_file_location("psoups_pairs", REPO / "benchmarks" / "psoups_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PREFS = {"P1A": "simple", "P1B": "expert", "P2A": "concise", "P2B": "informative"}
PROMPTS = ["what is rain?", "why do cats purr?"]
ANSWERS = {
    "P1A": ["water falls", "they are happy"],
    "P1B": ["precipitation of condensed vapour", "laryngeal oscillation"],
    "P2A": ["rain", "happy"],
    "P2B": ["rain is water falling from clouds", "happy"],  # prompt 1: same as P2A -> no pair
}


def test_opposite(psoups):
    assert [psoups.opposite(p) for p in ("P1A", "P1B", "P3A", "X12B")] == ["P1B", "P1A", "P3B", "X12A"]
    with pytest.raises(ValueError, match="must end in 'A' or 'B'"):
        psoups.opposite("P1C")


def test_pairs_chosen_under_x_rejected_under_opposite(psoups):
    pairs = psoups.build_pairs(PROMPTS, ANSWERS, PREFS)
    # 4 preferences x 2 prompts, minus the two P2A/P2B pairs of prompt 1 whose answers are identical
    assert len(pairs) == 6
    for p in pairs:
        i = PROMPTS.index(p.prompt)
        assert p.chosen == ANSWERS[p.user_id][i] and p.rejected == ANSWERS[psoups.opposite(p.user_id)][i]
        assert p.preference == p.user_text == PREFS[p.user_id]
    assert [p.user_id for p in pairs] == ["P1A", "P1A", "P1B", "P1B", "P2A", "P2B"]


def test_missing_opposite_or_length_mismatch_is_an_error(psoups):
    with pytest.raises(ValueError, match="lacks preference 'P1B'"):
        psoups.build_pairs(PROMPTS, {"P1A": ANSWERS["P1A"]}, {"P1A": "simple"})
    with pytest.raises(ValueError, match="has 1 answers for 2 prompts"):
        psoups.build_pairs(PROMPTS, {**ANSWERS, "P1B": ["x"]}, PREFS)


def test_written_files_round_trip_through_the_loader(psoups, tmp_path):
    pairs = psoups.build_pairs(PROMPTS, ANSWERS, PREFS)
    counts = psoups.write_pairs(tmp_path, pairs)
    assert counts == {"pairs.jsonl": 6, "pairs_P1A.jsonl": 2, "pairs_P1B.jsonl": 2, "pairs_P2A.jsonl": 1,
                      "pairs_P2B.jsonl": 1}
    back = load_pairs(tmp_path / "pairs.jsonl")
    assert back == pairs  # origin is not compared; every field is
    assert load_pairs(tmp_path / "pairs_P1B.jsonl") == [p for p in pairs if p.user_id == "P1B"]
