"""The evaluation config (``personalign eval --config FILE.yaml``), validated on load.

Example (every key but ``models``, ``methods``, ``prompts`` and ``preferences`` is optional)::

    name: quality_cpu
    output_dir: runs/quality_cpu            # relative to the working directory
    models:
      - {name: smollm2, path: smollm2}       # path: directory, .gguf, hub id or 'smollm2'
    prompts: {path: "${shared}/data/prompts/koala_eval_50.json", limit: 20}
    preferences: {path: "${shared}/data/prompts/psoups_preferences.json"}   # or inline {ID: text}
    methods:                                 # names, 'all', or mappings
      - base
      - preference_prompting
      - {name: drift, label: drift, params: {beta: 1.0}, cli: {profile: prof.json}}
      - {name: drift, label: drift_own, request_params: {profile: "runs/drift_${preference}.json"}}
      - {name: pdpo, cli: {checkpoint: runs/pdpo}, request_params: {user: "${preference}"}}
    generation: {max_new_tokens: 96, temperature: 0.0, batch_size: 20, seed: 0}
    metrics: [length, diversity, reading_grade, sentiment, offensiveness,
              {metric: reward, as: rm, scorer: {kind: hf, path: ./my-rm}}]
    targets: {P1A: {reading_grade: lower}, P2B: {length: higher}}
    judge: {kind: local, reference: preference_prompting}
    pair_metrics: [{metric: preference_accuracy, scorer: {...}, pairs: {path: ...}}]
    plots: {bars: [length, diversity], tradeoff: [reading_grade, length]}   # defaults: all; first two

``${shared}`` expands to ``$PERSONALIGN_SHARED`` or else ``../shared`` of the working directory;
other ``${VAR}`` expand from the environment. Relative data paths are taken from the working
directory. Method ``params`` go to the method's config dataclass; ``resources`` holds its extra
inputs, the fields of ``assembly.Resources`` or their CLI flags' names (``{profile: FILE}``,
``{persrm: DIR}``, ``{checkpoint: DIR}``, ``{reward_function: "file.py:name"}``); ``cli`` is the older
name of the same mapping.
The harness passes no ``--preference``: every request carries its own preference text.

``request_params`` are per-request method parameters (``Request.params``, merged over the method's
config for that row), so one method entry can give each preference its own input while the
preferences still share batches: in their string values ``${preference}`` expands to the
preference id (``P1A``) and ``${preference_text}`` to its text; ``${shared}`` and ``${ENV}`` expand
as in paths. E.g. one Drift profile per preference (``profile: "runs/drift_${preference}.json"``) or
the P-DPO user id of each preference (``user: "${preference}"``). (``resources`` are loaded once per
method, not per request, so they take no ``${preference}``.)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from personalign.assembly import method_resources
from personalign.config import config_from_mapping
from personalign.decoding.sampling import SamplingConfig
from personalign.eval.metrics import get_metric
from personalign.methods import get_method, method_names

__all__ = ["EvalConfig", "ModelSpec", "MethodSpec", "GenerationSpec", "JudgeSpec", "MetricSpec", "PairMetricSpec",
           "load_eval_config", "parse_eval_config", "expand_path", "expand_request_params"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str, extra: Mapping[str, str] | None = None) -> str:
    """Expand ``${shared}``, the ``extra`` variables and ``${ENV}`` in a path; unknown variables are errors."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if extra is not None and name in extra:
            return extra[name]
        if name == "shared":
            return os.environ.get("PERSONALIGN_SHARED") or str(Path.cwd().parent / "shared")
        if name not in os.environ:
            raise ValueError(f"path {value!r} uses ${{{name}}}, which is not set in the environment.")
        return os.environ[name]
    return os.path.expanduser(_VAR.sub(sub, value))


def expand_request_params(params: Mapping[str, Any], pref_id: str, pref_text: str) -> dict[str, Any]:
    """A method entry's ``request_params`` for one preference: ``${preference}`` -> ``pref_id``,
    ``${preference_text}`` -> ``pref_text``, ``${shared}``/``${ENV}`` as in paths, in string values
    (also inside lists); other values are kept as they are."""
    extra = {"preference": pref_id, "preference_text": pref_text}

    def one(v: Any) -> Any:
        if isinstance(v, str):
            return expand_path(v, extra) if "$" in v or v.startswith("~") else v
        if isinstance(v, list):
            return [one(x) for x in v]
        return v

    return {str(k): one(v) for k, v in params.items()}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model to evaluate."""

    name: str  # label in tables
    path: str  # directory, .gguf file, hub id, or 'smollm2'
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ValueError("`models[].name` and `models[].path` must be non-empty strings.")


# a method entry's `resources` keys -> assembly.Resources fields (the CLI flags' names are accepted too)
RESOURCE_KEYS = {"persrm": "persrm", "reward_model": "reward_model", "reward_label": "reward_label",
                 "reward_function": "reward_function", "pdpo_checkpoint": "pdpo_checkpoint",
                 "checkpoint": "pdpo_checkpoint", "drift_profile": "drift_profile", "profile": "drift_profile",
                 "steer_model": "steer_model", "steer_gguf_file": "steer_gguf_file"}


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A registered method with its parameters."""

    name: str  # registry name
    label: str = ""  # label in tables (default: name); must be unique
    params: dict[str, Any] = field(default_factory=dict)  # the method's config fields
    resources: dict[str, Any] = field(default_factory=dict)  # its inputs (``RESOURCE_KEYS``): paths of checkpoints
    cli: dict[str, Any] = field(default_factory=dict)  # the same under the name of their CLI flags (older configs)
    request_params: dict[str, Any] = field(default_factory=dict)  # per request; ${preference} expands

    def __post_init__(self) -> None:
        cls = get_method(self.name)
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if not all(isinstance(x, Mapping) for x in (self.params, self.resources, self.cli, self.request_params)):
            raise ValueError(f"`methods[{self.label}].params`, `.resources` and `.request_params` must be mappings.")
        self.resource_fields()  # unknown keys -> error now
        fields = getattr(getattr(cls, "Config", None), "__dataclass_fields__", None)
        if fields is not None:
            unknown = sorted(set(self.request_params) - set(fields))
            if unknown:
                raise ValueError(f"`methods[{self.label}].request_params` has unknown keys {unknown}; "
                                 f"method {self.name!r} takes {sorted(fields)}.")
        expand_request_params(self.request_params, "P", "text")  # unknown ${VAR} -> error now, not mid-run

    def resource_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(Resources fields, method params)`` of ``resources`` (and the older ``cli``): each key is a
        ``Resources`` field (or its CLI flag's name), else a config field of the method (P-DPO's
        ``user``), else an error listing the valid keys."""

        fields = set(getattr(get_method(self.name).Config, "__dataclass_fields__", {}))
        res, params = {}, {}
        for k, v in {**self.cli, **self.resources}.items():
            if k in RESOURCE_KEYS:
                res[RESOURCE_KEYS[k]] = expand_path(v) if isinstance(v, str) else v
            elif k in fields:
                params[k] = v
            else:
                raise ValueError(f"`methods[{self.label}].resources` has unknown key {k!r}; valid: "
                                 f"{sorted(set(RESOURCE_KEYS) | fields)}.")
        unused = sorted(set(res) - method_resources(self.name))
        if unused:
            raise ValueError(f"`methods[{self.label}].resources` {unused} are not options of method {self.name!r} "
                             f"(it reads {sorted(method_resources(self.name)) or 'none'}).")
        return res, params


@dataclass(frozen=True, kw_only=True)
class GenerationSpec:
    """How every method decodes."""

    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # each request's seed derives from this and its key
    batch_size: int = 16  # requests per batch (mixed preferences)
    chat_template: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"`generation.max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if self.batch_size < 1:
            raise ValueError(f"`generation.batch_size` must be >= 1, got {self.batch_size}.")
        SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """A response metric, optionally renamed (``as``) and with a reward scorer."""

    metric: str
    name: str = ""
    scorer: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        m = get_metric(self.metric)
        if m.kind != "response":
            raise ValueError(f"`metrics` holds per-response metrics; {self.metric!r} is a {m.kind} metric "
                             "(use `judge` for win_rate, `pair_metrics` for preference_accuracy).")
        if self.metric == "reward" and self.scorer is None:
            raise ValueError("metric 'reward' needs `scorer` ({kind: hf|persrm|function|object, ...}).")
        if not self.name:
            object.__setattr__(self, "name", self.metric)


@dataclass(frozen=True, kw_only=True)
class PairMetricSpec:
    """Preference accuracy of a scorer on a pair file."""

    metric: str = "preference_accuracy"
    name: str = ""
    scorer: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] = field(default_factory=dict)  # {path, layout: auto, user: only this user_id, limit}

    def __post_init__(self) -> None:
        if self.metric != "preference_accuracy":
            raise ValueError(f"`pair_metrics[].metric` must be 'preference_accuracy', got {self.metric!r}.")
        if not self.scorer or "path" not in self.pairs:
            raise ValueError("`pair_metrics[]` needs `scorer` and `pairs: {path: ...}`.")
        if not self.name:
            object.__setattr__(self, "name", f"preference_accuracy:{Path(str(self.pairs['path'])).name}")


@dataclass(frozen=True, kw_only=True)
class JudgeSpec:
    """The pairwise judge and the reference method every other method is compared with."""

    kind: str = "local"  # local | http
    reference: str = "preference_prompting"  # a method label
    model: str | None = None  # local: a models[].name or a model path (default: the evaluated model)
    labels: tuple[str, ...] = ("A", "B")
    tie_margin: float = 0.0
    batch_size: int = 8
    base_url: str | None = None  # http
    judge_model: str | None = None  # http: the judge model's name
    api_key_env: str | None = "OPENAI_API_KEY"
    cache_dir: str | None = None  # http; default <output_dir>/judge_cache
    retries: int = 5
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("local", "http"):
            raise ValueError(f"`judge.kind` must be 'local' or 'http', got {self.kind!r}.")
        if self.kind == "http" and (not self.base_url or not self.judge_model):
            raise ValueError("`judge.base_url` and `judge.judge_model` are required for kind 'http'.")
        if len(self.labels) != 2:
            raise ValueError(f"`judge.labels` must hold two labels, got {self.labels}.")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    name: str
    output_dir: str
    models: tuple[ModelSpec, ...]
    methods: tuple[MethodSpec, ...]
    prompts_path: str
    prompts_limit: int | None
    preferences: dict[str, str]  # id -> text, in order
    generation: GenerationSpec
    metrics: tuple[MetricSpec, ...]
    targets: dict[str, dict[str, str]]  # preference id -> {metric name: "higher" | "lower"}
    judge: JudgeSpec | None
    pair_metrics: tuple[PairMetricSpec, ...]
    tradeoff: tuple[str, str] | None
    bar_plots: tuple[str, ...]  # metrics with a per-preference bar plot
    raw: dict[str, Any]

    def method(self, label: str) -> MethodSpec:
        for m in self.methods:
            if m.label == label:
                return m
        raise ValueError(f"no method labelled {label!r}; labels: {[m.label for m in self.methods]}.")


_TOP = {"name", "output_dir", "models", "methods", "prompts", "preferences", "generation", "metrics", "targets",
        "judge", "pair_metrics", "plots"}


def load_eval_config(path: str | Path) -> EvalConfig:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`--config` {str(p)!r} is not a file.")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: invalid YAML ({e}).") from None
    return parse_eval_config(raw, default_name=p.stem)


def _need(raw: Mapping, key: str, kind: type, what: str) -> Any:
    if key not in raw:
        raise ValueError(f"config: missing `{key}` ({what}).")
    if not isinstance(raw[key], kind):
        raise ValueError(f"config: `{key}` must be {what}, got {raw[key]!r}.")
    return raw[key]


def _preferences(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ValueError("config: `preferences` must be {path: FILE, select: [IDs]} or an inline {ID: text} mapping.")
    if "path" in raw:
        bad = set(raw) - {"path", "select"}
        if bad:
            raise ValueError(f"config: unknown `preferences` keys {sorted(bad)}; valid: path, select.")
        fp = Path(expand_path(str(raw["path"])))
        try:
            data = json.loads(fp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"config: cannot read `preferences.path` {str(fp)!r}: {e}") from None
        prefs = data.get("preferences", data) if isinstance(data, dict) else None
        if isinstance(prefs, list):
            prefs = {str(i): t for i, t in enumerate(prefs)}
        if not isinstance(prefs, dict):
            raise ValueError(f"{fp}: expected {{'preferences': {{ID: text}}}} or a list of texts.")
        select = raw.get("select")
        if select is not None:
            missing = [s for s in select if s not in prefs]
            if missing:
                raise ValueError(f"config: `preferences.select` names unknown ids {missing}; file has {list(prefs)}.")
            prefs = {s: prefs[s] for s in select}
    else:
        prefs = dict(raw)
    for k, v in prefs.items():
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"config: preference {k!r} must be a non-empty text, got {v!r}.")
    if not prefs:
        raise ValueError("config: `preferences` is empty.")
    return {str(k): v for k, v in prefs.items()}


def _methods(raw: Any) -> tuple[MethodSpec, ...]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[MethodSpec] = []
    for it in items:
        if it == "all":
            out.extend(MethodSpec(name=n) for n in method_names())
        elif isinstance(it, str):
            out.append(MethodSpec(name=it))
        elif isinstance(it, Mapping):
            out.append(config_from_mapping(MethodSpec, it))
        else:
            raise ValueError(f"config: each `methods` entry must be a name or a mapping, got {it!r}.")
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"config: method labels must be unique; repeated: {dup} (set `label:`).")
    if not out:
        raise ValueError("config: `methods` is empty.")
    return tuple(out)


def parse_eval_config(raw: Any, *, default_name: str = "eval") -> EvalConfig:
    if not isinstance(raw, Mapping):
        raise ValueError("config: the file must hold a mapping at the top level.")
    unknown = set(raw) - _TOP
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; valid: {sorted(_TOP)}.")
    models = tuple(config_from_mapping(ModelSpec, m if isinstance(m, Mapping) else {"name": str(m), "path": str(m)})
                   for m in _need(raw, "models", list, "a list of {name, path}"))
    if not models or len({m.name for m in models}) != len(models):
        raise ValueError("config: `models` must be non-empty with unique names.")
    methods = _methods(_need(raw, "methods", (list, str), "a list of method names or mappings"))
    pr = raw.get("prompts")
    if isinstance(pr, str):
        pr = {"path": pr}
    if not isinstance(pr, Mapping) or "path" not in pr or set(pr) - {"path", "limit"}:
        raise ValueError("config: `prompts` must be a path or {path: FILE, limit: N}.")
    limit = pr.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"config: `prompts.limit` must be an integer >= 1, got {limit!r}.")
    prefs = _preferences(_need(raw, "preferences", Mapping, "{path: FILE} or {ID: text}"))
    generation = config_from_mapping(GenerationSpec, raw.get("generation") or {})
    metrics = []
    for m in raw.get("metrics") or ["length", "diversity"]:
        spec = {"metric": m} if isinstance(m, str) else dict(m)
        if "as" in spec:
            spec["name"] = spec.pop("as")
        metrics.append(config_from_mapping(MetricSpec, spec))
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"config: metric names must be unique (rename with `as:`), got {names}.")
    targets: dict[str, dict[str, str]] = {}
    for pid, tg in (raw.get("targets") or {}).items():
        if str(pid) not in prefs:
            raise ValueError(f"config: `targets` names preference {pid!r}, not among {list(prefs)}.")
        if not isinstance(tg, Mapping):
            raise ValueError(f"config: `targets.{pid}` must map metric names to 'higher' or 'lower'.")
        for mname, goal in tg.items():
            if mname not in names:
                raise ValueError(f"config: `targets.{pid}.{mname}` is not one of the configured metrics {names}.")
            if goal not in ("higher", "lower"):
                raise ValueError(f"config: `targets.{pid}.{mname}` must be 'higher' or 'lower', got {goal!r}.")
        targets[str(pid)] = dict(tg)
    judge = None
    if raw.get("judge"):
        jr = dict(raw["judge"])
        if "labels" in jr:
            jr["labels"] = tuple(jr["labels"])
        judge = config_from_mapping(JudgeSpec, jr)
        if judge.reference not in [m.label for m in methods]:
            raise ValueError(f"config: `judge.reference` {judge.reference!r} is not a method label "
                             f"{[m.label for m in methods]}.")
    pair_metrics = tuple(config_from_mapping(PairMetricSpec, dict(pm)) for pm in raw.get("pair_metrics") or [])
    plots = raw.get("plots") or {}
    if not isinstance(plots, Mapping) or set(plots) - {"tradeoff", "bars"}:
        raise ValueError("config: `plots` must be a mapping with keys bars (metric names) and tradeoff ([x, y] or null).")
    bars = plots.get("bars", names)
    if not isinstance(bars, list) or any(b not in names for b in bars):
        raise ValueError(f"config: `plots.bars` must list configured metric names {names}, got {bars!r}.")
    tradeoff = None
    if "tradeoff" in plots and plots["tradeoff"] is None:
        pass
    elif plots.get("tradeoff") is not None:
        t = plots["tradeoff"]
        if not (isinstance(t, list) and len(t) == 2 and all(x in names for x in t)):
            raise ValueError(f"config: `plots.tradeoff` must be two configured metric names, got {t!r}.")
        tradeoff = (t[0], t[1])
    elif len(names) >= 2:
        tradeoff = (names[0], names[1])
    return EvalConfig(
        name=str(raw.get("name") or default_name), output_dir=str(raw.get("output_dir") or f"runs/{default_name}"),
        models=models, methods=methods, prompts_path=str(pr["path"]), prompts_limit=limit, preferences=prefs,
        generation=generation, metrics=tuple(metrics), targets=targets, judge=judge, pair_metrics=pair_metrics,
        tradeoff=tradeoff, bar_plots=tuple(bars), raw=dict(raw),
    )
