"""Metric tables of an evaluation run: long-format summary rows, Markdown and CSV, plots.

Summary rows (one per model × method × preference × metric, preference ``all`` pooling every
preference) carry ``mean``, ``ci`` (half-width of the 95% normal-approximation interval) and ``n``;
win-rate rows add ``wins``, ``ties``, ``losses`` and ``invalid``. The Markdown report holds, per
model: the *target* table (each preference scored on the metrics its target names, with the goal
arrow; the best method per column in bold), every metric by preference, and win rates by preference.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from personalign.eval.config import EvalConfig, expand_path
from personalign.eval.judge import aggregate
from personalign.eval.metrics import Metric, get_metric, mean_ci
from personalign.eval.plots import plot_preference_bars, plot_tradeoff
from personalign.eval.reward import build_scorer

__all__ = ["summarize", "write_report", "metric_objects", "format_cell"]

_ARROW = {"higher": "↑", "lower": "↓"}
CSV_FIELDS = ["model", "method", "preference", "metric", "mean", "ci", "n", "higher_is_better", "wins", "ties",
              "losses", "invalid"]


def metric_objects(cfg: EvalConfig) -> dict[str, Metric]:
    """Configured metrics by name, reward scorers built and bound."""

    out = {}
    for spec in cfg.metrics:
        m = get_metric(spec.metric)
        if spec.scorer is not None:
            sc = dict(spec.scorer)
            if "path" in sc:
                sc["path"] = expand_path(str(sc["path"]))
            m = m.bind(scorer=build_scorer(sc))
        out[spec.name] = m
    return out


def summarize(cfg: EvalConfig, gens: list[dict[str, Any]], judgments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format rows; per-response metric values are also stored in each generation's ``metrics``."""
    metrics = metric_objects(cfg)
    prompts, texts = [g["prompt"] for g in gens], [g["text"] for g in gens]
    for name, m in metrics.items():
        vals = m.compute(prompts, texts, [g.get("preference") for g in gens]) if gens else []
        for g, v in zip(gens, vals):
            g.setdefault("metrics", {})[name] = v
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for g in gens:
        groups[(g["model"], g["method"], g["preference_id"])].append(g)
        groups[(g["model"], g["method"], "all")].append(g)
    rows = []
    for (model, method, pref), items in groups.items():
        for name, m in metrics.items():
            mean, ci, n = mean_ci([it["metrics"][name] for it in items])
            rows.append({"model": model, "method": method, "preference": pref, "metric": name, "mean": mean, "ci": ci,
                         "n": n, "higher_is_better": m.higher_is_better})
    if cfg.judge is not None:
        jg: dict[tuple, list[str]] = defaultdict(list)
        for j in judgments:
            jg[(j["model"], j["method"], j["preference_id"])].append(j["result"])
            jg[(j["model"], j["method"], "all")].append(j["result"])
        for (model, method, pref), res in jg.items():
            w = aggregate(res)
            rows.append({"model": model, "method": method, "preference": pref, "metric": f"win_rate_vs_{cfg.judge.reference}",
                         "mean": w.win_rate, "ci": w.ci, "n": w.n, "higher_is_better": True, "wins": w.wins,
                         "ties": w.ties, "losses": w.losses, "invalid": w.invalid})
    order = {m.label: i for i, m in enumerate(cfg.methods)}
    porder = {p: i for i, p in enumerate([*cfg.preferences, "all"])}
    rows.sort(key=lambda r: (r["model"], order.get(r["method"], 99), porder.get(r["preference"], 99), r["metric"]))
    return rows


def format_cell(mean: float, ci: float, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None and math.isfinite(ci) else "")


def _lookup(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["model"], r["method"], r["preference"], r["metric"]): r for r in rows}


def _target_table(cfg: EvalConfig, model: str, rows: dict[tuple, dict]) -> list[str]:
    cols: list[tuple[str, str, str]] = [(p, m, goal) for p, tg in cfg.targets.items() for m, goal in tg.items()]
    if "diversity" in [s.name for s in cfg.metrics]:
        cols.append(("all", "diversity", "higher"))
    if cfg.judge is not None:
        cols.append(("all", f"win_rate_vs_{cfg.judge.reference}", "higher"))
    if not cols:
        return []
    best: dict[int, float] = {}
    for i, (p, m, goal) in enumerate(cols):
        vals = [rows[(model, s.label, p, m)]["mean"] for s in cfg.methods if (model, s.label, p, m) in rows]
        vals = [v for v in vals if math.isfinite(v)]
        if vals and not m.startswith("win_rate"):
            best[i] = max(vals) if goal == "higher" else min(vals)
    head = "| method | " + " | ".join(f"{p} {m.replace('_vs_', ' vs ')} {_ARROW[g]}" for p, m, g in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for s in cfg.methods:
        cells = []
        for i, (p, m, _) in enumerate(cols):
            r = rows.get((model, s.label, p, m))
            if r is None:
                cells.append("–")
                continue
            digits = 1 if m == "length" else 2
            c = format_cell(r["mean"], r["ci"], digits)
            if m.startswith("win_rate"):
                c += f" ({r['wins']}/{r['ties']}/{r['losses']})"
            if i in best and r["mean"] == best[i] and len(cfg.methods) > 1:
                c = f"**{c}**"
            cells.append(c)
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return lines


def _metric_table(cfg: EvalConfig, model: str, rows: dict[tuple, dict]) -> list[str]:
    names = [s.name for s in cfg.metrics]
    head = "| method | preference | " + " | ".join(
        f"{n} {'↑' if get_metric(s.metric).higher_is_better else '↓'}" for n, s in zip(names, cfg.metrics)) + " |"
    lines = [head, "|---" * (len(names) + 2) + "|"]
    for s in cfg.methods:
        for p in [*cfg.preferences, "all"]:
            if (model, s.label, p, names[0]) not in rows:
                continue
            cells = [format_cell(rows[(model, s.label, p, n)]["mean"], rows[(model, s.label, p, n)]["ci"],
                                 1 if n == "length" else 2) for n in names]
            lines.append(f"| {s.label} | {p} | " + " | ".join(cells) + " |")
    return lines


def _win_table(cfg: EvalConfig, model: str, rows: dict[tuple, dict]) -> list[str]:
    assert cfg.judge is not None
    metric = f"win_rate_vs_{cfg.judge.reference}"
    prefs = [*cfg.preferences, "all"]
    lines = ["| method | " + " | ".join(prefs) + " |", "|---" * (len(prefs) + 1) + "|"]
    for s in cfg.methods:
        if s.label == cfg.judge.reference:
            continue
        cells = []
        for p in prefs:
            r = rows.get((model, s.label, p, metric))
            cells.append("–" if r is None else f"{100 * r['mean']:.0f}% ({r['wins']}/{r['ties']}/{r['losses']})")
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return lines


def write_report(cfg: EvalConfig, out: Path, gens: list[dict], summary: list[dict],
                 pair_rows: list[dict] | None = None) -> str:
    """Write ``summary.csv``, ``results.md`` and the plots; return the Markdown."""

    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in summary:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    rows = _lookup(summary)
    g = cfg.generation
    n_prompts = len({x["prompt_id"] for x in gens})
    md = [f"# {cfg.name}", "",
          f"{n_prompts} prompts × {len(cfg.preferences)} preferences ({', '.join(cfg.preferences)}) × "
          f"{len(cfg.methods)} methods; max_new_tokens={g.max_new_tokens}, temperature={g.temperature}, "
          f"top_p={g.top_p}, seed={g.seed}. Cells: mean ± 95% CI half-width."]
    if cfg.judge is not None:
        md.append(f"Win rate vs `{cfg.judge.reference}` ({cfg.judge.kind} judge, both orders): (wins + ties/2) / n, "
                  "with (wins/ties/losses).")
    for model in [m.name for m in cfg.models]:
        t = _target_table(cfg, model, rows)
        if t:
            md += ["", f"## {model}: each preference on its target", "", *t]
        md += ["", f"## {model}: every metric by preference", "", *_metric_table(cfg, model, rows)]
        if cfg.judge is not None:
            md += ["", f"## {model}: win rate vs {cfg.judge.reference} by preference", "", *_win_table(cfg, model, rows)]
    if pair_rows:
        md += ["", "## Preference accuracy", "", "| scorer / pairs | pairs | accuracy |", "|---|---|---|"]
        md += [f"| {r['name']} | {r['pairs']} | {r['preference_accuracy']:.3f} |" for r in pair_rows]
    plots = []
    for model in [m.name for m in cfg.models]:
        for name in cfg.bar_plots:
            p = out / f"bars_{model}_{name}.png"
            if plot_preference_bars(summary, model, name, [m.label for m in cfg.methods], list(cfg.preferences), p):
                plots.append(p.name)
        if cfg.tradeoff:
            p = out / f"tradeoff_{model}_{cfg.tradeoff[0]}_{cfg.tradeoff[1]}.png"
            if plot_tradeoff(summary, model, cfg.tradeoff[0], cfg.tradeoff[1], [m.label for m in cfg.methods],
                             list(cfg.preferences), p):
                plots.append(p.name)
    if plots:
        md += ["", "Plots: " + ", ".join(plots)]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    return text
