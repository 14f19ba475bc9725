"""Preference pairs: ``(prompt, chosen, rejected)`` records and their JSONL files.

A pairs file holds one JSON object per line (or a JSON array of them) with the non-empty texts
``prompt``, ``chosen`` (the preferred answer) and ``rejected``; ``personalign.records`` reads it.
Errors name the file and line; a pair whose two answers are the same text carries no preference
and is skipped with a logged warning (and counted).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from personalign.records import Pair, PairWording, read_pair_records

__all__ = ["PreferencePair", "load_pairs"]

logger = logging.getLogger(__name__)


_WORDING = PairWording(invalid_json="not valid JSON ({msg}).",
                       not_object="expected an object with prompt, chosen, rejected.",
                       missing="missing field `{key}` (expected prompt, chosen, rejected).",
                       not_text="field `{key}` must be a non-empty text, got {value}.")


@dataclass(frozen=True)
class PreferencePair(Pair):
    """One comparison: ``chosen`` is preferred over ``rejected`` as an answer to ``prompt``."""

    @property
    def pair_id(self) -> str:
        """sha256 (16 hex) of the three texts: the pair's identity in a profile."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_pairs(path: str | Path) -> tuple[list[PreferencePair], int]:
    """Read records ``{"prompt", "chosen", "rejected"}`` (JSON lines or a JSON array); returns ``(pairs, n_skipped)``.

    A missing field, a non-string or an empty text is a ``ValueError`` naming the line; a pair whose
    ``chosen`` equals its ``rejected`` carries no preference: it is skipped with a warning and counted.
    Other fields are ignored.
    """
    pairs, skipped = [], 0
    for where, rec in read_pair_records(path, optional=(), wording=_WORDING):
        if rec["chosen"].strip() == rec["rejected"].strip():  # type: ignore[union-attr]
            logger.warning("%s: chosen == rejected, pair skipped", where)
            skipped += 1
            continue
        pairs.append(PreferencePair(**rec))  # type: ignore[arg-type]
    if not pairs:
        raise ValueError(f"pairs file {str(path)!r} holds no usable pair ({skipped} skipped).")
    return pairs, skipped
