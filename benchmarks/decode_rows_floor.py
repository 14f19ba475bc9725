"""The cost floor of a multi-view method: one cached decode step of R rows vs 1 row, raw model only,
with the stock ``nn.Linear`` and with the engine's decode linears (``views.linears``: the tuned
formulations where the step check keeps them, else stock).

Drift with m attributes and small = large runs R = m + 2 rows per step, a two-view method 2; no
implementation of them can be faster than this ratio on the same machine and path.

    OMP_NUM_THREADS=2 python benchmarks/decode_rows_floor.py --rows 1,2,3,9,16

Each path is tuned first (its choices printed with ``--choices``), then both are timed in
alternation, so the stock and tuned columns come from the same minutes of the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def step_seconds(model, rows: int, prompt_len: int, steps: int, linears=None) -> float:
    """Median seconds of one cached one-token step of ``rows`` rows (``linears``: the tuned path)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(100, 1000, (rows, prompt_len), generator=gen)
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = torch.randint(100, 1000, (rows, 1), generator=gen)
        for _ in range(steps):
            ctx = linears.active(model, rows) if linears is not None else contextlib.nullcontext()
            t = time.perf_counter()
            with ctx:
                out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.log_softmax(out.logits.float(), -1)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="1,2,3,9", help="comma-separated row counts (1 is always measured)")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--choices", action="store_true", help="print the tuned formulation per shape")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    from personalign.views.linears import DecodeLinears
    from personalign.views.loading import load_model

    rows = sorted({1, *(int(r) for r in args.rows.split(","))})
    model = load_model(args.model).model
    linears = DecodeLinears()
    for r in rows:  # tune every shape and settle each row count's step check (as the engine does) first
        step_seconds(model, r, args.prompt_len, 2 * linears.trial_steps + 3, linears)
        step_seconds(model, r, args.prompt_len, 2)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for r in rows:
            for path, lin in (("stock", None), ("tuned", linears)):
                times.setdefault((path, r), []).append(step_seconds(model, r, args.prompt_len, args.steps, lin))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "threads": torch.get_num_threads(), "fingerprint": linears.fingerprint,
              "rows": {r: {"stock_ms": round(ms["stock", r], 2), "tuned_ms": round(ms["tuned", r], 2),
                           "stock_ratio": round(ms["stock", r] / ms["stock", 1], 3),
                           "tuned_ratio": round(ms["tuned", r] / ms["tuned", 1], 3),
                           "tuned_vs_stock": round(ms["tuned", r] / ms["stock", r], 3)} for r in rows},
              "tuning": linears.summary()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, {result['threads']} threads, {linears.fingerprint}")
    print("| rows | stock ms | stock / 1 row | tuned ms | tuned / 1 row | tuned / stock |")
    print("|---|---|---|---|---|---|")
    for r, v in result["rows"].items():
        print(f"| {r} | {v['stock_ms']:.1f} | {v['stock_ratio']:.2f} | {v['tuned_ms']:.1f} | {v['tuned_ratio']:.2f} "
              f"| {v['tuned_vs_stock']:.2f} |")
    print(f"tuning: {linears.tuned_seconds:.1f} s, weight copies {linears.extra_used / 2**20:.0f} MiB; "
          f"path kept per row count: " + ", ".join(f"{r}: {v['path']}" for r, v in result["tuning"]["steps"].items()))
    if args.choices:
        for row in linears.table():
            print(f"  {row['shape']}: {row['choice']}  " + " ".join(f"{k}={v:.3f}" for k, v in row["ms"].items()))


if __name__ == "__main__":
    main()
