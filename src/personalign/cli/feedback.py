"""``personalign feedback``: learn from the choice a user made among alternatives, without a server.

The chosen reply is preferred to each other one (``records.choice_pairs``: ``n − 1`` pairs), scored by
the steering model and appended to the user's Drift profile (``DriftProfile.add_choice``), as
``POST /v1/feedback`` with ``completion_id`` and ``chosen_index`` does on a server. The alternatives come
from a ``personalign generate --n N --json`` file (``--completion``; ``--line`` picks the prompt) or
are given as ``--prompt`` and repeated ``--choice``. A profile that does not exist yet is created with
the default attribute pool.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from personalign.assembly import Resources, build_backend
from personalign.cli.common import add_model_options, load_from_args
from personalign.personas.drift import DriftProfile
from personalign.personas.identity import steer_identity
from personalign.records import short_repr

HELP = "Fold a user's choice among alternatives into their Drift profile."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feedback", help=HELP, description=HELP)
    add_model_options(p)
    p.add_argument("--profile", required=True, metavar="PROFILE.json",
                   help="the user's Drift profile (created if it does not exist)")
    p.add_argument("--chosen-index", required=True, type=int, metavar="I", help="the index of the choice kept")
    p.add_argument("--completion", metavar="FILE.jsonl", help="output of `personalign generate --n N --json`")
    p.add_argument("--line", type=int, default=1, metavar="K", help="the prompt's line in --completion (default 1)")
    p.add_argument("--prompt", metavar="TEXT", help="the prompt the choices answer (instead of --completion)")
    p.add_argument("--choice", action="append", metavar="TEXT", help="an alternative, in index order (repeatable)")
    p.add_argument("--out", metavar="PROFILE.json", help="where to write the profile (default: --profile)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="a new profile scores with a plain-text system prefix instead of the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def read_choices(path: str, line: int) -> tuple[Any, list[str]]:
    """``(prompt, choice texts)`` of line ``line`` of a ``generate --n N --json`` file."""
    rows = Path(path).read_text(encoding="utf-8").splitlines()
    if not 1 <= line <= len(rows):
        raise ValueError(f"`--line` must be in [1, {len(rows)}] ({path!r} has {len(rows)} lines), got {line}.")
    try:
        rec = json.loads(rows[line - 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line}: not a JSON object ({e.msg}).") from None
    choices = rec.get("choices") if isinstance(rec, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                for c in choices):
        raise ValueError(f"{path}:{line}: expected {{\"prompt\", \"choices\": [{{\"text\"}}, ...]}} as `personalign "
                         f"generate --n N --json` writes it, got {short_repr(rec)}.")
    if "prompt" not in rec:
        raise ValueError(f"{path}:{line}: `prompt` is missing.")
    return rec["prompt"], [c["text"] for c in choices]


def run(args: argparse.Namespace) -> int:
    if args.completion and (args.prompt or args.choice):
        raise ValueError("give `--completion`, or `--prompt` with `--choice`s, not both.")
    if args.completion:
        prompt, choices = read_choices(args.completion, args.line)
    elif args.prompt and args.choice:
        prompt, choices = args.prompt, list(args.choice)
    else:
        raise ValueError("give `--completion FILE.jsonl`, or `--prompt TEXT` and a `--choice TEXT` per alternative.")
    path = Path(args.profile)
    existing = DriftProfile.load(path) if path.exists() else None
    lm = load_from_args(args)
    backend = build_backend(Resources(model=lm), [])
    prof = existing or DriftProfile.empty(steer_identity(lm.model, lm.tokenizer, lm.name),
                                          chat_template=not args.no_chat_template)
    added = prof.add_choice(backend, prompt, choices, args.chosen_index)
    out = prof.save(args.out or path)
    summary = {"profile": str(out), "created": existing is None, "pairs_added": added, "num_pairs": prof.num_pairs,
               "selected": [{"name": n, "weight": w} for n, _, w in prof.selected()]}
    if args.json:
        print(json.dumps(summary))
        return 0
    verb = "created" if existing is None else "updated"
    print(f"{verb} {out}: {added} pair(s) from choice {args.chosen_index} of {len(choices)}, {prof.num_pairs} in all")
    print(prof.report_text())
    return 0
