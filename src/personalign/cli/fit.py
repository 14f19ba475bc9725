"""``personalign fit <method>``: fit a user's profile from preference pairs.

``personalign fit drift --pairs FILE.jsonl --model PATH --out PROFILE.json`` scores every pair under
the base and attribute prompts with the (small) model and writes the Drift profile;
``personalign fit drift --report PROFILE.json`` prints the interpretability summary and writes the
bar chart next to it (``PROFILE.png``, or ``--chart``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from personalign.assembly import Resources, build_backend
from personalign.cli.common import add_model_options, load_from_args
from personalign.personas.attributes import default_pool, load_attribute_file
from personalign.personas.drift import FIT_RESPONSE_TOKENS, DriftProfile, fit_pairs, fit_profile

HELP = "Fit a user's profile from preference pairs (drift)."
TARGETS = ("drift",)


class _WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help=HELP, description=HELP)
    p.add_argument("target", choices=TARGETS, help="what to fit")
    add_model_options(p, required=False)
    p.add_argument("--pairs", metavar="FILE.jsonl", help='preference pairs, one {"prompt","chosen","rejected"} per line')
    p.add_argument("--out", metavar="PROFILE.json", help="where to write the profile")
    p.add_argument("--attributes", metavar="FILE", help="JSON/YAML file that adds, removes or replaces attributes")
    p.add_argument("--top-m", type=int, metavar="M",
                   help="attributes used for decoding (default: 7, or the pool size if smaller)")
    p.add_argument("--solver", choices=("closed_form", "logistic"), default="closed_form",
                   help="closed_form: p = v/|v| (Eq. 6, default); logistic: the paper's Section 5 alternative")
    p.add_argument("--max-response-tokens", type=int, metavar="N", default=FIT_RESPONSE_TOKENS,
                   help=f"score only the first N tokens of each response (default: {FIT_RESPONSE_TOKENS}; "
                        "0 scores whole responses: 37 min instead of 10 for 50 DSP pairs on 2 CPU cores)")
    p.add_argument("--no-chat-template", action="store_true", help="plain-text system prefix instead of the chat template")
    p.add_argument("--eval-pairs", metavar="FILE.jsonl", help="report preference accuracy on these pairs")
    p.add_argument("--report", metavar="PROFILE.json", help="summarize an existing profile and write its chart")
    p.add_argument("--chart", metavar="FILE.png", help="chart path for --report (default: PROFILE.png)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.report:
        prof = DriftProfile.load(args.report)
        chart = prof.plot(args.chart or Path(args.report).with_suffix(".png"))
        if args.json:
            print(json.dumps({"profile": args.report, "chart": str(chart), "num_pairs": prof.num_pairs,
                              "selected": [{"name": n, "weight": w} for n, _, w in prof.selected()],
                              "unit_preference": dict(zip(prof.pool.names, prof.unit_preference().tolist()))}))
        else:
            print(prof.report_text())
            print(f"chart: {chart}")
        return 0
    return _fit(args)


def _fit(args: argparse.Namespace) -> int:
    for flag in ("pairs", "model", "out"):
        if not getattr(args, flag):
            raise ValueError(f"`--{flag}` is required to fit (or pass --report PROFILE.json).")
    if args.max_response_tokens < 0:
        raise ValueError(f"`--max-response-tokens` must be >= 0 (0 scores whole responses), got {args.max_response_tokens}.")
    pool = load_attribute_file(args.attributes) if args.attributes else default_pool()
    if args.top_m is None:
        args.top_m = min(7, len(pool))
    if not 1 <= args.top_m <= len(pool):
        raise ValueError(f"`--top-m` must be in [1, {len(pool)}] (the attribute pool size), got {args.top_m}.")
    counter = _WarningCounter()
    logging.getLogger("personalign.personas.drift").addHandler(counter)
    try:
        pairs, skipped = fit_pairs(args.pairs)
        eval_pairs = fit_pairs(args.eval_pairs)[0] if args.eval_pairs else None
    finally:
        logging.getLogger("personalign.personas.drift").removeHandler(counter)
    lm = load_from_args(args)
    backend = build_backend(Resources(model=lm), [])
    prof = fit_profile(backend, pairs, pool, top_m=args.top_m, solver=args.solver,
                       chat_template=not args.no_chat_template, max_response_tokens=args.max_response_tokens or None,
                       name=lm.name if not lm.gguf_file else f"{lm.name}:{lm.gguf_file}", skipped=skipped,
                       progress=not args.quiet)
    accuracy = prof.evaluate(backend, eval_pairs) if eval_pairs else None
    if accuracy is not None:
        prof.stats["eval_accuracy"] = accuracy
        prof.stats["eval_pairs"] = len(eval_pairs)
    prof.save(args.out)
    summary = {"profile": args.out, "num_pairs": prof.num_pairs, "skipped_pairs": skipped,
               "warnings": counter.messages, "train_accuracy": prof.stats["train_accuracy"],
               "accuracy": accuracy, "selected": [{"name": n, "weight": w} for n, _, w in prof.selected()]}
    if args.json:
        print(json.dumps(summary))
        return 0
    for w in counter.messages:
        print(f"warning: {w}")
    print(prof.report_text())
    if accuracy is not None:
        print(f"accuracy on {len(eval_pairs)} eval pairs: {accuracy:.3f}")
    print(f"profile written to {args.out}")
    return 0
