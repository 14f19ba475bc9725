"""Evaluation data: prompt sets and preference pairs, with schema validation and layout converters.

Layouts (``layout=`` names; ``"auto"`` detects them from the first record):

* ``prompts`` — JSON array or JSONL of ``{"id"|"index": ..., "prompt"|"question"|"query": str}``
  (e.g. ``shared/data/prompts/koala_eval_50.json``); a bare JSON string is a prompt too.
* ``trl`` — preference pairs ``{"prompt", "chosen", "rejected"}`` with optional ``user_id``,
  ``user_text`` and ``preference`` (the TRL ``DPOTrainer`` layout plus personalization fields).
* ``dsp`` — Domain-Specific Preference: ``{"query", "responses": {"academy", "business",
  "entertainment", "literature", "normal"}}``. User ``d`` (one of the four domains) prefers the
  ``d`` response to each of the other four, so one record gives 4 × 4 pairs.
* ``hh`` — Anthropic HH: whole dialogues ``{"chosen", "rejected"}`` (``hh_rlhf/*.jsonl[.gz]``) or
  ``{"text": [a, b], "score": [sa, sb]}`` (``dsp/helpful.test.json``; the higher score is chosen).
  The prompt is the common dialogue up to and including the last ``"\\n\\nAssistant:"``.

Every malformed record raises ``DatasetError`` (a ``ValueError``) naming the file, the line the
record starts on, and the field. ``check_pairs`` reports duplicate pairs, contradictory pairs (the
same user prefers a over b and b over a for one prompt) and degenerate pairs (chosen == rejected).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.records import (
    _ASSISTANT,
    _PROMPT_KEYS,
    DSP_DOMAINS,
    DSP_USERS,
    LAYOUTS,
    DatasetError,
    PreferencePair,
    detect_layout,
    dsp_to_pairs,
    load_pairs,
    read_records,
    short_repr,
    split_hh_dialogue,
    text_field,
)

__all__ = [
    "DatasetError", "PromptRecord", "PreferencePair", "PairReport", "DSP_DOMAINS", "DSP_USERS",
    "read_records", "load_prompts", "load_pairs", "check_pairs", "detect_layout", "dsp_to_pairs",
    "pairs_to_dsp", "split_hh_dialogue", "pair_to_hh", "write_jsonl", "convert", "LAYOUTS",
]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str


def _where(path: Path | str, line: int) -> str:
    return f"{path}:{line}"


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path, *, limit: int | None = None) -> list[PromptRecord]:
    """Prompt records in file order; ids default to the record's position. Duplicate ids are errors."""
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be >= 1, got {limit}.")
    out: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for pos, (line, rec) in enumerate(read_records(path)):
        where = _where(path, line)
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: a prompt record must be an object or a string, got {short_repr(rec)}.")
        key = next((k for k in _PROMPT_KEYS if k in rec), None)
        if key is None:
            raise DatasetError(f"{where}: missing field `prompt` (or `question`/`query`), a non-empty string.")
        text = text_field(rec, key, where)
        rid = rec.get("id", rec.get("index", pos))
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DatasetError(f"{where}: field `id` must be a string or an integer, got {short_repr(rid)}.")
        rid = str(rid)
        if rid in seen:
            raise DatasetError(f"{where}: duplicate `id` {rid!r} (first on line {seen[rid]}).")
        seen[rid] = line
        out.append(PromptRecord(id=rid, prompt=text))  # type: ignore[arg-type]
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DatasetError(f"{path}: no prompt records.")
    return out


# ----------------------------------------------------------------------------- pairs
def pairs_to_dsp(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """Pairs labelled with DSP users -> DSP records (inverse of ``dsp_to_pairs``).

    ``responses[u]`` is the chosen text of user ``u``; the ``normal`` response is the rejected text
    that no user chose. Every query must end up with all five responses.
    """
    by_q: dict[str, dict[str, str]] = {}
    rejected: dict[str, set[str]] = defaultdict(set)
    for p in pairs:
        if p.user_id not in DSP_USERS:
            raise ValueError(f"`user_id` must be one of {DSP_USERS} to write the dsp layout, got {p.user_id!r} "
                             f"({p.origin or 'pair'}).")
        r = by_q.setdefault(p.prompt, {})
        if r.get(p.user_id, p.chosen) != p.chosen:
            raise ValueError(f"user {p.user_id!r} chose two different responses for query {short_repr(p.prompt)}.")
        r[p.user_id] = p.chosen
        rejected[p.prompt].add(p.rejected)
    out = []
    for q, r in by_q.items():
        normal = rejected[q] - set(r.values())
        if len(normal) != 1 or len(r) != len(DSP_USERS):
            raise ValueError(f"query {short_repr(q)} does not determine all five DSP responses "
                             f"(users {sorted(r)}, {len(normal)} unchosen responses).")
        r["normal"] = normal.pop()
        out.append({"query": q, "responses": {d: r[d] for d in DSP_DOMAINS}})
    return out


def pair_to_hh(p: PreferencePair) -> dict[str, str]:
    """A pair as two HH dialogues; a plain prompt is wrapped as one Human turn."""
    prompt = p.prompt if p.prompt.rstrip().endswith("Assistant:") else f"\n\nHuman: {p.prompt}{_ASSISTANT}"
    return {"chosen": f"{prompt} {p.chosen}", "rejected": f"{prompt} {p.rejected}"}


# ----------------------------------------------------------------------------- checks
@dataclass
class PairReport:
    """Problems found in a pair set; each entry lists the origins ("file:line") involved."""

    n_pairs: int
    duplicates: list[list[str]] = field(default_factory=list)
    contradictions: list[list[str]] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)
    duplicate_users: list[str | None] = field(default_factory=list)  # the user of each duplicates group

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.contradictions or self.degenerate)

    def summary(self) -> str:
        lines = [f"{self.n_pairs} pairs: {len(self.duplicates)} duplicated, {len(self.contradictions)} contradictory, "
                 f"{len(self.degenerate)} with chosen == rejected."]
        users = self.duplicate_users or [None] * len(self.duplicates)
        lines += [f"  duplicate{'' if u is None else f' (user {u})'}: {_origins(g)}"
                  for g, u in list(zip(self.duplicates, users))[:20]]
        lines += [f"  contradiction: {_origins(g)}" for g in self.contradictions[:20]]
        lines += [f"  chosen == rejected: {o}" for o in self.degenerate[:20]]
        return "\n".join(lines)


def _origins(group: list[str]) -> str:
    """A group's origins, each named once with how many of the group's pairs it made (one DSP record
    makes several pairs, and identical replies make identical ones): ``f:162 (×3), f:170``."""
    counts = Counter(group)
    return ", ".join(o if n == 1 else f"{o} (×{n})" for o, n in counts.items())


def check_pairs(pairs: Sequence[PreferencePair]) -> PairReport:
    """Duplicates (same user, prompt, chosen, rejected), contradictions (same user and prompt, a ≻ b and
    b ≻ a) and degenerate pairs (chosen == rejected)."""
    rep = PairReport(n_pairs=len(pairs))
    groups: dict[tuple, list[str]] = defaultdict(list)
    for i, p in enumerate(pairs):
        origin = p.origin or f"#{i}"
        if p.chosen == p.rejected:
            rep.degenerate.append(origin)
            continue
        groups[(p.user_id, p.prompt, p.chosen, p.rejected)].append(origin)
    dups = [(key[0], g) for key, g in groups.items() if len(g) > 1]
    rep.duplicates, rep.duplicate_users = [g for _, g in dups], [u for u, _ in dups]
    for (u, q, c, r), g in groups.items():
        rev = groups.get((u, q, r, c))
        if rev is not None and (c, r) < (r, c):  # report each contradictory couple once
            rep.contradictions.append(g + rev)
    return rep


# ----------------------------------------------------------------------------- writing / converting
def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def convert(src: str | Path, dst: str | Path, *, to: str, layout: str = "auto", users: Sequence[str] = DSP_USERS,
            on_error: str = "raise", errors: list[str] | None = None) -> tuple[int, PairReport | None]:
    """Convert ``src`` to layout ``to`` in ``dst`` (JSONL, or a JSON array when ``dst`` ends in .json).

    ``to="prompts"`` keeps the unique prompts (of a prompt file or of a pair file). Returns the number
    of records written and, for pairs, the duplicate/contradiction report of what was written.
    ``on_error="skip"`` drops malformed pair records and pairs whose chosen and rejected are the same
    text (their messages go to ``errors``) instead of stopping at the first.
    """
    if to not in LAYOUTS:
        raise ValueError(f"`to` must be one of {', '.join(LAYOUTS)}, got {to!r}.")
    first = next(iter(read_records(src)), (0, None))[1]
    src_layout = layout if layout != "auto" else detect_layout(first)
    report = None
    if src_layout == "prompts":
        if to != "prompts":
            raise ValueError(f"a prompt file cannot become `{to}` pairs; it holds no responses.")
        records: list[dict[str, Any]] = [{"id": p.id, "prompt": p.prompt} for p in load_prompts(src)]
    else:
        pairs = load_pairs(src, layout=src_layout, users=users, on_error=on_error, errors=errors)
        if on_error == "skip":  # a pair whose chosen is its rejected states no preference: skipped, listed
            for i, p in enumerate(pairs):
                if p.chosen == p.rejected and errors is not None:
                    errors.append(f"{p.origin or f'#{i}'}: `chosen` and `rejected` are the same text.")
            pairs = [p for p in pairs if p.chosen != p.rejected]
        report = check_pairs(pairs)  # of what is written
        if to == "trl":
            records = [p.to_dict() for p in pairs]
        elif to == "hh":
            records = [pair_to_hh(p) for p in pairs]
        elif to == "dsp":
            records = pairs_to_dsp(pairs)
        else:
            seen: dict[str, None] = {}
            for p in pairs:
                seen.setdefault(p.prompt, None)
            records = [{"id": str(i), "prompt": q} for i, q in enumerate(seen)]
    dst = Path(dst)
    if dst.suffix == ".json":
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return len(records), report
    return write_jsonl(dst, records), report
