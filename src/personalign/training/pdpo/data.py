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

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign.personas.prompts import build_prompt_ids
from personalign.records import PairWording, PreferencePair, load_pairs
from personalign.training.user_model import encode_user_text

__all__ = ["PreferencePair", "TokenizedPair", "read_training_pairs", "write_pairs", "tokenize_pairs"]

logger = logging.getLogger(__name__)

_OPTIONAL = ("user_id", "user_text", "group")
_IGNORED = ("preference",)  # the TRL layout's per-pair preference text (PAD's field): read, not used
_WORDING = PairWording(invalid_json="not valid JSON ({msg}).",
                       not_object="each line must be a JSON object, got {type}.",
                       missing="`{key}` must be a non-empty string, got None.",
                       not_text="`{key}` must be a non-empty string, got {value}.",
                       not_string="`{key}` must be a string, got {value}.")


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids; ``user_text_ids`` are the ids of ``u_t`` (empty when the user has no text)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    user_id: str | None
    user_text_ids: tuple[int, ...] = ()
    group: str | None = None


def read_training_pairs(path: str | Path, *, require_user: bool = True) -> list[PreferencePair]:
    """The pairs of a P-DPO pairs file (``records.load_pairs``, trl layout); malformed records raise
    ``ValueError`` naming ``file:line`` and field.

    Fields other than prompt, chosen, rejected, user_id, user_text, group and preference (read, not
    used) are errors; with ``require_user`` every pair needs a ``user_id``.
    """
    out = []
    for p in load_pairs(path, layout="trl", optional=_OPTIONAL + _IGNORED, strict=True, wording=_WORDING):
        uid = p.user_id
        if uid is not None and not uid.strip():
            raise ValueError(f"{p.origin}: `user_id` must be a non-empty string or an integer, got {uid!r}.")
        if require_user and uid is None:
            raise ValueError(f"{p.origin}: `user_id` is required in training pairs (the annotator's identifier).")
        out.append(dataclasses.replace(p, preference=None))
    return out


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for pair in pairs:
            f.write(json.dumps({**pair.to_dict(), "user_id": pair.user_id}, ensure_ascii=False) + "\n")


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
