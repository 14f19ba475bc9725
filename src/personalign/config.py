"""Config helpers: build a frozen config dataclass from a mapping of (possibly string) values.

Used for ``--param KEY=VALUE`` flags, per-request ``params`` and YAML/JSON files. Unknown keys are
errors that list the valid ones; strings are coerced to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C")

__all__ = ["config_from_mapping", "config_to_dict", "expand_preset", "parse_value", "parse_params", "check_int",
           "check_positive", "PRESET_KEY"]


def parse_value(text: str) -> Any:
    """A CLI value as Python: JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": parsed v}``; malformed items raise ``ValueError``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"`--param` must look like KEY=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(name, value, a)
            except ValueError:
                continue
        raise ValueError(f"`{name}` must be one of {args}, got {value!r}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r}.")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}.")
        (inner, *_) = typing.get_args(tp) or (Any,)
        vals = [v if inner is Any else _coerce(name, v, inner) for v in value]
        return tuple(vals) if origin is tuple else vals
    return value


PRESET_KEY = "preset"


def expand_preset(cls: type, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """``values`` with its ``preset`` entry replaced by that preset's settings (``cls.PRESETS[name]``),
    the other entries winning: defaults < preset < the values given with it.

    A config class declares its presets as ``PRESETS: ClassVar[dict[str, dict]]`` (e.g. ``"paper"``:
    the paper's own settings, cited in docs/methods.md). An unknown name raises ``ValueError`` listing
    the valid ones.
    """
    values = dict(values or {})
    if PRESET_KEY not in values:
        return values
    name = values.pop(PRESET_KEY)
    presets = getattr(cls, "PRESETS", {}) or {}
    if not presets:
        raise ValueError(f"`preset` {name!r}: {cls.__name__} has no presets.")
    if name not in presets:
        raise ValueError(f"`preset` must be one of: {', '.join(sorted(presets))} (for {cls.__name__}), got {name!r}.")
    return {**presets[name], **values}


def config_from_mapping(cls: type[C], values: Mapping[str, Any] | None = None, base: C | None = None) -> C:
    """``cls(**values)`` with types coerced, over ``base``'s values; unknown keys raise ``ValueError``.

    A ``preset`` entry names one of ``cls.PRESETS`` (``expand_preset``): its settings apply over
    ``base``, the other entries over them.
    """
    values = expand_preset(cls, values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(names) or "none (it takes no parameters)"
        raise ValueError(f"unknown parameter {k!r} for {cls.__name__}; valid: {valid}.{hint}")
    kwargs = dataclasses.asdict(base) if base is not None else {}  # type: ignore[call-overload]
    kwargs = {k: v for k, v in kwargs.items() if k in names}
    for k, v in values.items():
        kwargs[k] = _coerce(k, v, hints[k])
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _why(hint: str) -> str:
    return f" ({hint})" if hint else ""


def check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> None:
    """Refuse ``value`` unless it is an integer (not a bool) >= ``low`` (and <= ``high``); the error names
    the field (``hint``: what the value means, e.g. "0 = off")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bound}{_why(hint)}, got {value!r}.")


def check_positive(name: str, value: Any, allow_zero: bool = False, hint: str = "") -> None:
    """Refuse ``value`` unless it is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a finite number {'>=' if allow_zero else '>'} 0{_why(hint)}, "
                         f"got {value!r}.")


def check_unit(name: str, value: Any, hint: str = "") -> None:
    """Refuse ``value`` unless it is a number in (0, 1] (a probability mass such as top-p)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must lie in (0, 1]{_why(hint)}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Refuse ``value`` unless it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}.")
