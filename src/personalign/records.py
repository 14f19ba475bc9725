"""Record files and preference-pair records: the one reader every pairs file goes through.

A record file is a JSON array or JSON lines (``.gz`` allowed); ``read_records`` yields each record
with the line it starts on. A preference-pair record has the TRL ``DPOTrainer`` layout
``{"prompt", "chosen", "rejected"}`` (non-empty texts) plus optional personalization fields
(``user_id``, ``user_text``, ``preference``, ``group``). ``pair_fields`` validates one record against
what its reader needs (which fields are required, which optional, whether unknown fields are
errors); ``read_pair_records`` does both for a whole file. ``user_id`` and ``group`` may be integers
(they become text); every other optional field is a string.

Every error is a ``DatasetError`` (a ``ValueError``) naming the file, the line the record starts on
and the field. Each reader keeps its own wording of the messages (``PairWording``): the CLI commands
built on them have documented, tested messages.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["DatasetError", "Pair", "PreferencePair", "PairWording", "PAIR_TEXTS", "PAIR_EXTRAS", "read_records",
           "short_repr", "text_field", "pair_fields", "read_pair_records", "load_pairs", "detect_layout",
           "dsp_to_pairs", "split_hh_dialogue", "DSP_DOMAINS", "DSP_USERS", "LAYOUTS", "ChoiceError", "choice_pairs"]

logger = logging.getLogger(__name__)

PAIR_TEXTS = ("prompt", "chosen", "rejected")
PAIR_EXTRAS = ("user_id", "user_text", "preference")
_INTEGER_IDS = ("user_id", "group")  # optional fields that may be written as integers


class DatasetError(ValueError):
    """A malformed file or record; the message names the file, line and field."""


DSP_DOMAINS = ("academy", "business", "entertainment", "literature", "normal")
DSP_USERS = ("academy", "business", "entertainment", "literature")
LAYOUTS = ("prompts", "trl", "dsp", "hh")
_ASSISTANT = "\n\nAssistant:"
_PROMPT_KEYS = ("prompt", "question", "query", "instruction")


@dataclass(frozen=True)
class Pair:
    """One comparison: ``chosen`` is preferred to ``rejected`` as an answer to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, Any]:
        """The record: the three texts and every other compared field that is set."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.compare and (f.name in PAIR_TEXTS or getattr(self, f.name) is not None)}


@dataclass(frozen=True)
class PreferencePair(Pair):
    """One comparison: ``chosen`` is preferred to ``rejected`` for ``prompt`` (by ``user_id``): the one
    pair record of the package (files, Drift profiles, P-DPO and PersRM training, server feedback).

    ``prompt`` is a text or, for server feedback, the chat messages. Optional fields: the annotator
    ``user_id`` and their text ``user_text`` (P-DPO), the ``preference`` the pair answers (PAD), a
    ``group`` label (majority / minority reports); ``origin`` says where it was read (not compared).
    """

    user_id: str | None = None
    user_text: str | None = None
    preference: str | None = None
    group: str | None = None
    origin: str = field(default="", compare=False)  # "file:line", for reports

    @property
    def pair_id(self) -> str:
        """sha256 (16 hex) of the three texts: the pair's identity in a Drift profile."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]




class ChoiceError(ValueError):
    """A choice that states no preference: ``field`` names what is wrong (``chosen_index``, ``choices``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def choice_pairs(prompt: Any, choices: Sequence[str], chosen_index: Any, **extra: Any) -> list[PreferencePair]:
    """The pairs a choice states: ``choices[chosen_index]`` preferred to each other choice (``n − 1``
    pairs; a choice whose text equals the chosen one, or an earlier rejected one, adds nothing).

    ``extra`` (``user_id`` ...) goes on every pair. Raises ``ChoiceError`` when ``chosen_index`` is not an
    integer in ``[0, n)``, when there are fewer than two choices, or when every choice is the chosen text.
    """
    n = len(choices)
    if isinstance(chosen_index, bool) or not isinstance(chosen_index, int):
        raise ChoiceError("chosen_index", f"`chosen_index` must be an integer in [0, {n - 1}], got "
                                          f"{short_repr(chosen_index)}.")
    if n < 2:
        raise ChoiceError("chosen_index", f"a choice needs at least two alternatives; this completion has {n} "
                                          "(ask for n >= 2 to compare).")
    if not 0 <= chosen_index < n:
        raise ChoiceError("chosen_index", f"`chosen_index` must be an integer in [0, {n - 1}], got {chosen_index}.")
    chosen = choices[chosen_index]
    others = list(dict.fromkeys(c for j, c in enumerate(choices) if j != chosen_index and c.strip() != chosen.strip()))
    if not others:
        raise ChoiceError("chosen_index", f"all {n} choices are the same text; there is nothing to compare (sample "
                                          "with temperature > 0, or compare two methods).")
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=r, **extra) for r in others]


@dataclass(frozen=True)
class PairWording:
    """Error messages of a pair reader (after ``"file:line: "``).

    Keys: ``{msg}``/``{col}`` (JSON error), ``{key}`` (field), ``{value}`` (short repr of the bad
    value), ``{type}`` (its type name), ``{fields}`` (the required fields), ``{keys}``/``{known}``.
    """

    invalid_json: str = "invalid JSON ({msg} at column {col})."
    not_object: str = "a pair record must be a JSON object with {fields}, got {value}."
    missing: str = "missing field `{key}` (a non-empty string)."
    not_text: str = "field `{key}` must be a non-empty string, got {value}."
    not_string: str = "field `{key}` must be a string, got {value}."
    unknown: str = "unknown field(s) {keys}; expected {known}."


WORDING = PairWording()


# ----------------------------------------------------------------------------- files
def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e}).") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise DatasetError(f"{path}: not a valid gzip file ({e}).") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}).") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_records(path: str | Path, *, invalid_json: str = WORDING.invalid_json) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` from a JSON array or a JSONL file (``.gz`` allowed).

    ``line`` is the 1-based line where the record starts. A JSON object at the top level that wraps a
    list (``{"data": [...]}``, ``{"preferences": ...}``) is not a record file and is rejected.
    ``invalid_json`` words a syntax error (keys ``{msg}``, ``{col}``).
    """
    path = Path(path)
    text = _open_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError(f"{path}: file is empty; expected a JSON array or JSON lines.")
    dec = json.JSONDecoder()
    if stripped[0] == "[":
        yield from _iter_array(path, text, dec, invalid_json)
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj, end = dec.raw_decode(line.strip())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{i}: " + invalid_json.format(msg=e.msg, col=e.colno)) from None
        if line.strip()[end:].strip():
            raise DatasetError(f"{path}:{i}: extra text after the JSON record; expected one record per line.")
        yield i, obj


def _iter_array(path: Path, text: str, dec: json.JSONDecoder, invalid_json: str) -> Iterator[tuple[int, Any]]:
    pos = text.index("[") + 1
    n = len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: " + invalid_json.format(msg=e.msg, col=e.colno)) from None
        yield _line_of(text, pos), obj
        pos = skip_ws(end)
        if pos >= n:
            raise DatasetError(f"{path}:{_line_of(text, n)}: JSON array is not closed with ']'.")
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise DatasetError(f"{path}:{_line_of(text, pos)}: extra text after the JSON array.")
            return
        if text[pos] != ",":
            raise DatasetError(f"{path}:{_line_of(text, pos)}: expected ',' or ']' between records.")
        pos = skip_ws(pos + 1)


# ----------------------------------------------------------------------------- fields
def short_repr(v: Any) -> str:
    """A value as an error message shows it (strings quoted, others as JSON), at most 60 characters."""
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def text_field(rec: dict, key: str, where: str, *, required: bool = True,
               wording: PairWording = WORDING) -> str | None:
    """``rec[key]``: a non-empty string when ``required``, else a string or absent (``None``)."""
    if key not in rec or rec[key] is None:
        if required:
            raise DatasetError(f"{where}: " + wording.missing.format(key=key))
        return None
    v = rec[key]
    if not isinstance(v, str) or (required and not v.strip()):
        raise DatasetError(f"{where}: " + wording.not_text.format(key=key, value=short_repr(v)))
    return v


def pair_fields(rec: Any, where: str, *, required: Sequence[str] = PAIR_TEXTS, optional: Sequence[str] = PAIR_EXTRAS,
                strict: bool = False, wording: PairWording = WORDING) -> dict[str, str | None]:
    """The validated fields of one pair record: ``{field: text}`` for ``required`` + ``optional``.

    ``required`` fields are non-empty texts; an ``optional`` field is absent (``None``) or a string
    (``user_id``/``group`` may be integers, returned as text). With ``strict``, fields outside both
    lists are errors; otherwise they are ignored.
    """
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: " + wording.not_object.format(
            fields=", ".join(required), value=short_repr(rec), type=type(rec).__name__))
    if strict:
        known = {*required, *optional}
        unknown = sorted(set(rec) - known)
        if unknown:
            raise DatasetError(f"{where}: " + wording.unknown.format(keys=unknown, known=sorted(known)))
    out = {k: text_field(rec, k, where, wording=wording) for k in required}
    for k in optional:
        v = rec.get(k)
        if k in _INTEGER_IDS and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if v is not None and not isinstance(v, str):
            raise DatasetError(f"{where}: " + wording.not_string.format(key=k, value=short_repr(v),
                                                                        type=type(v).__name__))
        out[k] = v
    return out


def read_pair_records(path: str | Path, *, required: Sequence[str] = PAIR_TEXTS,
                      optional: Sequence[str] = PAIR_EXTRAS, strict: bool = False,
                      wording: PairWording = WORDING) -> Iterator[tuple[str, dict[str, str | None]]]:
    """Yield ``(where, fields)`` for every record of a pairs file (``where`` is ``"file:line"``).

    The file is a JSON array or JSON lines; ``fields`` as ``pair_fields`` returns them. A missing
    file and a file without records are errors.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"`pairs` file {str(p)!r} does not exist.")
    n = 0
    for line, rec in read_records(p, invalid_json=wording.invalid_json):
        where = f"{p}:{line}"
        yield where, pair_fields(rec, where, required=required, optional=optional, strict=strict, wording=wording)
        n += 1
    if not n:
        raise DatasetError(f"`pairs` file {str(p)!r} holds no pairs.")


# ----------------------------------------------------------------------------- pair layouts
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
               required: Sequence[str] = PAIR_TEXTS, optional: Sequence[str] = (*PAIR_EXTRAS, "group"),
               strict: bool = False, wording: PairWording = WORDING, on_error: str = "raise",
               errors: list[str] | None = None) -> list[PreferencePair]:
    """Preference pairs from a ``trl``, ``dsp`` or ``hh`` file: THE pairs reader of the package.

    Args:
        layout: ``auto`` (from the first record), ``trl``, ``dsp`` or ``hh`` (module docstring).
        users: the DSP users (domains) to make pairs for.
        required, optional, strict, wording: how a ``trl`` record is checked (``pair_fields``): a
            reader that needs more than the three texts requires them (PAD's ``preference``), one
            that refuses unknown fields is ``strict`` (P-DPO), and each keeps its messages.
        on_error: ``raise`` the first malformed record's ``DatasetError``, or ``skip`` malformed
            records (each message is logged and appended to ``errors``). Unreadable files and
            invalid JSON always raise.
    """
    if layout not in ("auto", "trl", "dsp", "hh"):
        raise ValueError(f"`layout` must be one of auto, trl, dsp, hh, got {layout!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"`on_error` must be 'raise' or 'skip', got {on_error!r}.")
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"`pairs` file {str(p)!r} does not exist.")
    trl = {"required": tuple(required), "optional": tuple(optional), "strict": strict, "wording": wording}
    pairs: list[PreferencePair] = []
    for line, rec in read_records(p, invalid_json=wording.invalid_json):
        try:
            layout = _parse_pair_record(rec, f"{p}:{line}", layout, users, pairs, trl)
        except DatasetError as e:
            if on_error == "raise":
                raise
            logger.warning("skipping malformed record: %s", e)
            if errors is not None:
                errors.append(str(e))
    if not pairs:
        raise DatasetError(f"`pairs` file {str(p)!r} holds no pairs.")
    return pairs


def _parse_pair_record(rec: Any, where: str, layout: str, users: Sequence[str], pairs: list[PreferencePair],
                       trl: dict[str, Any]) -> str:
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
    if lay == "trl":
        pairs.append(PreferencePair(**pair_fields(rec, where, **trl), origin=where))  # type: ignore[arg-type]
        return lay
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: a {lay} record must be a JSON object, got {short_repr(rec)}.")
    if lay == "dsp":
        pairs.extend(dsp_to_pairs([rec], users=users, where=where))
    else:
        pairs.append(_hh_pair(rec, where))
    return lay


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


