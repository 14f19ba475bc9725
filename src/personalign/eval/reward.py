"""Reward scorers from an evaluation config (``build_scorer``); the scorers live in ``views.reward``.

``{kind: hf, path: DIR, label: 0}``, ``{kind: persrm, path: DIR[, preference: TEXT]}`` (the backbone
recorded in the checkpoint is loaded), ``{kind: function, target: "module:function"}`` or
``{kind: object, target: "module:factory", args: {...}}`` (the factory's result must have ``score``).
A ``target`` names a module on the import path (``package.module:name``) or a Python file
(``path/to/file.py:name``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalign.training.persrm.model import PersRM
from personalign.training.persrm.scorer import PersRMScorer
from personalign.views.reward import FunctionScorer, HFRewardScorer, RewardScorer, import_object

__all__ = ["build_scorer"]


def build_scorer(spec: Mapping[str, Any], *, device: str = "cpu") -> RewardScorer:
    """A scorer from a config mapping (see the module docstring)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"`scorer` must be a mapping with `kind`, got {spec!r}.")
    kind = spec.get("kind")
    rest = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "hf":
        if "path" not in rest:
            raise ValueError("`scorer.path` is required for kind 'hf' (a local sequence-classification model).")
        allowed = {"path", "label", "template", "batch_size", "max_length"}
        bad = set(rest) - allowed
        if bad:
            raise ValueError(f"unknown `scorer` keys {sorted(bad)} for kind 'hf'; valid: {sorted(allowed)}.")
        path = rest.pop("path")
        return HFRewardScorer(str(path), device=device, **rest)
    if kind == "persrm":
        if "path" not in rest:
            raise ValueError("`scorer.path` is required for kind 'persrm' (a PersRM checkpoint of `personalign train pad`).")
        bad = set(rest) - {"path", "preference"}
        if bad:
            raise ValueError(f"unknown `scorer` keys {sorted(bad)} for kind 'persrm'; valid: ['path', 'preference'].")
        pref = rest.get("preference")
        if pref is not None and (not isinstance(pref, str) or not pref):
            raise ValueError(f"`scorer.preference` must be a non-empty text, got {pref!r}.")
        # the backbone recorded in the checkpoint is loaded; without `preference` each response is
        # scored under its own request's preference
        return PersRMScorer(PersRM.load(str(rest["path"]), device=device).eval(), pref)
    if kind in ("function", "object"):
        if "target" not in rest:
            raise ValueError(f"`scorer.target` ('module:name') is required for kind {kind!r}.")
        obj = import_object(rest["target"])
        if kind == "function":
            if set(rest) - {"target"}:
                raise ValueError(f"unknown `scorer` keys {sorted(set(rest) - {'target'})} for kind 'function'.")
            return FunctionScorer(obj)
        args = rest.get("args", {}) or {}
        if not isinstance(args, Mapping):
            raise ValueError(f"`scorer.args` must be a mapping, got {args!r}.")
        made = obj(**args)
        if not (hasattr(made, "score") and callable(made.score)):
            raise ValueError(f"`scorer.target` {rest['target']!r} did not return an object with score(prompts, responses).")
        return made
    raise ValueError(f"`scorer.kind` must be one of hf, persrm, function, object, got {kind!r}.")
