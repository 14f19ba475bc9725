"""Prompt construction: where a preference (or an attribute) goes in the model's input.

Rules, each unit-tested:

* With a chat template (and ``chat_template=True``): the preference becomes the system message.
  An existing system message keeps its text and the preference follows it on a new paragraph.
  The rendered text is encoded with ``add_special_tokens=False`` (the template already writes any
  BOS), exactly as ``tokenizer.apply_chat_template(..., tokenize=True)`` does, so BOS is never doubled.
* Without a chat template: the prompt is encoded exactly as ``tokenizer(prompt)`` encodes it; a
  preference is a plain-text prefix ``"{preference}\\n\\n{prompt}"`` encoded the same way (one BOS at
  most, from the tokenizer itself). Chat messages are joined by blank lines, system text first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from personalign.types import Message
from personalign.views.loading import pad_token_id  # re-exported: the prompt builders' padding rule

__all__ = ["build_prompt_ids", "has_chat_template", "render_prompt", "to_messages", "pad_token_id"]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def to_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages, with ``system`` merged into the system message."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n\n{system}"}
        else:
            msgs.insert(0, {"role": "system", "content": system})
    return msgs


def render_prompt(
    tokenizer: Any, prompt: str | Sequence[Message], *, system: str | None = None, chat_template: bool = True
) -> tuple[str, bool]:
    """Render the prompt to text. Returns ``(text, add_special_tokens)`` for the encoder call."""
    if chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            to_messages(prompt, system), tokenize=False, add_generation_prompt=True
        )
        return text, False
    if isinstance(prompt, str):
        body = prompt
    else:
        parts = [m["content"] for m in prompt if m["role"] == "system"]
        parts += [m["content"] for m in prompt if m["role"] != "system"]
        body = "\n\n".join(parts)
    return (f"{system}\n\n{body}" if system else body), True


def build_prompt_ids(
    tokenizer: Any,
    prompt: str | Sequence[Message],
    *,
    system: str | None = None,
    chat_template: bool = True,
) -> tuple[int, ...]:
    """Token ids of ``prompt`` with an optional system text (a preference or attribute prompt)."""
    text, special = render_prompt(tokenizer, prompt, system=system, chat_template=chat_template)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if isinstance(ids, Mapping):  # pragma: no cover - defensive against exotic tokenizers
        ids = ids["input_ids"]
    if not ids:
        raise ValueError(f"`prompt` encodes to no tokens: {prompt!r}.")
    return tuple(int(i) for i in ids)
