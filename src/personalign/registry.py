"""One generic name -> object registry.

Every pluggable family (decoding methods, metrics, reward scorers) is a ``Registry``. Unknown names
raise a ``ValueError`` that lists the valid names and suggests close matches, so a typo on the CLI
reads as a hint, not a ``KeyError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """A named collection of objects of one kind (e.g. decoding methods).

    Args:
        kind: what the entries are, used in error messages ("method", "metric").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | T, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``. As a class decorator, ``@registry.register`` registers the
        class under its own ``name`` attribute (the name is written once, on the class), and
        ``@registry.register("name")`` under the name given."""
        if not isinstance(name, str):
            obj, name = name, getattr(name, "name", None)
            if not isinstance(name, str):
                raise ValueError(f"{self.kind} {obj!r} has no `name` to register it under.")
        if obj is None:
            return lambda o: self.register(name, o)  # type: ignore[return-value]
        if not name or not name.replace("_", "").isalnum() or name != name.lower():
            raise ValueError(f"{self.kind} name must be lowercase letters, digits and '_', got {name!r}.")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """Return the entry called ``name``; unknown names list the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        valid = ", ".join(self.names()) or "(none registered)"
        msg = f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}."
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        if close:
            msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        return msg

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
