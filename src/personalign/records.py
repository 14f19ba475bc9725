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
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["DatasetError", "Pair", "PairWording", "PAIR_TEXTS", "PAIR_EXTRAS", "read_records", "short_repr",
           "text_field", "pair_fields", "read_pair_records"]

PAIR_TEXTS = ("prompt", "chosen", "rejected")
PAIR_EXTRAS = ("user_id", "user_text", "preference")
_INTEGER_IDS = ("user_id", "group")  # optional fields that may be written as integers


class DatasetError(ValueError):
    """A malformed file or record; the message names the file, line and field."""


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
