"""Attribute prompts for Drift: a base system prompt and one system prompt per attribute.

Drift (seed 002, Section 3.1 and Table 6) scores a response ``y`` for attribute ``i`` zero-shot,
with a *differential prompt*: ``r_i(y | x) = log π(y | x, s_i) − log π(y | x, s_0)``, where ``s_0`` is
a neutral base system prompt and ``s_i`` is the same prompt with one cue added. The pool below
covers every attribute of the paper's Table 6, written in our own words, plus a few extra ones.
Every attribute prompt starts like the base prompt and adds one cue, so the log-ratio measures the
cue and not an unrelated rewording.

A pool can be edited from a JSON or YAML file (``load_attribute_file``)::

    {"mode": "extend",              # extend (default) | replace: start from the built-in pool or empty
     "base": "You are an assistant.",   # optional: a new base prompt
     "remove": ["conspiracy"],      # optional: names to drop
     "attributes": {"pirate": "You are an assistant who talks like a pirate."}}

``attributes`` is a mapping name -> prompt or a list of ``{"name", "prompt"}``; in ``extend`` mode an
existing name is replaced, a new name is appended. A name given twice in one file, an unknown name
in ``remove`` or an empty prompt is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Attribute", "AttributePool", "BASE_PROMPT", "DEFAULT_ATTRIBUTES", "default_pool", "load_attribute_file"]

BASE_PROMPT = "You are an assistant."

_A = "You are an assistant"
# name -> system prompt. Order matters only for ties and display.
DEFAULT_ATTRIBUTES: dict[str, str] = {
    "formal": f"{_A} who writes in a formal, professional register.",
    "concise": f"{_A} who keeps answers short and to the point instead of long-winded.",
    "vivid": f"{_A} who writes vividly, with imagery, metaphors and other rhetorical figures.",
    "modest": f"{_A} who is modest, humble and polite.",
    "engineering": f"{_A} with deep expertise in engineering.",
    "persuasive": f"{_A} who argues persuasively to win the reader over.",
    "emotional": f"{_A} who expresses feelings openly and speaks with emotion.",
    "humorous": f"{_A} with a sense of humour who likes to make people laugh.",
    "energetic": f"{_A} full of energy and enthusiasm.",
    "computer_science": f"{_A} with deep expertise in computer science and programming.",
    "easy_words": f"{_A} who uses plain, simple words that anyone can follow.",
    "direct": f"{_A} who speaks firmly and tells people directly what to do.",
    "sociology": f"{_A} with deep expertise in sociology and society.",
    "western": f"{_A} shaped by Western cultures and values.",
    "eastern": f"{_A} shaped by Eastern cultures and values.",
    "respectful": f"{_A} who treats everyone with great respect.",
    "internet_slang": f"{_A} who talks in internet slang and online abbreviations.",
    "proverbs": f"{_A} who likes to answer with proverbs and old sayings.",
    "critical": f"{_A} who is critical, questions everything and likes to argue.",
    "vague": f"{_A} who speaks indirectly and stays vague and noncommittal.",
    "creative": f"{_A} with a creative, imaginative mind.",
    "analytic": f"{_A} who thinks analytically and reasons step by step.",
    "empathetic": f"{_A} who is empathetic and attentive to how people feel.",
    "sycophantic": f"{_A} who flatters the user and agrees with whatever they say.",
    "old_fashioned": f"{_A} who speaks in old-fashioned, archaic English.",
    "meritocratic": f"{_A} who believes rewards should follow merit and effort.",
    "myopic": f"{_A} who only cares about the short term and ignores long-term effects.",
    "principled": f"{_A} who puts principles and rules above everything else.",
    "hedonist": f"{_A} who seeks the most pleasure and fun and the least pain.",
    "utilitarian": f"{_A} who aims for the greatest good for the greatest number.",
    "realist": f"{_A} who gives practical, realistic advice that can be acted on.",
    "pessimistic": f"{_A} who sees situations with a wary, skeptical and gloomy eye.",
    "storyteller": f"{_A} who explains things through stories and anecdotes.",
    "flexible": f"{_A} who prefers flexibility to strict rules.",
    "spontaneous": f"{_A} who acts spontaneously rather than following a plan.",
    "collectivist": f"{_A} who puts the group before the individual.",
    "individualistic": f"{_A} who puts the individual before the group.",
    "exclamatory": f"{_A} who loves exclamations and exclamation marks!",
    "conspiracy": f"{_A} who is fond of conspiracy theories.",
    "tech_industry": f"{_A} who puts technological and industrial progress first.",
    "eco_friendly": f"{_A} who cares for nature and protects the environment.",
    # Beyond the paper's table: domains and registers that preference data often turns on.
    "academic": f"{_A} who writes like a scholar, precise and well referenced.",
    "business": f"{_A} with a business mindset focused on markets, value and strategy.",
    "entertaining": f"{_A} who aims to entertain, with pop culture, games and fun.",
    "literary": f"{_A} who writes with literary style and poetic language.",
    "detailed": f"{_A} who gives thorough, detailed answers with background.",
    "optimistic": f"{_A} who looks on the bright side and stays hopeful.",
    "cautious": f"{_A} who is careful, mentions risks and avoids overclaiming.",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Attribute:
    """One attribute: a short snake_case name and its system prompt ``s_i``."""

    name: str
    prompt: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"attribute `name` must be snake_case (a-z, 0-9, _), got {self.name!r}.")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"attribute {self.name!r}: `prompt` must be a non-empty text.")


@dataclass(frozen=True)
class AttributePool:
    """The base prompt ``s_0`` and the attributes ``s_1..s_A`` (names unique)."""

    base: str
    attributes: tuple[Attribute, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base.strip():
            raise ValueError("`base` prompt must be a non-empty text.")
        names = [a.name for a in self.attributes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"attribute names must be unique; duplicated: {', '.join(dup)}.")
        if not self.attributes:
            raise ValueError("an attribute pool needs at least one attribute.")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.attributes)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def prompts(self) -> list[str]:
        return [a.prompt for a in self.attributes]

    def index(self, name: str) -> int:
        names = self.names
        if name not in names:
            raise ValueError(f"unknown attribute {name!r}; this pool holds {', '.join(names)}.")
        return names.index(name)

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the base prompt and the (name, prompt) list: equal pools, equal ids."""
        blob = json.dumps([self.base, [[a.name, a.prompt] for a in self.attributes]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ editing (each returns a new pool)
    def add(self, name: str, prompt: str) -> AttributePool:
        """A pool with one more attribute; an existing name is an error (use ``replace``)."""
        if name in self.names:
            raise ValueError(f"attribute {name!r} already exists; use replace() to change its prompt.")
        return AttributePool(self.base, (*self.attributes, Attribute(name, prompt)))

    def replace(self, name: str, prompt: str) -> AttributePool:
        """A pool where attribute ``name`` has a new prompt (same position)."""
        i = self.index(name)
        attrs = list(self.attributes)
        attrs[i] = Attribute(name, prompt)
        return AttributePool(self.base, tuple(attrs))

    def remove(self, *names: str) -> AttributePool:
        """A pool without the named attributes (unknown names are errors)."""
        for n in names:
            self.index(n)
        return AttributePool(self.base, tuple(a for a in self.attributes if a.name not in names))

    def select(self, names: Sequence[str]) -> AttributePool:
        """A pool with only ``names``, in that order."""
        return AttributePool(self.base, tuple(self.attributes[self.index(n)] for n in names))

    def with_base(self, base: str) -> AttributePool:
        return AttributePool(base, self.attributes)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "attributes": [{"name": a.name, "prompt": a.prompt} for a in self.attributes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributePool:
        if not isinstance(data, Mapping) or "base" not in data or "attributes" not in data:
            raise ValueError("an attribute pool must be an object with `base` and `attributes`.")
        return cls(data["base"], tuple(_parse_attributes(data["attributes"], "attributes")))


def default_pool() -> AttributePool:
    """The built-in pool: ``BASE_PROMPT`` and the attributes of ``DEFAULT_ATTRIBUTES``."""
    return AttributePool(BASE_PROMPT, tuple(Attribute(n, p) for n, p in DEFAULT_ATTRIBUTES.items()))


# ---------------------------------------------------------------------- files
class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_mapping(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            class _Loader(yaml.SafeLoader):
                pass

            def _mapping(loader: Any, node: Any, deep: bool = False) -> dict[str, Any]:
                loader.flatten_mapping(node)
                return _no_duplicates((loader.construct_object(k, deep=deep), loader.construct_object(v, deep=deep))
                                      for k, v in node.value)

            _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
            return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ValueError(f"attribute file {str(path)!r}: key {e.args[0]!r} appears twice.") from None
    except Exception as e:  # parse errors of either format
        raise ValueError(f"attribute file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None


def _parse_attributes(items: Any, where: str) -> list[Attribute]:
    if isinstance(items, Mapping):
        pairs = list(items.items())
    elif isinstance(items, list):
        pairs = []
        for i, it in enumerate(items):
            if not isinstance(it, Mapping) or set(it) != {"name", "prompt"}:
                raise ValueError(f"`{where}[{i}]` must be an object with exactly `name` and `prompt`, got {it!r}.")
            pairs.append((it["name"], it["prompt"]))
    else:
        raise ValueError(f"`{where}` must be a mapping name -> prompt or a list of {{name, prompt}}.")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"`{where}` names attribute(s) more than once: {', '.join(map(str, dup))}.")
    return [Attribute(n, p) for n, p in pairs]


def load_attribute_file(path: str | Path, pool: AttributePool | None = None) -> AttributePool:
    """Apply an attribute file (module docstring) to ``pool`` (default: the built-in pool)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"attribute file {str(path)!r} does not exist.")
    data = _read_mapping(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"attribute file {str(path)!r} must hold an object (mode, base, remove, attributes).")
    unknown = set(data) - {"mode", "base", "remove", "attributes"}
    if unknown:
        raise ValueError(f"attribute file {str(path)!r}: unknown key(s) {sorted(unknown)}; "
                         "valid: mode, base, remove, attributes.")
    mode = data.get("mode", "extend")
    if mode not in ("extend", "replace"):
        raise ValueError(f"attribute file `mode` must be 'extend' or 'replace', got {mode!r}.")
    new = _parse_attributes(data.get("attributes", {}), "attributes")
    base = data.get("base")
    if mode == "replace":
        if not new:
            raise ValueError("attribute file with mode 'replace' must list `attributes`.")
        return AttributePool(base if base is not None else (pool or default_pool()).base, tuple(new))
    pool = pool or default_pool()
    remove = data.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
        raise ValueError("attribute file `remove` must be a list of attribute names.")
    if remove:
        pool = pool.remove(*remove)
    for a in new:
        pool = pool.replace(a.name, a.prompt) if a.name in pool.names else pool.add(a.name, a.prompt)
    return pool.with_base(base) if base is not None else pool
