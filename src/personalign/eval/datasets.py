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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.records import DatasetError, Pair, pair_fields, read_records, short_repr, text_field

__all__ = [
    "DatasetError", "PromptRecord", "PreferencePair", "PairReport", "DSP_DOMAINS", "DSP_USERS",
    "read_records", "load_prompts", "load_pairs", "check_pairs", "detect_layout", "dsp_to_pairs",
    "pairs_to_dsp", "split_hh_dialogue", "pair_to_hh", "write_jsonl", "convert", "LAYOUTS",
]

logger = logging.getLogger(__name__)

DSP_DOMAINS = ("academy", "business", "entertainment", "literature", "normal")
DSP_USERS = ("academy", "business", "entertainment", "literature")
LAYOUTS = ("prompts", "trl", "dsp", "hh")
_ASSISTANT = "\n\nAssistant:"
_PROMPT_KEYS = ("prompt", "question", "query", "instruction")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str


@dataclass(frozen=True)
class PreferencePair(Pair):
    """One comparison: ``chosen`` is preferred to ``rejected`` for ``prompt`` (by ``user_id``)."""

    user_id: str | None = None
    user_text: str | None = None
    preference: str | None = None
    origin: str = field(default="", compare=False)  # "file:line", for reports


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
def detect_layout(rec: Any) -> str:
    """The layout of one record: ``trl``, ``dsp``, ``hh`` or ``prompts``."""
    if isinstance(rec, dict):
        if "responses" in rec and "query" in rec:
            return "dsp"
        if "chosen" in rec or "rejected" in rec:
            return "trl" if "prompt" in rec else "hh"
        if "text" in rec and isinstance(rec["text"], list):
            return "hh"
        if any(k in rec for k in _PROMPT_KEYS):
            return "prompts"
    if isinstance(rec, str):
        return "prompts"
    raise ValueError(f"cannot tell the layout of record {short_repr(rec)}; expected one of {', '.join(LAYOUTS)}.")


def load_pairs(path: str | Path, *, layout: str = "auto", users: Sequence[str] = DSP_USERS,
               on_error: str = "raise", errors: list[str] | None = None) -> list[PreferencePair]:
    """Preference pairs from a ``trl``, ``dsp`` or ``hh`` file (see the module docstring).

    Args:
        layout: ``auto`` (from the first record), ``trl``, ``dsp`` or ``hh``.
        users: the DSP users (domains) to make pairs for.
        on_error: ``raise`` the first malformed record's ``DatasetError``, or ``skip`` malformed
            records (each message is logged and appended to ``errors``). Unreadable files and
            invalid JSON always raise.
    """
    if layout not in ("auto", "trl", "dsp", "hh"):
        raise ValueError(f"`layout` must be one of auto, trl, dsp, hh, got {layout!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"`on_error` must be 'raise' or 'skip', got {on_error!r}.")
    pairs: list[PreferencePair] = []
    for line, rec in read_records(path):
        try:
            layout = _parse_pair_record(rec, _where(path, line), layout, users, pairs)
        except DatasetError as e:
            if on_error == "raise":
                raise
            logger.warning("skipping malformed record: %s", e)
            if errors is not None:
                errors.append(str(e))
    if not pairs:
        raise DatasetError(f"{path}: no preference pairs.")
    return pairs


def _parse_pair_record(rec: Any, where: str, layout: str, users: Sequence[str], pairs: list[PreferencePair]) -> str:
    """Append the pairs of one record; returns the file's layout (fixed by its first record)."""
    lay = layout
    if lay == "auto":
        try:
            lay = detect_layout(rec)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from None
        if lay == "prompts":
            raise DatasetError(f"{where}: this is a prompt record, not a preference pair "
                               "(expected `chosen` and `rejected`, or DSP `responses`).")
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: a {lay} record must be a JSON object, got {short_repr(rec)}.")
    if lay == "trl":
        pairs.append(_trl_pair(rec, where))
    elif lay == "dsp":
        pairs.extend(dsp_to_pairs([rec], users=users, where=where))
    else:
        pairs.append(_hh_pair(rec, where))
    return lay


def _trl_pair(rec: dict, where: str) -> PreferencePair:
    return PreferencePair(**pair_fields(rec, where), origin=where)  # type: ignore[arg-type]


def dsp_to_pairs(records: Iterable[dict], *, users: Sequence[str] = DSP_USERS, where: str = "") -> list[PreferencePair]:
    """DSP records -> pairs: for each user domain ``d``, ``responses[d]`` beats every other response."""
    bad = [u for u in users if u not in DSP_DOMAINS]
    if bad:
        raise ValueError(f"`users` must be DSP domains {DSP_DOMAINS}, got {bad}.")
    out = []
    for rec in records:
        q = text_field(rec, "query", where)
        resp = rec.get("responses")
        if not isinstance(resp, dict):
            raise DatasetError(f"{where}: field `responses` must be an object with keys {', '.join(DSP_DOMAINS)}.")
        for d in DSP_DOMAINS:
            if d not in resp:
                raise DatasetError(f"{where}: missing field `responses.{d}` (a non-empty string).")
            if not isinstance(resp[d], str) or not resp[d].strip():
                raise DatasetError(f"{where}: field `responses.{d}` must be a non-empty string, got {short_repr(resp[d])}.")
        for u in users:
            for other in DSP_DOMAINS:
                if other != u:
                    out.append(PreferencePair(prompt=q, chosen=resp[u], rejected=resp[other], user_id=u,  # type: ignore[arg-type]
                                              origin=where))
    return out


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


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two HH dialogues sharing their history."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)  # the last turn marker lying wholly in the shared history
    if cut < 0:
        raise ValueError("the two dialogues share no history ending in '\\n\\nAssistant:'.")
    k = cut + len(_ASSISTANT)
    return chosen[:k], chosen[k:].strip(), rejected[k:].strip()


def _hh_pair(rec: dict, where: str) -> PreferencePair:
    if "text" in rec:
        texts = rec["text"]
        if not isinstance(texts, list) or len(texts) != 2 or not all(isinstance(t, str) and t for t in texts):
            raise DatasetError(f"{where}: field `text` must be a list of two non-empty dialogues, got {short_repr(texts)}.")
        a, b = texts
        score = rec.get("score")
        if score is not None:
            if not (isinstance(score, list) and len(score) == 2 and all(isinstance(s, (int, float)) for s in score)):
                raise DatasetError(f"{where}: field `score` must be a list of two numbers, got {short_repr(score)}.")
            if score[1] > score[0]:
                a, b = b, a
    else:
        a, b = text_field(rec, "chosen", where), text_field(rec, "rejected", where)
    try:
        prompt, c, r = split_hh_dialogue(a, b)  # type: ignore[arg-type]
    except ValueError as e:
        raise DatasetError(f"{where}: field `chosen`/`rejected`: {e}") from None
    return PreferencePair(prompt=prompt, chosen=c, rejected=r, origin=where)


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

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.contradictions or self.degenerate)

    def summary(self) -> str:
        lines = [f"{self.n_pairs} pairs: {len(self.duplicates)} duplicated, {len(self.contradictions)} contradictory, "
                 f"{len(self.degenerate)} with chosen == rejected."]
        lines += [f"  duplicate: {', '.join(g)}" for g in self.duplicates[:20]]
        lines += [f"  contradiction: {', '.join(g)}" for g in self.contradictions[:20]]
        lines += [f"  chosen == rejected: {o}" for o in self.degenerate[:20]]
        return "\n".join(lines)


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
    rep.duplicates = [g for g in groups.values() if len(g) > 1]
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
    of records written and, for pairs, the duplicate/contradiction report. ``on_error="skip"`` drops
    malformed pair records (their messages go to ``errors``) instead of stopping at the first.
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
        report = check_pairs(pairs)
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
