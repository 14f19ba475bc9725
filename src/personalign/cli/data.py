"""``personalign data``: convert and check evaluation data files (prompts, preference pairs)."""

from __future__ import annotations

import argparse
import sys

from personalign.eval.datasets import (
    check_pairs,
    convert,
    detect_layout,
    load_pairs,
    load_prompts,
    read_records,
)

HELP = "Convert between data layouts (prompts, trl, dsp, hh) and check pair files."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help=HELP, description=HELP)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("convert", help="convert INPUT to layout --to in OUTPUT (JSONL, or a JSON array for .json)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", required=True, choices=["prompts", "trl", "dsp", "hh"])
    c.add_argument("--from", dest="layout", default="auto", choices=["auto", "prompts", "trl", "dsp", "hh"])
    c.add_argument("--users", default="academy,business,entertainment,literature",
                   help="DSP users (domains) to make pairs for")
    c.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed pair records and pairs whose chosen and rejected are the same text (each "
                        "is listed) instead of stopping at the first")
    c.set_defaults(func=run_convert)
    k = dsub.add_parser("check", help="validate a file; report duplicate, contradictory and degenerate pairs")
    k.add_argument("input")
    k.add_argument("--from", dest="layout", default="auto", choices=["auto", "prompts", "trl", "dsp", "hh"])
    k.set_defaults(func=run_check)


def run_convert(args: argparse.Namespace) -> int:
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    errors: list[str] = []
    n, report = convert(args.input, args.output, to=args.to, layout=args.layout, users=users,
                        on_error="skip" if args.skip_invalid else "raise", errors=errors)
    for e in errors:
        print(f"skipped: {e}", file=sys.stderr)
    print(f"wrote {n} {args.to} records to {args.output}", file=sys.stderr)
    if report is not None:
        print(report.summary(), file=sys.stderr)
    return 0


def run_check(args: argparse.Namespace) -> int:
    layout = args.layout
    if layout == "auto":
        layout = detect_layout(next(iter(read_records(args.input)))[1])
    if layout == "prompts":
        print(f"{len(load_prompts(args.input))} prompts, all valid.")
        return 0
    report = check_pairs(load_pairs(args.input, layout=layout))
    print(report.summary())
    return 0 if report.ok else 1
