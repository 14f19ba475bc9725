"""PNG plots of an evaluation summary (matplotlib, Agg backend; no display needed).

* ``plot_preference_bars``: one metric; groups = preferences, one bar per method, error bars =
  the 95% CI half-widths of the summary rows.
* ``plot_tradeoff``: two metrics; one point per (method, preference) with CI error bars on both
  axes, points of a method in one colour and joined in preference order, like the papers' Pareto
  figures; the non-dominated points (under each metric's ``higher_is_better``) are ringed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_preference_bars", "plot_tradeoff", "pareto_front"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(summary: Sequence[dict], model: str, metric: str) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["preference"]): r for r in summary if r["model"] == model and r["metric"] == metric}


def _num(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def _save(plt: Any, fig: Any, ax: Any, path: str | Path) -> None:
    """Legend, layout, write ``path`` (110 dpi) and free the figure: every plot ends the same way."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_preference_bars(summary: Sequence[dict], model: str, metric: str, methods: Sequence[str],
                         preferences: Sequence[str], path: str | Path) -> bool:
    """Bars of ``metric`` per preference and method; False (nothing written) when there is no data."""
    rows = _rows(summary, model, metric)
    if not rows:
        return False
    plt = _plt()
    prefs = [p for p in [*preferences, "all"] if any((m, p) in rows for m in methods)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(prefs) * max(1, len(methods)) * 0.5 + 2), 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(prefs))]
        ys = [_num(rows[(m, p)]["mean"]) if (m, p) in rows else float("nan") for p in prefs]
        es = [_num(rows[(m, p)]["ci"]) if (m, p) in rows else float("nan") for p in prefs]
        es = [0.0 if math.isnan(e) else e for e in es]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=m)
    hib = next(iter(rows.values())).get("higher_is_better")
    ax.set_xticks(range(len(prefs)), prefs)
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)" if hib is not None else metric)
    ax.set_title(f"{model}: {metric} by preference (95% CI)")
    _save(plt, fig, ax, path)
    return True


def pareto_front(points: Sequence[tuple[float, float]], higher: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the non-dominated points (NaN points are never on the front)."""
    sx, sy = (1 if higher[0] else -1), (1 if higher[1] else -1)
    pts = [(sx * x, sy * y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(pts):
        if math.isnan(x) or math.isnan(y):
            continue
        dominated = any((a >= x and b >= y and (a > x or b > y)) for j, (a, b) in enumerate(pts)
                        if j != i and not (math.isnan(a) or math.isnan(b)))
        if not dominated:
            front.append(i)
    return front


def plot_tradeoff(summary: Sequence[dict], model: str, x_metric: str, y_metric: str, methods: Sequence[str],
                  preferences: Sequence[str], path: str | Path) -> bool:
    """Scatter of (x_metric, y_metric) means per method and preference; False when there is no data."""
    rx, ry = _rows(summary, model, x_metric), _rows(summary, model, y_metric)
    if not rx or not ry:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    pts, labels = [], []
    for m in methods:
        xs, ys = [], []
        for p in preferences:
            if (m, p) not in rx or (m, p) not in ry:
                continue
            x, y = _num(rx[(m, p)]["mean"]), _num(ry[(m, p)]["mean"])
            ex, ey = _num(rx[(m, p)]["ci"]), _num(ry[(m, p)]["ci"])
            xs.append(x)
            ys.append(y)
            pts.append((x, y))
            labels.append(p)
            ax.errorbar([x], [y], xerr=[0 if math.isnan(ex) else ex], yerr=[0 if math.isnan(ey) else ey], fmt="none",
                        alpha=0.35, color="gray")
        line = ax.plot(xs, ys, marker="o", linestyle=":", label=m)[0]
        for x, y, p in zip(xs, ys, [p for p in preferences if (m, p) in rx and (m, p) in ry]):
            ax.annotate(p, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    hx = next(iter(rx.values())).get("higher_is_better", True)
    hy = next(iter(ry.values())).get("higher_is_better", True)
    for i in pareto_front(pts, (bool(hx), bool(hy))):
        ax.scatter([pts[i][0]], [pts[i][1]], s=160, facecolors="none", edgecolors="black", linewidths=0.8)
    ax.set_xlabel(f"{x_metric} ({'higher' if hx else 'lower'} is better)")
    ax.set_ylabel(f"{y_metric} ({'higher' if hy else 'lower'} is better)")
    ax.set_title(f"{model}: {x_metric} vs {y_metric} per preference (ringed: non-dominated)")
    _save(plt, fig, ax, path)
    return True
