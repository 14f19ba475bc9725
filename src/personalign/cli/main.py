"""Entry point: ``personalign <command> ...``. Errors in user input print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from transformers.utils import logging as hf_logging

from personalign.cli import bench, data, demo, feedback, fit, generate, serve, train
from personalign.cli import eval as eval_cmd
from personalign.environment import __version__

COMMANDS = [generate, demo, bench, eval_cmd, data, fit, feedback, train, serve]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="personalign",
        description="Align a language model's output with one person's preferences at decoding time.",
    )
    p.add_argument("--version", action="version", version=f"personalign {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"personalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entrypoint() -> None:
    sys.exit(main())
