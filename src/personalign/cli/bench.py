"""``personalign bench``: ms/token and peak memory of methods vs plain ``model.generate``, one run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from personalign.assembly import Resources, build_backend
from personalign.cli.common import add_model_options, load_from_args
from personalign.environment import environment_record
from personalign.eval.bench import format_scaling, format_table, format_targets, resolve_methods, run_bench

HELP = "Time decoding methods against plain model.generate (same prompts, same run)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP, description=HELP)
    add_model_options(p)
    p.add_argument("--methods", default="base,preference_prompting",
                   help="comma-separated method names, or 'all' for every registered method")
    p.add_argument("--batch-size", type=int, action="append", metavar="B",
                   help="requests per batch, each with a different preference (repeatable; default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--random-weights", action="store_true",
                   help="build --model (a preset: llama3-8b, llama3-1b, smollm2-135m, or a config.json) with random weights")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer for --random-weights (default: the embedded SmolLM2)")
    p.add_argument("--persrm", metavar="DIR", help="a trained PersRM for pad (default: an untrained one, timing only)")
    p.add_argument("--reward-model", metavar="PATH",
                   help="a sequence-classification reward model for args/best_of_n (default: a fresh head on the backbone)")
    p.add_argument("--steer-model", metavar="PATH",
                   help="a small steering model for drift (with --random-weights: a preset such as llama3-1b); "
                        "default: the LLM steers itself")
    p.add_argument("--decode-linears", choices=("auto", "tuned", "stock", "both"), default="auto",
                   help="the engine's decode-step linears: tuned (the fastest exact formulation per shape, timed on "
                        "first use), stock (nn.Linear as is), auto (tuned on the CPU; the default, also set by "
                        "PERSONALIGN_DECODE_LINEARS), both (every method tuned and, as '<method> (stock linears)', "
                        "stock, in the same interleaved runs). model.generate always runs stock")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    methods = resolve_methods(args.methods)
    main = load_from_args(args)
    # trained helpers for the presets (eval.bench.bench_method) instead of untrained ones
    options = {"persrm": args.persrm, "reward_model": args.reward_model,
               "steer": load_from_args(args, args.steer_model) if args.steer_model else None}
    linears = {"auto": None, "tuned": True, "stock": False, "both": True}[args.decode_linears]
    backend = build_backend(Resources(model=main, decode_linears=linears), [])
    stock = build_backend(Resources(model=main, decode_linears=False), []) if args.decode_linears == "both" else None
    env = environment_record(main.model)
    all_rows = []
    for b in args.batch_size or [1]:
        rows = run_bench(main, backend, methods, batch_size=b, max_new_tokens=args.max_new_tokens,
                         repeats=args.repeats, progress=lambda s: print(s, file=sys.stderr, flush=True),
                         options=options, stock_backend=stock)
        all_rows.extend(rows)
    tuned = backend.linears.summary() if backend.linears is not None else None
    if args.json:
        for r in all_rows:
            print(json.dumps({**dataclasses.asdict(r), "model": main.name, "environment": env,
                              "decode_linears": "tuned" if tuned else "stock", "decode_linear_choices": tuned}))
        return 0
    print(f"model: {main.name}  device: {env['device']}  torch {env['torch']}  transformers {env['transformers']}")
    if tuned:
        picked = sorted({c for c in tuned["choices"].values() if c != "stock"})
        print(f"decode linears: tuned ({len(tuned['choices'])} shapes, {tuned['tuned_seconds']:.1f} s tuning in the "
              f"warm-ups; non-stock: {', '.join(picked) or 'none'}); model.generate runs stock "
              "(--decode-linears stock to compare)")
    else:
        print("decode linears: stock (nn.Linear as is)")
    if stock is not None:
        print("rows '<method> (stock linears)': the same method with the stock nn.Linear, in the same runs")
    print(format_table(all_rows))
    scaling = format_scaling(all_rows)
    if scaling:
        print("\n" + scaling)
    targets = format_targets(all_rows)
    if targets:
        print("\nTargets:\n" + targets)
    return 0
