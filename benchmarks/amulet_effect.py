"""Effect of Amulet and Linear Alignment on real prompts, measured with offline style metrics.

SmolLM2-135M-Instruct, the first N prompts of Personal Preference Eval, the eight Amulet preference
dimensions (``"Your answer should be {} as much as possible."`` as the system message), and four
methods: base (no preference), preference_prompting, linear_alignment, amulet (paper defaults).
Greedy decoding, EOS honoured, ``--max-new-tokens`` per answer. For each preference the table
reports the metric that proxies it (see ``personalign.eval.style_metrics``), then a full table.

    PYTHONPATH=src nice -n 10 python benchmarks/amulet_effect.py --n-prompts 20 --max-new-tokens 64 \\
        --out benchmarks/results/amulet_effect.json > benchmarks/results/amulet_effect.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from personalign.decoding.loop import generate
from personalign.environment import environment_record
from personalign.eval.style_metrics import METRICS, mean_metrics
from personalign.methods import get_method
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.loading import load_model

SHARED = Path(os.environ.get("PERSONALIGN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
METHODS = ["base", "preference_prompting", "linear_alignment", "amulet"]  # table order
RUN_ORDER = ["amulet", "linear_alignment", "preference_prompting"]  # most wanted first if cut short
# preference -> (metric, direction wanted: +1 higher, -1 lower)
# (the five the evaluation asks for first, so a cut-short run still has them)
PRIMARY = {
    "concise": ("words", -1),
    "verbose": ("words", +1),
    "formal": ("formality", +1),
    "creative": ("mattr", +1),
    "uplifting": ("sentiment", +1),
    "complex": ("fk_grade", +1),
    "pleasant": ("sentiment", +1),
    "sycophantic": ("sentiment", +1),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--preferences", default=",".join(PRIMARY), help="comma-separated subset of the eight")
    ap.add_argument("--batch-size", type=int, default=80, help="requests per batch")
    ap.add_argument("--summarize", type=Path, metavar="JSON",
                    help="only recompute the tables from a previous run's --out file (no model)")
    ap.add_argument("--out", type=Path, help="JSON file for every generation and the summary")
    args = ap.parse_args(argv)
    if args.summarize:
        run = json.loads(args.summarize.read_text())
        prefs, methods = list(run["texts"]), [m for m in METHODS if m in run["texts"][next(iter(run["texts"]))]]
        summary = summarize(run["texts"], run["finish_reasons"], prefs, methods)
        print(format_tables(summary, prefs, len(run["questions"]), run["config"]["max_new_tokens"], methods))
        return 0
    torch.manual_seed(0)

    data = json.loads((SHARED / "data/prompts/personal_preference_eval_preference_data.json").read_text())
    prefs_file = json.loads((SHARED / "data/prompts/amulet_preferences.json").read_text())
    questions = [d["question"].strip() for d in data[: args.n_prompts]]
    prefs = [p for p in args.preferences.split(",") if p]
    unknown = [p for p in prefs if p not in prefs_file["preferences"]]
    if unknown:
        raise SystemExit(f"unknown preference(s) {unknown}; valid: {prefs_file['preferences']}")

    lm = load_model(args.model)
    backend = HFBackend(lm.model, lm.tokenizer)
    t0 = time.time()
    texts: dict[str, dict[str, list[str]]] = {}
    finish: dict[str, dict[str, list[str]]] = {}
    base_out = generate(get_method("base")(), [Request(prompt=q) for q in questions], backend,
                        max_new_tokens=args.max_new_tokens)
    def write(done: list[str]) -> dict:
        summary = summarize(texts, finish, prefs, done)
        if args.out:  # rewritten after every method, so a cut-short run keeps what it did
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "config": vars(args) | {"out": str(args.out)}, "environment": environment_record(lm.model),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": time.time() - t0,
                "methods_done": done, "questions": questions, "summary": summary, "texts": texts,
                "finish_reasons": finish,
            }, indent=1, ensure_ascii=False))
        return summary

    for p in prefs:
        texts[p] = {"base": [o.text for o in base_out]}
        finish[p] = {"base": [o.finish_reason for o in base_out]}
    # Every (preference, prompt) pair of a method in a few large batches: on a CPU a decode step is
    # bound by reading the weights, so one step for many rows costs little more than for a few.
    pairs = [(p, q) for p in prefs for q in questions]
    for i, m in enumerate(RUN_ORDER):
        outs = []
        for s in range(0, len(pairs), args.batch_size):
            chunk = pairs[s : s + args.batch_size]
            reqs = [Request(prompt=q, preference=prefs_file["template"].format(p)) for p, q in chunk]
            outs += generate(get_method(m)(), reqs, backend, max_new_tokens=args.max_new_tokens)
            print(f"[{time.time() - t0:6.0f}s] {m} {s + len(chunk)}/{len(pairs)}", file=sys.stderr, flush=True)
        for j, p in enumerate(prefs):
            texts[p][m] = [o.text for o in outs[j * len(questions) : (j + 1) * len(questions)]]
            finish[p][m] = [o.finish_reason for o in outs[j * len(questions) : (j + 1) * len(questions)]]
        summary = write(["base", *RUN_ORDER[: i + 1]])
    print(format_tables(summary, prefs, len(questions), args.max_new_tokens))
    return 0


def echoes_instruction(text: str) -> bool:
    """The answer repeats the preference instruction itself (a failure of over-strong contrast)."""
    low = text.lower()
    return "your answer" in low or "as much as possible" in low


def summarize(texts: dict, finish: dict, prefs: list[str], methods: list[str]) -> dict:
    summary = {p: {m: mean_metrics(texts[p][m]) for m in methods} for p in prefs}
    for p in prefs:
        for m in methods:
            n = len(texts[p][m])
            summary[p][m]["eos_rate"] = sum(r == "stop" for r in finish[p][m]) / n
            summary[p][m]["echo_rate"] = sum(echoes_instruction(t) for t in texts[p][m]) / n
    return summary


def format_tables(summary: dict, prefs: list[str], n: int, max_new: int, methods: list[str] = METHODS) -> str:
    head = "| preference | metric | " + " | ".join(methods) + " |"
    lines = [f"Primary metric per preference (mean over {n} prompts; ↑/↓ = direction the preference asks for):",
             "", head, "|" + "---|" * (len(methods) + 2)]
    for p in prefs:
        metric, sign = PRIMARY[p]
        vals = [summary[p][m][metric] for m in methods]
        best = max(range(len(vals)), key=lambda i: sign * vals[i])
        cells = [f"**{v:.3f}**" if i == best else f"{v:.3f}" for i, v in enumerate(vals)]
        lines.append(f"| {p} | {metric} {'↑' if sign > 0 else '↓'} | " + " | ".join(cells) + " |")
    lines += ["", f"All metrics (eos_rate = share of answers that ended before {max_new} tokens; echo_rate = "
              "share that repeat the instruction, 'your answer' or 'as much as possible'):", "",
              "| preference | method | " + " | ".join(METRICS) + " | eos_rate | echo_rate |",
              "|" + "---|" * (len(METRICS) + 4)]
    for p in prefs:
        for m in methods:
            s = summary[p][m]
            lines.append(f"| {p} | {m} | " + " | ".join(f"{s[k]:.3f}" for k in METRICS)
                         + f" | {s['eos_rate']:.2f} | {s['echo_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
