"""Evaluation metrics, registered in ``METRICS``; each declares ``higher_is_better``.

Per-response metrics map ``(prompts[N], responses[N]) -> values[N]`` (NaN where undefined, e.g. an
empty response); the harness averages them with a 95% confidence interval (``mean_ci``).

* ``length``: words in the response (whitespace-separated). The direction that counts depends on
  the preference (concise vs informative); benchmark targets state it per preference.
* ``diversity`` (seed 000, Appendix B.2, after Khanov et al. 2024):
  ``diversity(y) = prod_{n=2..4} unique_ngrams_n(y) / total_ngrams_n(y)`` over the whitespace
  words of ``y``. NOTE: an order ``n`` with no n-grams (a response shorter than ``n`` words)
  contributes a factor 1 (nothing can repeat); an empty response is NaN.
* ``reading_grade``: Flesch–Kincaid grade level
  ``0.39 * words / sentences + 11.8 * syllables / words - 15.59``. Words are runs of letters and
  digits (inner apostrophes kept); sentences end at ``.``, ``!``, ``?`` or a line break (list items
  are sentences); syllables of a word are its ``pyphen`` (en_US) hyphenation points + 1, as
  ``textstat`` counts them, and 1 for a number. Lower reads more easily.
* ``sentiment``: VADER compound score in [-1, 1] (``vaderSentiment``).
* ``offensiveness``: probability of offensive language from ``alt-profanity-check`` in [0, 1].
* ``reward``: a ``RewardScorer``'s score (``views.reward``): a local sequence-classification
  model, the PAD PersRM, or a Python function; bind one with ``METRICS.get("reward").bind(scorer=...)``.
* ``preference_accuracy`` (pairs): the fraction of pairs whose chosen response a scorer ranks
  above the rejected one, ties counting 1/2.
* ``win_rate`` (pairwise): judged against a reference method; computed by ``eval.judge``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from personalign.registry import Registry
from personalign.views.reward import score_texts, uses_request_preference

__all__ = [
    "METRICS", "Metric", "get_metric", "word_count", "diversity", "ngram_ratio", "flesch_kincaid_grade",
    "count_syllables", "split_sentences", "split_words", "sentiment", "offensiveness", "preference_accuracy",
    "mean_ci",
]


@dataclass(frozen=True)
class Metric:
    """A named metric.

    Attributes:
        name: registry name.
        higher_is_better: the direction of improvement.
        kind: ``response`` (values per response), ``pairs`` (a score over preference pairs) or
            ``pairwise`` (a judged comparison of two methods' responses).
        help: one line for tables and ``--help``.
        fn: ``fn(prompts, responses, **params) -> list[float]`` for ``response`` metrics.
        params: bound keyword parameters (e.g. a reward scorer).
        takes_preferences: ``fn`` also takes ``preferences=`` (one text per response, or None): the
            reward metric, whose scorer may score each response under its request's preference.
    """

    name: str
    higher_is_better: bool
    kind: str
    help: str
    fn: Callable[..., list[float]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    takes_preferences: bool = False

    def bind(self, **params: Any) -> Metric:
        return replace(self, params={**self.params, **params})

    def compute(self, prompts: Sequence[str], responses: Sequence[str],
                preferences: Sequence[str | None] | None = None) -> list[float]:
        """Values float [N] for N responses (``response`` metrics only).

        ``preferences`` (one text per response, optional) reaches metrics that take it (the reward of
        a scorer that scores under each request's preference); the others ignore it.
        """
        if self.kind != "response" or self.fn is None:
            raise ValueError(f"metric {self.name!r} is a {self.kind} metric; it is not computed per response.")
        if len(prompts) != len(responses):
            raise ValueError(f"`prompts` ({len(prompts)}) and `responses` ({len(responses)}) must have the same length.")
        if preferences is not None and len(preferences) != len(responses):
            raise ValueError(f"`preferences` ({len(preferences)}) and `responses` ({len(responses)}) must have the same length.")
        extra = {"preferences": None if preferences is None else list(preferences)} if self.takes_preferences else {}
        return [float(v) for v in self.fn(list(prompts), list(responses), **self.params, **extra)]


METRICS: Registry[Metric] = Registry("metric")


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


# ----------------------------------------------------------------------------- text units
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENT_END = re.compile(r"[.!?]+(?=\s|$)|\n+")


def split_words(text: str) -> list[str]:
    """Words for readability: runs of letters/digits, inner apostrophes kept (``don't``)."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """Sentences that contain at least one word; ends: ``.``/``!``/``?`` runs and line breaks."""
    return [s for s in _SENT_END.split(text) if _WORD.search(s)]


@lru_cache(maxsize=1)
def _pyphen() -> Any:
    import pyphen

    return pyphen.Pyphen(lang="en_US")


@lru_cache(maxsize=65536)
def count_syllables(word: str) -> int:
    """Syllables of one word: pyphen hyphenation points + 1 (a number counts 1)."""
    if not any(c.isalpha() for c in word):
        return 1
    return len(_pyphen().positions(word.lower())) + 1


def flesch_kincaid_grade(text: str) -> float:
    """Flesch–Kincaid grade level of ``text``; NaN when it has no words."""
    words = split_words(text)
    if not words:
        return float("nan")
    n_sent = max(1, len(split_sentences(text)))
    syll = sum(count_syllables(w) for w in words)
    return 0.39 * len(words) / n_sent + 11.8 * syll / len(words) - 15.59


def word_count(text: str) -> int:
    return len(text.split())


def ngram_ratio(tokens: Sequence[str], n: int) -> float:
    """unique / total n-grams of ``tokens``; 1.0 when there are none."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def diversity(text: str, orders: Sequence[int] = (2, 3, 4)) -> float:
    """``prod_n unique_n / total_n`` over whitespace words; NaN for an empty text."""
    tokens = text.split()
    if not tokens:
        return float("nan")
    out = 1.0
    for n in orders:
        out *= ngram_ratio(tokens, n)
    return out


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound score per text, in [-1, 1] (0 for an empty text)."""
    return [float(_vader().polarity_scores(t)["compound"]) for t in texts]


def offensiveness(texts: Sequence[str]) -> list[float]:
    """Probability of offensive language per text (alt-profanity-check's linear SVM, calibrated)."""
    if not texts:
        return []

    with warnings.catch_warnings():  # the bundled model was pickled by an older scikit-learn
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(list(texts))]


def preference_accuracy(scorer: Any, pairs: Sequence[Any]) -> float:
    """Fraction of pairs with ``score(chosen) > score(rejected)``; ties count 1/2.

    Args:
        scorer: any ``RewardScorer`` (``score(prompts, responses) -> list[float]``).
        pairs: ``PreferencePair``s (``prompt``, ``chosen``, ``rejected``).
    """
    if not pairs:
        raise ValueError("`pairs` must hold at least one preference pair.")
    prompts = [p.prompt for p in pairs]

    prefs = [getattr(p, "preference", None) for p in pairs]
    if uses_request_preference(scorer):  # e.g. the PersRM: each pair is scored under its own preference
        missing = [getattr(p, "origin", "") or str(i) for i, (p, q) in enumerate(zip(pairs, prefs)) if not q]
        if missing:
            raise ValueError(f"this scorer scores under each pair's `preference`, which pair(s) {missing[:5]} lack "
                             "(add a `preference` field, or fix one preference on the scorer).")
    sc = score_texts(scorer, prompts, [p.chosen for p in pairs], prefs, what="pair")
    sr = score_texts(scorer, prompts, [p.rejected for p in pairs], prefs, what="pair")
    if len(sc) != len(pairs) or len(sr) != len(pairs):
        raise ValueError(f"the scorer returned {len(sc)}/{len(sr)} scores for {len(pairs)} pairs.")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sc, sr)) / len(pairs)


def mean_ci(values: Sequence[float], z: float = 1.959964) -> tuple[float, float, int]:
    """(mean, half-width of the normal-approximation 95% CI, n) over the finite values.

    ``half = z * s / sqrt(n)`` with the sample standard deviation ``s`` (n - 1); NaN when n < 2.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, z * math.sqrt(var / n), n


def _reward(prompts: list[str], responses: list[str], scorer: Any = None,
            preferences: list[str | None] | None = None) -> list[float]:
    if scorer is None:
        raise ValueError("metric 'reward' needs a scorer: bind one with .bind(scorer=...) or set `scorer` in the config.")

    out = score_texts(scorer, prompts, responses, preferences)
    if len(out) != len(responses):
        raise ValueError(f"the reward scorer returned {len(out)} scores for {len(responses)} responses.")
    return [float(v) for v in out]


METRICS.register("length", Metric("length", True, "response", "words in the response",
                                  lambda p, r: [float(word_count(t)) for t in r]))
METRICS.register("diversity", Metric("diversity", True, "response", "prod_{n=2..4} unique/total n-grams",
                                     lambda p, r: [diversity(t) for t in r]))
METRICS.register("reading_grade", Metric("reading_grade", False, "response", "Flesch-Kincaid grade level",
                                         lambda p, r: [flesch_kincaid_grade(t) for t in r]))
METRICS.register("sentiment", Metric("sentiment", True, "response", "VADER compound sentiment in [-1, 1]",
                                     lambda p, r: sentiment(r)))
METRICS.register("offensiveness", Metric("offensiveness", False, "response", "P(offensive), alt-profanity-check",
                                         lambda p, r: offensiveness(r)))
METRICS.register("reward", Metric("reward", True, "response", "reward-model score", _reward, takes_preferences=True))
METRICS.register("preference_accuracy", Metric("preference_accuracy", True, "pairs",
                                               "fraction of pairs ranked chosen > rejected"))
METRICS.register("win_rate", Metric("win_rate", True, "pairwise", "judged win rate vs a reference, ties = 1/2"))
