"""``personalign demo``: one question, three contrasting preferences, the methods side by side.

Each method answers the question under each preference (one batch per method, greedy), built by the
same assembly path as ``generate`` and the server; the table says how long each method took. Drift
steers with the small profiles shipped in the package (``personas/demo_profiles``, fitted for the
embedded SmolLM2 by ``scripts/fit_demo_profiles.sh``); with another model it is skipped, saying why.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from importlib import resources as importlib_resources
from typing import Any

from personalign.assembly import Resources, build_backend, build_method
from personalign.cli.common import add_model_options, device_of, load_from_args, make_generator
from personalign.decoding.loop import generate
from personalign.methods import METHODS
from personalign.personas.drift import DriftProfile
from personalign.types import Request
from personalign.views import DEFAULT_MODEL

HELP = "Answer one question under three preferences with several methods, side by side, timed."

QUESTION = "How do vaccines train the immune system?"
# name -> the P-SOUPS preference in words (seed 001, Table 7); each has a shipped Drift profile
PREFERENCES = {
    "elementary": "Generate a response that can be easily understood by an elementary school student.",
    "concise": "Generate a response that is concise and to the point, without being verbose.",
    "friendly": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
}
DEFAULT_METHODS = ["base", "preference_prompting", "linear_alignment", "amulet", "drift"]
# per-method settings for the 135M default model: Amulet at the paper's α = λ = 2 can run off fluent
# text on a model this small (docs/results.md); α = 1 keeps its effective ratio near 1
PARAMS: dict[str, dict[str, Any]] = {"amulet": {"alpha": 1.0, "lam": 2.0, "iterations": 60}}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=HELP)
    add_model_options(p, required=False)
    p.set_defaults(model=DEFAULT_MODEL)
    p.add_argument("--prompt", "--question", dest="question", default=QUESTION, metavar="TEXT",
                   help=f"the question (default: {QUESTION!r})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="A,B,...",
                   help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; any of "
                        "base, preference_prompting, linear_alignment, amulet, drift)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--width", type=int, default=100, metavar="COLS", help="wrap answers at this width")
    p.set_defaults(func=run)


def demo_profile(name: str) -> DriftProfile:
    """The shipped Drift profile of demo preference ``name``."""
    ref = importlib_resources.files("personalign.personas").joinpath("demo_profiles", f"{name}.json")
    return DriftProfile.from_dict(json.loads(ref.read_text()))


def _methods(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    allowed = set(DEFAULT_METHODS)
    for m in names:
        METHODS.get(m)  # an unknown name lists the valid ones
        if m not in allowed:
            raise ValueError(f"`--methods`: the demo runs {', '.join(DEFAULT_METHODS)}; {m!r} needs inputs of its "
                             "own (use `personalign generate --method`).")
    if not names:
        raise ValueError("`--methods` must name at least one method.")
    return names


def run(args: argparse.Namespace) -> int:
    names = _methods(args.methods)
    if args.max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` must be >= 1, got {args.max_new_tokens}.")
    t_load = time.perf_counter()
    lm = load_from_args(args)
    res = Resources(model=lm, device=args.device, dtype=args.dtype)
    backend = build_backend(res, names)
    print(f"model: {lm.name} (loaded in {time.perf_counter() - t_load:.1f} s)\nquestion: {args.question}\n")
    skipped: dict[str, str] = {}
    profiles: dict[str, DriftProfile] = {}
    if "drift" in names:
        try:
            profiles = {p: demo_profile(p) for p in PREFERENCES}
            for prof in profiles.values():
                prof.check_model(lm.model, lm.tokenizer)
        except (OSError, ValueError) as e:
            skipped["drift"] = f"{e} (the shipped profiles are fitted for {DEFAULT_MODEL})"
    answers: dict[str, list[str]] = {}
    took: dict[str, float] = {}
    for name in names:
        if name in skipped:
            continue
        method = build_method(name, PARAMS.get(name, {}), backend, res)
        if name == "base":  # the preference is ignored: one answer serves every row
            reqs = [Request(prompt=args.question)]
        else:
            reqs = [Request(prompt=args.question, preference=text,
                            params={"profile": profiles[p]} if name == "drift" else {})
                    for p, text in PREFERENCES.items()]
        t0 = time.perf_counter()
        outs = generate(method, reqs, backend, max_new_tokens=args.max_new_tokens,
                        generator=make_generator(0, device_of(args)))
        took[name] = time.perf_counter() - t0
        texts = [o.text.strip() for o in outs]
        answers[name] = texts * len(PREFERENCES) if name == "base" else texts
    _print(names, answers, took, skipped, args.width)
    return 0


def _print(names: list[str], answers: dict[str, list[str]], took: dict[str, float], skipped: dict[str, str],
           width: int) -> None:
    label = max(len(n) for n in names) + 2
    for i, (pref, text) in enumerate(PREFERENCES.items()):
        print(f"=== {pref}: {text}")
        for name in names:
            if name not in answers:
                continue
            note = "  (no preference)" if name == "base" else ""
            print(textwrap.fill((answers[name][i] or "(empty)") + note, width=max(label + 40, width),
                                initial_indent=f"{name:<{label}}", subsequent_indent=" " * label))
        print()
    print("time per method (all three preferences in one batch; base: one answer):")
    for name in names:
        if name in took:
            print(f"  {name:<{label}}{took[name]:6.1f} s")
        else:
            print(f"  {name:<{label}}skipped: {skipped[name]}")
