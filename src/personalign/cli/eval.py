"""``personalign eval --config FILE.yaml``: generate, score, judge and tabulate (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from personalign.eval.config import load_eval_config
from personalign.eval.harness import run_eval

HELP = "Evaluate methods × preferences × prompts from a YAML config (resumable); tables, plots, run record."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--config", required=True, metavar="FILE", help="evaluation config (YAML); see eval/config.py")
    p.add_argument("--output-dir", metavar="DIR", help="override the config's output_dir")
    p.add_argument("--limit", type=int, metavar="N", help="override prompts.limit (first N prompts)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="override generation.max_new_tokens")
    p.add_argument("--max-batches", type=int, metavar="N",
                   help="stop after N generation batches (resume later by running the same command)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:


    cfg = load_eval_config(args.config)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"`--limit` must be >= 1, got {args.limit}.")
        cfg = dataclasses.replace(cfg, prompts_limit=args.limit)
    if args.max_new_tokens is not None:
        cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_new_tokens=args.max_new_tokens))
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"`--max-batches` must be >= 1, got {args.max_batches}.")
    res = run_eval(cfg, output_dir=args.output_dir, max_batches=args.max_batches,
                   progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(res.markdown)
    print(f"outputs in {res.output_dir}", file=sys.stderr)
    return 0
