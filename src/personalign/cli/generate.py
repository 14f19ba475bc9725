"""``personalign generate``: decode prompts with a method; text, or one JSON object per prompt.

``--n N`` decodes N choices of every prompt as rows of one batch (sampled with ``--temperature`` > 0,
reproducible with ``--seed``); with ``--json`` each prompt's object then lists its ``choices``, the file
``personalign feedback --completion`` reads to learn from the choice a user makes among them.
"""

from __future__ import annotations

import argparse
import json
import sys

from personalign.assembly import build_backend, build_method, method_config
from personalign.cli.common import (
    add_model_options,
    add_resource_options,
    device_of,
    make_generator,
    method_params_from_args,
    resources_from_args,
)
from personalign.config import parse_params
from personalign.decoding.loop import generate, stream
from personalign.decoding.sampling import SamplingConfig
from personalign.methods import METHODS, get_method
from personalign.types import Request

HELP = "Generate text for one or more prompts with a personalization method."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    add_model_options(p, required=False)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--preference", metavar="TEXT", help="the user's preference in words")
    p.add_argument("--method", default="base", metavar="NAME", help=f"one of: {', '.join(METHODS.names())}")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="a method parameter (repeatable)")
    p.add_argument("--preset", metavar="NAME",
                   help="start from a named set of the method's parameters (`paper`: the paper's own settings, "
                        "docs/methods.md); --param values override it")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="choices per prompt, decoded as rows of one batch (default 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="encode the prompt exactly as tokenizer(prompt) does, even if a chat template exists")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_resource_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    get_method(args.method)  # fail on a typo before loading anything
    params = method_params_from_args(args.method, args, parse_params(args.param))
    if args.preset:
        params = {"preset": args.preset, **params}
    method_config(args.method, params)  # a bad parameter fails before any model is loaded
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens <= 0:
        raise ValueError(f"`--max-new-tokens` must be > 0, got {args.max_new_tokens}.")
    if args.n < 1:
        raise ValueError(f"`--n` must be an integer >= 1 (choices per prompt), got {args.n}.")
    requests = [Request(prompt=p, preference=args.preference) for p in args.prompt for _ in range(args.n)]
    if not args.model and not (args.method == "pdpo" and args.checkpoint):
        raise ValueError("`--model` is required (a model directory, .gguf file, hub id or 'smollm2').")
    resources = resources_from_args(args)
    backend = build_backend(resources, [args.method])
    method = build_method(args.method, params, backend, resources)
    gen = make_generator(args.seed, device_of(args))
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop, generator=gen,
              chat_template=not args.no_chat_template)
    if args.json:
        outs = generate(method, requests, backend, **kw)
        if args.n == 1:
            for out in outs:
                print(json.dumps(out.to_dict(), ensure_ascii=False))
            return 0
        for i, prompt in enumerate(args.prompt):
            rows = outs[i * args.n:(i + 1) * args.n]
            print(json.dumps({"prompt": prompt, "method": args.method, "preference": args.preference,
                              "choices": [{"index": j, "text": o.text, "finish_reason": o.finish_reason}
                                          for j, o in enumerate(rows)]}, ensure_ascii=False))
        return 0
    if len(requests) == 1:
        for d in stream(method, requests, backend, **kw):
            sys.stdout.write(d.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, out in enumerate(generate(method, requests, backend, **kw)):
        label = f"{i // args.n}.{i % args.n}" if args.n > 1 else f"{i}"
        print(f"--- [{label}] {out.prompt if isinstance(out.prompt, str) else ''}\n{out.text}")
    return 0
