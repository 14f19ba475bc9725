"""``incontext``: the user's own choices enter the prompt (in-context learning from their history).

Two forms, together or apart (``InContextConfig.form``):

* **examples** — at each request, the user's kept replies (each with what it was kept over) whose
  prompts are most like the new prompt, most relevant first, as many as fit in ``max_tokens`` tokens
  of the model's tokenizer (word-overlap relevance weighted by inverse item frequency over the user's
  history; the most recent first among equals). Read from the stored items at request time, so a
  deleted item is gone from the next request at once.
* **hypothesis** — a sentence about what the user prefers, which the model infers from their most
  recent ``hypothesis_items`` choices: a generation in the engine's decoding rounds (greedy,
  ``hypothesis_tokens`` at most), rerun when ``hypothesis_every`` new choices have come since the last
  one (and at the first). The state keeps it with the ids of the items it was inferred from.

The learned text is the preference text of any method that reads one (``preference_prompting``,
``amulet``, ``linear_alignment``, ``pad``, ``persona_judge``, ``args``, ``best_of_n`` with a
preference-reading reward): after the stated preference when there is one, alone otherwise. So a
profile with ``"learner": "incontext"``, ``"method": "preference_prompting"`` and no stated preference
answers from what was learned.

Undo: which items the hypothesis comes from is a function of the user's folded items in order
(``hypothesis_window``). A delete that changes it marks the state stale and the replay infers it again
from the surviving items, so it equals what those items give from scratch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from personalign.config import check_choice, check_int
from personalign.learners.base import (
    LEARNERS,
    Contribution,
    Item,
    Learner,
    Merge,
    RequestView,
    Tasks,
    Undo,
)
from personalign.personas.prompts import build_prompt_ids

__all__ = ["InContextLearner", "InContextConfig", "hypothesis_window", "hypothesis_messages", "rank_examples",
           "FORMS"]

FORMS = ("both", "examples", "hypothesis")
_WORD = re.compile(r"[a-z0-9]+")
_HISTORY = 64  # the user's most recent items a request ranks for examples


@dataclass(frozen=True)
class InContextConfig:
    """Attributes:
        form: ``both`` | ``examples`` | ``hypothesis`` (module docstring).
        max_tokens: the most tokens the learned text (hypothesis and examples) adds to a prompt.
        max_examples: examples at most.
        example_chars: characters kept of each text of an example (prompt, kept, rejected).
        hypothesis_every: new choices between two inferences of the hypothesis.
        hypothesis_items: the most recent choices an inference reads.
        hypothesis_tokens: the most tokens the model writes for it.
    """

    form: str = "both"
    max_tokens: int = 320
    max_examples: int = 3
    example_chars: int = 360
    hypothesis_every: int = 2
    hypothesis_items: int = 6
    hypothesis_tokens: int = 40

    def __post_init__(self) -> None:
        check_choice("form", self.form, FORMS)
        check_int("max_tokens", self.max_tokens, 16, 4096)
        check_int("max_examples", self.max_examples, 0, 32)
        check_int("example_chars", self.example_chars, 16, 8000)
        check_int("hypothesis_every", self.hypothesis_every, 1, 1000)
        check_int("hypothesis_items", self.hypothesis_items, 1, 32)
        check_int("hypothesis_tokens", self.hypothesis_tokens, 4, 256)

    @property
    def examples(self) -> bool:
        return self.form in ("both", "examples")

    @property
    def hypothesis(self) -> bool:
        return self.form in ("both", "hypothesis")


def _clip(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def _prompt_text(item: Item) -> str:
    return "\n".join(m["content"] for m in item.prompt if m.get("role") == "user") or \
        "\n".join(m["content"] for m in item.prompt)


def hypothesis_window(items: Sequence[Item], every: int, size: int) -> list[str]:
    """Ids of the items (newest first) the hypothesis of a user whose folded items are ``items`` (in
    order) is inferred from: inferences run at the first item and whenever ``every`` items have come
    since the last one; the last inference reads the ``size`` items up to it."""
    last = None
    for i in range(len(items)):
        if last is None or i - last >= every:
            last = i
    if last is None:
        return []
    return [f.feedback_id for f in items[max(0, last - size + 1): last + 1]][::-1]


def hypothesis_messages(items: Sequence[Item], chars: int) -> list[dict[str, str]]:
    """The chat the model infers the hypothesis from: the choices (``items``, newest first), then the ask."""
    parts = []
    for k, f in enumerate(reversed(items), 1):
        rejected = "\n".join(f"Reply not chosen: {_clip(r, chars)}" for r in f.rejected_texts)
        parts.append(f"Choice {k}. Question: {_clip(_prompt_text(f), chars)}\nReply chosen: {_clip(f.chosen, chars)}\n"
                     f"{rejected}")
    ask = ("Above are choices one user made between replies. In one sentence, say what kind of reply this user "
           "prefers (for example its length, tone, vocabulary and level of detail). Start with \"The user prefers\".")
    return [{"role": "user", "content": "\n\n".join(parts) + "\n\n" + ask}]


def _first_sentence(text: str, chars: int = 400) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=[.!?])\s", text)
    return _clip(text[: m.start()] if m else text, chars)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rank_examples(query: str, items: Sequence[Item]) -> list[Item]:
    """``items`` (newest first) ordered by how much their prompts share with ``query``: the sum over
    shared words of ``log(1 + N / df)`` (``df``: the items whose prompt holds the word), normalized by
    the prompt's length; the newest first among equals."""
    docs = [set(_words(_prompt_text(f))) for f in items]
    df = Counter(w for d in docs for w in d)
    q = set(_words(query))
    n = len(items)

    def score(i: int) -> float:
        shared = q & docs[i]
        return sum(math.log(1 + n / df[w]) for w in shared) / math.sqrt(1 + len(docs[i]))
    order = sorted(range(n), key=lambda i: (-score(i), i))
    return [items[i] for i in order]


@LEARNERS.register
class InContextLearner(Learner):
    name = "incontext"
    field = "incontext"
    Config = InContextConfig

    def usable(self, method_obj: Any) -> str | None:
        if getattr(method_obj, "reads_preference", False):
            return None
        return f"method {method_obj.name!r} reads no preference text"

    def check_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ValueError("must be an object (the incontext learner's state).")
        h = state.get("hypothesis")
        if h is not None and not isinstance(h, str):
            raise ValueError("`hypothesis` must be a string or null.")
        ids = state.get("based_on", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("`based_on` must be a list of feedback ids.")
        n = state.get("choices", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError("`choices` must be an integer >= 0.")

    # -------------------------------------------------------------- folding
    def prepare(self, pairs: list[Any], profile: dict[str, Any]) -> Any:
        return self.config_for(profile)

    async def learn(self, plan: InContextConfig, ahead: Any, profile: dict[str, Any], item: Item,
                    prior: Sequence[Item], tasks: Tasks) -> dict[str, Any] | None:
        """A new hypothesis when ``hypothesis_every`` choices came since the last one ({} otherwise)."""
        if not plan.hypothesis:
            return {}
        state = profile.get(self.field) or {}
        based = state.get("based_on") or []
        ids = [f.feedback_id for f in prior]
        since = 1 + (ids.index(based[0]) if based and based[0] in ids else len(prior) + plan.hypothesis_every)
        if based and since < plan.hypothesis_every:
            return {}
        window = [item, *prior[: plan.hypothesis_items - 1]]
        return await self._infer(window, plan, tasks)

    def _bounded(self, window: Sequence[Item], cfg: InContextConfig) -> list[dict[str, str]] | None:
        """The inference chat, fitted to the model's context with room for the answer: the oldest choices
        go first, then each text is clipped shorter; None when not even one short choice fits."""
        tok = self.env.backend.tokenizer("main")
        room = (self.env.backend.context_length("main") or 1 << 16) - cfg.hypothesis_tokens - 1
        items, chars = list(window), cfg.example_chars
        while True:
            msgs = hypothesis_messages(items, chars)
            if len(build_prompt_ids(tok, msgs, chat_template=self.env.chat_template)) <= room:
                return msgs
            if len(items) > 1:
                items = items[:-1]
            elif chars > 32:
                chars //= 2
            else:
                return None

    async def _infer(self, window: Sequence[Item], cfg: InContextConfig, tasks: Tasks) -> dict[str, Any] | None:
        """A new hypothesis from ``window`` (newest first); {} when nothing fits the context."""
        msgs = self._bounded(window, cfg)
        if msgs is None:
            return {}
        text = await tasks.generate(msgs, cfg.hypothesis_tokens)
        if text is None:
            return None
        return {"hypothesis": _first_sentence(text), "based_on": [f.feedback_id for f in window]}

    def merge(self, state: dict[str, Any] | None, plan: Any, result: dict[str, Any], item: Item,
              profile: dict[str, Any]) -> Merge:
        new = {"format": self.format, "choices": 0, "hypothesis": None, "based_on": [], **(state or {})}
        new["choices"] = int(new["choices"]) + 1
        new.update(result)
        return Merge(new)

    def undo(self, state: dict[str, Any] | None, item: Item, before: Any, profile: dict[str, Any],
             others: Sequence[Item] = ()) -> Undo:
        if state is None:
            return Undo()
        cfg = self.config_for(profile)
        new = {**state, "choices": max(0, int(state.get("choices", 0)) - 1)}
        window = hypothesis_window(others, cfg.hypothesis_every, cfg.hypothesis_items) if cfg.hypothesis else []
        if window != list(state.get("based_on") or []):
            new["stale"] = True
            return Undo(state=new, changed=True, replay=True)
        return Undo(state=new, changed=True)

    async def replay(self, profile: dict[str, Any], items: Sequence[Item], first: int, start: Any,
                     tasks: Tasks) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """The hypothesis inferred again from the surviving items' window (none left: no hypothesis)."""
        state = dict(profile.get(self.field) or {})
        state.pop("stale", None)
        cfg = self.config_for(profile)
        window = hypothesis_window(items, cfg.hypothesis_every, cfg.hypothesis_items) if cfg.hypothesis else []
        by_id = {f.feedback_id: f for f in items}
        if not window:
            return {}, {**state, "hypothesis": None, "based_on": [], "choices": len(items)}
        got = await self._infer([by_id[i] for i in window], cfg, tasks)
        if got is None:
            return None
        return {}, {**state, "hypothesis": None, **got, "based_on": window, "choices": len(items)}

    # -------------------------------------------------------------- requests
    async def request(self, state: dict[str, Any] | None, view: RequestView) -> Contribution:
        """The learned text, for a user whose learner this is and a method that reads a preference."""
        if view.profile.get("learner") != self.name or self.usable(view.method_obj) is not None:
            return Contribution()
        cfg = self.config_for(view.profile)
        tok = self.env.backend.tokenizer("main")
        ctx = self.env.backend.context_length("main")
        limit = cfg.max_tokens if ctx is None else min(cfg.max_tokens, ctx // 4)  # the prompt keeps its room
        budget = limit
        parts: list[str] = []
        hyp = (state or {}).get("hypothesis") if cfg.hypothesis else None
        if hyp:
            line = f"What this user's earlier choices show: {hyp}"
            n = _count(tok, line)
            if n <= budget:
                parts.append(line)
                budget -= n
        used: list[str] = []
        if cfg.examples and cfg.max_examples and view.history is not None:
            query = "\n".join(m["content"] for m in view.messages if m.get("role") == "user")[-2000:]
            history = await view.history(_HISTORY)
            head = "Replies this user chose before, each over another reply:"
            for f in rank_examples(query, history):
                if len(used) >= cfg.max_examples:
                    break
                c = cfg.example_chars
                ex = (f"- Asked \"{_clip(_prompt_text(f), c)}\", they chose \"{_clip(f.chosen, c)}\" over "
                      f"\"{_clip(f.rejected_texts[0], c)}\".")
                n = _count(tok, ex if used else head + "\n" + ex)
                if n > budget:
                    continue
                if not used:
                    parts.append(head)
                parts.append(ex)
                used.append(f.feedback_id)
                budget -= n
        if not parts:
            return Contribution()
        learned = "\n".join(parts)
        text = learned if not view.stated else f"{view.stated}\n\n{learned}"
        return Contribution(preference=text, info={"incontext": {
            "hypothesis": hyp, "examples": used, "tokens": limit - budget, "form": cfg.form}})


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # the line break between parts
