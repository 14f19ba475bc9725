"""Golden checks of the evaluation metrics (values derived by hand in each docstring)."""

from __future__ import annotations

import math

import pytest

from personalign.eval.metrics import (
    METRICS,
    count_syllables,
    diversity,
    flesch_kincaid_grade,
    mean_ci,
    preference_accuracy,
    split_sentences,
)
from personalign.views.reward import FunctionScorer


def test_diversity_golden():
    """"a b a b a": 2-grams ab ba ab ba -> 2/4; 3-grams aba bab aba -> 2/3; 4-grams abab baba -> 2/2.
    diversity = 1/2 * 2/3 * 1 = 1/3. Six equal words: 1/5 * 1/4 * 1/3 = 1/60. Three distinct words:
    2-grams 2/2, 3-grams 1/1, no 4-gram (factor 1) -> 1."""
    assert diversity("a b a b a") == pytest.approx(1 / 3)
    assert diversity("x x x x x x") == pytest.approx(1 / 60)
    assert diversity("the cat sat") == pytest.approx(1.0)
    assert math.isnan(diversity("   "))


@pytest.mark.parametrize(("word", "n"), [("the", 1), ("cat", 1), ("happy", 2), ("children", 2), ("outside", 2),
                                         ("yesterday", 3), ("wonderful", 3), ("tomorrow", 3), ("computer", 3),
                                         ("information", 4), ("understanding", 4)])
def test_syllables_hand_counted(word, n):
    assert count_syllables(word) == n
    assert count_syllables(word.capitalize()) == n


def test_reading_grade_golden():
    """FK = 0.39 W/S + 11.8 Y/W - 15.59.
    "The cat sat on the mat." W=6, S=1, Y=6: 2.34 + 11.8 - 15.59 = -1.45.
    "Yesterday(3) the(1) happy(2) children(2) played(1) outside(2). Tomorrow(3) is(1) a(1) wonderful(3)
    morning(2)!" W=11, S=2, Y=21: 0.39*5.5 + 11.8*21/11 - 15.59.
    A two-item list without full stops: lines end sentences; Water(2) / Computer(3) information(4):
    W=3, S=2, Y=9: 0.39*1.5 + 11.8*3 - 15.59."""
    assert flesch_kincaid_grade("The cat sat on the mat.") == pytest.approx(-1.45)
    two = "Yesterday the happy children played outside. Tomorrow is a wonderful morning!"
    assert flesch_kincaid_grade(two) == pytest.approx(0.39 * 5.5 + 11.8 * 21 / 11 - 15.59)
    assert flesch_kincaid_grade("- Water\n- Computer information") == pytest.approx(0.39 * 1.5 + 11.8 * 3 - 15.59)
    assert math.isnan(flesch_kincaid_grade("... !"))


def test_sentence_split_keeps_decimals_and_abbreviated_runs():
    assert len(split_sentences("Pi is 3.14 today. Really?! Yes")) == 3


def test_every_metric_declares_direction_and_kind():
    for name in METRICS:
        m = METRICS.get(name)
        assert isinstance(m.higher_is_better, bool), name
        assert m.kind in ("response", "pairs", "pairwise")
    assert METRICS.get("reading_grade").higher_is_better is False
    assert METRICS.get("offensiveness").higher_is_better is False
    assert METRICS.get("diversity").higher_is_better is True


def test_response_metrics_directional_sanity():
    sent = METRICS.get("sentiment").compute(["q", "q"], ["I love this, it is wonderful!", "I hate this, it is awful."])
    assert sent[0] > 0.5 and sent[1] < -0.5
    off = METRICS.get("offensiveness").compute(["q", "q"], ["Have a nice day, friend.", "You are a fucking idiot."])
    assert off[0] < 0.2 < 0.8 < off[1]
    assert METRICS.get("length").compute(["q"], ["one two  three\nfour"]) == [4.0]


def test_reward_metric_needs_scorer_and_uses_it():
    m = METRICS.get("reward")
    with pytest.raises(ValueError, match="needs a scorer"):
        m.compute(["q"], ["a"])
    bound = m.bind(scorer=FunctionScorer(lambda p, r: len(r) - len(p)))
    assert bound.compute(["ab", "a"], ["abcd", "a"]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        bound.compute(["a"], ["a", "b"])


def test_preference_accuracy_counts_ties_half():
    """Scores = response length: (long > short) correct, (short < long) wrong, equal lengths tie -> (1 + 0 + .5)/3."""
    from personalign.eval.datasets import PreferencePair

    pairs = [PreferencePair("p", "long answer", "short"), PreferencePair("p", "short", "long answer"),
             PreferencePair("p", "abc", "xyz")]
    assert preference_accuracy(FunctionScorer(lambda p, r: len(r)), pairs) == pytest.approx(0.5)


def test_mean_ci_golden():
    """[1, 2, 3, 4]: mean 2.5, s^2 = 5/3, half = 1.959964 * sqrt(5/3 / 4). NaN/None are dropped."""
    m, half, n = mean_ci([1, 2, float("nan"), 3, 4])
    assert (m, n) == (2.5, 4)
    assert half == pytest.approx(1.959964 * math.sqrt(5 / 3 / 4))
    assert math.isnan(mean_ci([7.0])[1]) and mean_ci([])[2] == 0
