"""Personalized preference pairs: JSONL ``{"prompt", "chosen", "rejected", "user_id", "user_text"?, "group"?}``.

One line per comparison ``(x, y_1 > y_2, u)`` (paper Section 4.1): ``user_id`` is the annotator's
identifier ``u_p``, ``user_text`` the optional textual information ``u_t``, ``group`` an optional label
(e.g. majority / minority) used only to average per-user accuracies by group (paper App. C.3).
A ``preference`` field (the preference text of the TRL layout written by ``eval.datasets``) is
accepted and not used: P-DPO learns the user from ``user_id`` and ``user_text``.

Tokenization: the prompt goes through ``build_prompt_ids`` (chat template when the tokenizer has one,
else ``tokenizer(prompt)``); a response is ``tokenizer(response, add_special_tokens=False) + [EOS]``
so that its length, ending included, is part of what the policy learns (``end_token_id`` replaces
EOS for models that end their texts with another id, e.g. llama2.c story models end a story with BOS). Over-long prompts keep their
last ``max_prompt_tokens`` tokens; over-long responses keep their first ``max_response_tokens``
(their EOS is then cut, and the truncation counted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign.personas.prompts import build_prompt_ids
from personalign.training.user_model import encode_user_text

__all__ = ["PreferencePair", "TokenizedPair", "load_pairs", "write_pairs", "tokenize_pairs"]

logger = logging.getLogger(__name__)

_REQUIRED = ("prompt", "chosen", "rejected")
_KNOWN = {"prompt", "chosen", "rejected", "user_id", "user_text", "group", "preference"}  # preference: ignored


@dataclass(frozen=True)
class PreferencePair:
    """One personalized comparison: ``chosen`` is preferred to ``rejected`` by ``user_id``."""

    prompt: str
    chosen: str
    rejected: str
    user_id: str | None = None
    user_text: str | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "user_id": self.user_id}
        if self.user_text is not None:
            d["user_text"] = self.user_text
        if self.group is not None:
            d["group"] = self.group
        return d


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids; ``user_text_ids`` are the ids of ``u_t`` (empty when the user has no text)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    user_id: str | None
    user_text_ids: tuple[int, ...] = ()
    group: str | None = None


def _parse(obj: Any, where: str, require_user: bool) -> PreferencePair:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}.")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected {sorted(_KNOWN)}.")
    for k in _REQUIRED:
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            raise ValueError(f"{where}: `{k}` must be a non-empty string, got {obj.get(k)!r}.")
    uid = obj.get("user_id")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip()):
        raise ValueError(f"{where}: `user_id` must be a non-empty string or an integer, got {uid!r}.")
    if require_user and uid is None:
        raise ValueError(f"{where}: `user_id` is required in training pairs (the annotator's identifier).")
    text = obj.get("user_text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: `user_text` must be a string, got {type(text).__name__}.")
    group = obj.get("group")
    if group is not None and not isinstance(group, (str, int)):
        raise ValueError(f"{where}: `group` must be a string, got {group!r}.")
    return PreferencePair(prompt=obj["prompt"], chosen=obj["chosen"], rejected=obj["rejected"],
                          user_id=None if uid is None else str(uid), user_text=text,
                          group=None if group is None else str(group))


def load_pairs(path: str | Path, *, require_user: bool = True) -> list[PreferencePair]:
    """Read a JSONL file of pairs; malformed lines raise ``ValueError`` naming ``file:line`` and field."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`pairs` file {str(p)!r} does not exist.")
    out = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg}).") from None
            out.append(_parse(obj, f"{p}:{n}", require_user))
    if not out:
        raise ValueError(f"`pairs` file {str(p)!r} holds no pairs.")
    return out


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool = True,
    end_token_id: int | None = None,
) -> list[TokenizedPair]:
    """Token ids of every pair (module docstring for the rules).

    ``end_token_id`` is appended to every response (default: the tokenizer's EOS).
    """
    eos = tokenizer.eos_token_id if end_token_id is None else end_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses need one to end (set `end_token_id`).")
    out, cut = [], 0
    for pair in pairs:
        prompt = build_prompt_ids(tokenizer, pair.prompt, chat_template=chat_template)
        if len(prompt) > max_prompt_tokens:
            prompt, cut = prompt[-max_prompt_tokens:], cut + 1
        responses = []
        for text in (pair.chosen, pair.rejected):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(eos)]
            if len(ids) > max_response_tokens:
                ids, cut = ids[:max_response_tokens], cut + 1
            responses.append(tuple(ids))
        out.append(TokenizedPair(prompt_ids=tuple(prompt), chosen_ids=responses[0], rejected_ids=responses[1],
                                 user_id=pair.user_id, user_text_ids=encode_user_text(tokenizer, pair.user_text),
                                 group=pair.group))
    if cut:
        logger.warning("truncated %d prompts/responses to %d/%d tokens", cut, max_prompt_tokens, max_response_tokens)
    return out
