"""The evaluation runner: models × methods × preferences × prompts -> generations, metrics, tables, plots.

Outputs in ``output_dir``:

* ``generations.jsonl`` — one line per (model, method, preference, prompt), appended batch by
  batch and flushed, so an interrupted run resumes where it stopped: items whose key is already
  there with the same generation settings (``settings`` hash) are skipped; a torn last line is
  ignored. Each request's sampling seed derives from the run seed and its key, so a resumed run
  draws what an uninterrupted one would.
* ``judgments.jsonl`` — pairwise verdicts vs the reference method (both orders), resumable alike.
* ``summary.csv`` (long format) and ``results.md`` (tables, see ``eval.report``); PNG plots.
* ``run.json`` — the config, the methods' resolved configs, environment (versions, device, commit).

Every method in the registry is built by the same path as ``personalign generate`` and the server:
``personalign.assembly`` (a method needing extra inputs, a profile or a checkpoint, gets them from the
entry's ``resources``, mapped to ``assembly.Resources``). Each request carries its preference, and
the entry's ``request_params`` (with ``${preference}`` expanded, see ``eval.config``) go into each
request's ``params``. A method entry with ``resources`` is built on its own copy of the model
(loading a PersRM or a P-DPO checkpoint injects or merges adapters into the model it is given), so
the methods after it and the local judge see the untouched model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personalign.assembly import Resources, build_backend
from personalign.assembly import build_method as assemble_method
from personalign.decoding.loop import decode
from personalign.decoding.sampling import SamplingConfig
from personalign.environment import environment_record
from personalign.eval.config import (
    EvalConfig,
    GenerationSpec,
    MethodSpec,
    ModelSpec,
    expand_path,
    expand_request_params,
)
from personalign.eval.datasets import PromptRecord, load_pairs, load_prompts
from personalign.eval.judge import HTTPJudge, LocalJudge, judge_pairs
from personalign.eval.metrics import preference_accuracy
from personalign.eval.report import summarize, write_report
from personalign.eval.reward import build_scorer
from personalign.types import Request
from personalign.views import LoadedModel, load_model

__all__ = ["run_eval", "EvalResult", "build_method", "read_jsonl_records", "item_key"]

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    output_dir: Path
    generations: list[dict[str, Any]]
    judgments: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    markdown: str
    generated_now: int  # items decoded by this call (0 when everything was resumed)


def item_key(model: str, method: str, pref: str, prompt_id: str) -> str:
    return f"{model}|{method}|{pref}|{prompt_id}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_jsonl_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by this module; a torn (partially written) last line is dropped."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a torn last line (interrupted write)", path)
                continue
            raise ValueError(f"{path}:{i + 1}: invalid JSON in a results file; delete the line or the file.") from None
    return out


def _append(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so appended records start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        path.write_bytes(data[:cut])


# ----------------------------------------------------------------------------- methods
def build_method(spec: MethodSpec, model: ModelSpec, main: Any) -> tuple[Any, Any]:
    """``(method, backend)`` for one config entry on one loaded model (``LoadedModel``), by assembly:
    the entry's ``resources`` are loaded and attached to a backend of its own."""

    fields, params = spec.resource_fields()
    # checkpoints may inject or merge adapters into the model they are given: isolate the shared one
    lm = copy.deepcopy(main.model) if fields else main.model
    res = Resources(model=LoadedModel(model=lm, tokenizer=main.tokenizer, name=main.name,
                                      gguf_file=getattr(main, "gguf_file", None)),
                    dtype=model.dtype, device=_device(model), **fields)
    backend = build_backend(res, [spec.name])
    return assemble_method(spec.name, {**params, **spec.params}, backend, res), backend


def _device(model: ModelSpec) -> str:
    return model.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _request_seed(base: int, key: str) -> int:
    return (int(hashlib.sha256(f"{base}|{key}".encode()).hexdigest()[:8], 16) + base) % (2**31)


# ----------------------------------------------------------------------------- generation
def _generate_method(cfg: EvalConfig, model: ModelSpec, main: Any, spec: MethodSpec, prompts: list[PromptRecord],
                     done: dict[str, dict], out_path: Path, budget: list[int], env_method: dict) -> int:
    g: GenerationSpec = cfg.generation
    settings = _hash([asdict(model), asdict(spec), asdict(g)])
    todo = []
    for pr in prompts:  # preferences vary fastest: each batch mixes them (the serving case)
        for pid, ptext in cfg.preferences.items():
            key = item_key(model.name, spec.label, pid, pr.id)
            rec = done.get(key)
            if rec is not None and rec.get("settings") == settings and rec.get("prompt") == pr.prompt \
                    and rec.get("preference") == ptext:
                continue
            todo.append((key, pid, ptext, pr))
    if not todo:
        return 0
    method, backend = build_method(spec, model, main)
    env_method[spec.label] = {"name": spec.name, "config": method.config_dict(), "params": spec.params,
                              "resources": {**spec.cli, **spec.resources}}
    sampling = SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
    n_done = 0
    bar = tqdm(total=len(todo), desc=f"{model.name}/{spec.label}", unit="item", leave=False)
    tbar = tqdm(total=len(todo) * g.max_new_tokens, desc="  tokens (upper bound)", unit="tok", leave=False)
    for s in range(0, len(todo), g.batch_size):
        if budget[0] == 0:
            break
        batch = todo[s : s + g.batch_size]
        reqs = [Request(prompt=pr.prompt, preference=ptext, seed=_request_seed(g.seed, key),
                        params=expand_request_params(spec.request_params, pid, ptext))
                for key, pid, ptext, pr in batch]
        t0 = time.perf_counter()
        outs: list[Any] = []
        for event in decode(method, reqs, backend, max_new_tokens=g.max_new_tokens, sampling=sampling,
                            chat_template=g.chat_template):
            if isinstance(event, list):
                outs = event
            else:
                tbar.update(len(event.tokens))
        dt = time.perf_counter() - t0
        recs = [{"key": key, "model": model.name, "method": spec.label, "method_name": spec.name, "preference_id": pid,
                 "preference": ptext, "prompt_id": pr.id, "prompt": pr.prompt, "text": o.text,
                 "new_tokens": len(o.token_ids), "finish_reason": o.finish_reason, "settings": settings,
                 "batch_seconds": round(dt, 3), "stats": _jsonable(o.stats)}
                for (key, pid, ptext, pr), o in zip(batch, outs)]
        _append(out_path, recs)
        for r in recs:
            done[r["key"]] = r
        n_done += len(batch)
        bar.update(len(batch))
        tbar.n = n_done * g.max_new_tokens  # rows that stopped early leave their budget unused
        tbar.refresh()
        budget[0] -= 1
    bar.close()
    tbar.close()
    return n_done


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------- judging
def _judge_all(cfg: EvalConfig, model: ModelSpec, main: Any, gens: dict[str, dict], jpath: Path,
               judged: dict[str, dict], output_dir: Path, models_cache: dict[str, Any]) -> None:
    js = cfg.judge
    assert js is not None
    ref = js.reference
    jid = _hash(asdict(js))
    work = []
    for spec in cfg.methods:
        if spec.label == ref:
            continue
        for pid in cfg.preferences:
            for key, rec in gens.items():
                if rec["model"] != model.name or rec["method"] != spec.label or rec["preference_id"] != pid:
                    continue
                rkey = item_key(model.name, ref, pid, rec["prompt_id"])
                other = gens.get(rkey)
                if other is None:
                    continue
                jkey = f"{key}||{ref}"
                old = judged.get(jkey)
                if old and old.get("judge") == jid and old.get("texts") == _hash([rec["text"], other["text"]]):
                    continue
                work.append((jkey, rec, other))
    if not work:
        return
    if js.kind == "http":
        judge: Any = HTTPJudge(js.base_url or "", js.judge_model or "", api_key_env=js.api_key_env,
                               cache_dir=js.cache_dir or output_dir / "judge_cache", retries=js.retries,
                               concurrency=js.concurrency)
    else:
        jm = _judge_model(cfg, model, main, models_cache)
        judge = LocalJudge(build_backend(Resources(model=jm), []), labels=tuple(js.labels), tie_margin=js.tie_margin,
                           batch_size=js.batch_size)
    step = max(1, js.batch_size // 2)
    for s in tqdm(range(0, len(work), step), desc=f"judge {model.name} vs {ref}", unit="batch", leave=False):
        chunk = work[s : s + step]
        outs = judge_pairs(judge, [r["prompt"] for _, r, _ in chunk], [r["text"] for _, r, _ in chunk],
                           [o["text"] for _, _, o in chunk], [r["preference"] for _, r, _ in chunk])
        recs = [{"key": jkey, "model": model.name, "method": r["method"], "reference": ref,
                 "preference_id": r["preference_id"], "prompt_id": r["prompt_id"], "judge": jid,
                 "texts": _hash([r["text"], o["text"]]), **out.to_dict()}
                for (jkey, r, o), out in zip(chunk, outs)]
        _append(jpath, recs)
        for rec in recs:
            judged[rec["key"]] = rec


def _judge_model(cfg: EvalConfig, model: ModelSpec, main: Any, cache: dict[str, Any]) -> Any:
    name = cfg.judge.model if cfg.judge else None
    if name is None or name == model.name:
        return main
    for m in cfg.models:
        if m.name == name:
            return _load(m, cache)
    if name not in cache:
        cache[name] = load_model(expand_path(name), device=_device(model))
    return cache[name]


def _load(model: ModelSpec, cache: dict[str, Any]) -> Any:
    if model.name not in cache:
        path = expand_path(model.path) if model.path != "smollm2" else model.path
        cache[model.name] = load_model(path, gguf_file=model.gguf_file, dtype=model.dtype, device=_device(model))
    return cache[model.name]


# ----------------------------------------------------------------------------- the run
def run_eval(cfg: EvalConfig, *, output_dir: str | Path | None = None, models: dict[str, Any] | None = None,
             max_batches: int | None = None, progress: Callable[[str], None] | None = None) -> EvalResult:
    """Run (or resume) an evaluation and write its outputs.

    Args:
        cfg: the parsed config.
        output_dir: overrides ``cfg.output_dir``.
        models: already loaded models by ``models[].name`` (``LoadedModel``); others are loaded.
        max_batches: stop generating after this many batches (an incremental run; the rest is
            resumed by the next call). Metrics and tables cover what exists.
        progress: receives one-line status messages.
    """

    say = progress or (lambda s: None)
    out = Path(output_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(expand_path(cfg.prompts_path), limit=cfg.prompts_limit)
    gpath, jpath = out / "generations.jsonl", out / "judgments.jsonl"
    _repair_tail(gpath)
    _repair_tail(jpath)
    done = {r["key"]: r for r in read_jsonl_records(gpath)}
    judged = {r["key"]: r for r in read_jsonl_records(jpath)}
    say(f"{len(done)} generations already in {gpath}")
    cache: dict[str, Any] = dict(models or {})
    budget = [-1 if max_batches is None else max_batches]
    env_methods: dict[str, dict] = {}
    if (out / "run.json").is_file():  # keep the resolved configs of methods a resumed run does not rebuild
        with contextlib.suppress(ValueError):
            env_methods.update(json.loads((out / "run.json").read_text(encoding="utf-8")).get("methods") or {})
    n_new, env = 0, None
    for model in cfg.models:
        main = _load(model, cache)
        env = environment_record(main.model)
        for spec in cfg.methods:
            n_new += _generate_method(cfg, model, main, spec, prompts, done, gpath, budget, env_methods)
        if cfg.judge is not None and budget[0] != 0:
            current = {g["key"]: g for g in _current(cfg, prompts, done)}  # not other runs' prompts
            _judge_all(cfg, model, main, current, jpath, judged, out, cache)
    say(f"{n_new} items generated in this run")
    gens = _current(cfg, prompts, done)
    judgments = _current_judgments(cfg, gens, judged)
    pair_rows = _pair_metrics(cfg) if budget[0] != 0 else []
    summary = summarize(cfg, gens, judgments)
    md = write_report(cfg, out, gens, summary, pair_rows)
    record = {"config": cfg.raw, "name": cfg.name, "methods": env_methods, "environment": env or environment_record(),
              "items": len(gens), "expected_items": len(cfg.models) * len(cfg.methods) * len(cfg.preferences) * len(prompts),
              "complete": len(gens) == len(cfg.models) * len(cfg.methods) * len(cfg.preferences) * len(prompts)}
    (out / "run.json").write_text(json.dumps(_jsonable(record), indent=1) + "\n", encoding="utf-8")
    return EvalResult(out, gens, judgments, summary, md, n_new)


def _current(cfg: EvalConfig, prompts: list[PromptRecord], done: dict[str, dict]) -> list[dict]:
    """The generations of this config, in config order (stale keys of other configs left out)."""
    out = []
    for model in cfg.models:
        for spec in cfg.methods:
            for pid in cfg.preferences:
                for pr in prompts:
                    rec = done.get(item_key(model.name, spec.label, pid, pr.id))
                    if rec is not None:
                        out.append(rec)
    return out


def _current_judgments(cfg: EvalConfig, gens: list[dict], judged: dict[str, dict]) -> list[dict]:
    """Judgments made by the configured judge on the current texts of both sides."""
    if cfg.judge is None:
        return []
    jid = _hash(asdict(cfg.judge))
    by_key = {g["key"]: g for g in gens}
    out = []
    for g in gens:
        j = judged.get(f"{g['key']}||{cfg.judge.reference}")
        if j is None or j.get("judge") != jid:
            continue
        ref = by_key.get(item_key(g["model"], cfg.judge.reference, g["preference_id"], g["prompt_id"]))
        if ref is not None and j.get("texts") == _hash([g["text"], ref["text"]]):
            out.append(j)
    return out


def _pair_metrics(cfg: EvalConfig) -> list[dict[str, Any]]:
    rows = []
    for pm in cfg.pair_metrics:
        pairs = load_pairs(expand_path(str(pm.pairs["path"])), layout=pm.pairs.get("layout", "auto"), on_error="skip")
        if pm.pairs.get("user") is not None:
            pairs = [p for p in pairs if p.user_id == pm.pairs["user"]]
        if pm.pairs.get("limit"):
            pairs = pairs[: int(pm.pairs["limit"])]
        scorer = build_scorer(pm.scorer)
        rows.append({"name": pm.name, "pairs": len(pairs), "preference_accuracy": preference_accuracy(scorer, pairs)})
    return rows
