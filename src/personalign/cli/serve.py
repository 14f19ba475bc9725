"""``personalign serve``: the OpenAI-compatible personalized chat API over one model (see ``server``).

Every registered method whose inputs are given is served from ONE backend: the method flags are
``personalign generate``'s (``--persrm DIR`` for ``pad``; ``--reward-model PATH`` or ``--persrm DIR``
for ``args`` and ``best_of_n``; ``--checkpoint DIR`` for ``pdpo``; ``--profile``/``--steer-model`` for
``drift``), while the preference, the P-DPO user and the Drift profile come with each request or
the user's profile. Assembly builds them over one backend with ``Resources(shared=True)``, so none
changes the main model the others decode (``pdpo`` decodes its own copy of the base model).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import uvicorn

from personalign.assembly import build_backend, build_methods
from personalign.cli.common import (
    add_model_options,
    add_resource_options,
    method_params_from_args,
    resources_from_args,
)
from personalign.learners.drift import DriftLearnerConfig
from personalign.learners.incontext import FORMS, InContextConfig
from personalign.methods import METHODS
from personalign.personas.attributes import default_pool
from personalign.server import EngineWorker, Limits, Store, create_app
from personalign.server.connections import guarded_protocol
from personalign.training.pdpo.user_fit import EmbeddingFitConfig

HELP = "Serve an OpenAI-compatible chat API that personalizes every reply (profiles, feedback, API keys)."

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP + " Set PERSONALIGN_ADMIN_KEY to create API keys.")
    add_model_options(p)
    add_resource_options(p)
    p.add_argument("--db", default="sqlite:///personalign.db", metavar="URL",
                   help="sqlite:///FILE (default: sqlite:///personalign.db) or postgresql://user:pass@host/db")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--model-id", metavar="NAME", help="the `model` name clients send (default: the model's name)")
    p.add_argument("--max-pending", type=int, default=64, metavar="N", help="waiting requests before 429 (default 64)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="rows decoded at once (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                   help="how long a request may wait for others to start in its batch (default 20)")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="largest max_tokens (default 1024)")
    p.add_argument("--no-chat-template", action="store_true", help="encode prompts without the chat template")
    lim = p.add_argument_group("limits (every text the server feeds a model is bounded; over a limit: 400)")
    d = Limits()
    lim.add_argument("--max-message-chars", type=int, default=d.max_message_chars, metavar="N",
                     help=f"characters of one chat message (default {d.max_message_chars})")
    lim.add_argument("--max-messages", type=int, default=d.max_messages, metavar="N",
                     help=f"messages per chat request (default {d.max_messages})")
    lim.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                     help=f"request body size (default {d.max_body_bytes})")
    lim.add_argument("--max-id-chars", type=int, default=d.max_id_chars, metavar="N",
                     help=f"characters of a user or feedback id (default {d.max_id_chars})")
    lim.add_argument("--max-preference-chars", type=int, default=d.max_preference_chars, metavar="N",
                     help=f"characters of a stated preference or a text method parameter (default "
                          f"{d.max_preference_chars})")
    lim.add_argument("--max-feedback-chars", type=int, default=d.max_feedback_chars, metavar="N",
                     help=f"characters of a feedback prompt, chosen or rejected text (default {d.max_feedback_chars})")
    lim.add_argument("--max-feedback-tokens", type=int, default=d.max_feedback_tokens, metavar="N",
                     help=f"tokens of each sequence a feedback fold scores (default {d.max_feedback_tokens}; also "
                          "bounded by the steering model's context)")
    lim.add_argument("--max-folds", type=int, default=d.max_folds, metavar="N",
                     help=f"feedback items waiting to be folded or folding before 429 (default {d.max_folds})")
    lim.add_argument("--max-n", type=int, default=d.max_n, metavar="N",
                     help=f"choices per chat completion, `n` (default {d.max_n})")
    fold = p.add_argument_group("feedback folding (runs within the engine's rounds)")
    fold.add_argument("--fold-share", type=float, default=0.5, metavar="X",
                      help="while requests decode, folding may take X times their decoding time (default 0.5)")
    fold.add_argument("--fit-steps", type=int, default=EmbeddingFitConfig.steps, metavar="N",
                      help="with --checkpoint: Adam steps of the P-DPO embedding fit each choice of a user the "
                           "checkpoint never saw runs (0: such users keep the generic embedding)")
    fold.add_argument("--fit-pairs", type=int, default=EmbeddingFitConfig.max_pairs, metavar="N",
                      help="the user's most recent pairs one embedding fit sees")
    fold.add_argument("--drift-pool-size", type=int, default=DriftLearnerConfig.pool_size, metavar="N",
                      help="attributes of the default pool a new user's Drift profile scores, drawn once with "
                           f"--drift-pool-seed, the same for every user (0: all {len(default_pool())}; default "
                           f"{DriftLearnerConfig.pool_size}); a choice's folding time follows it")
    fold.add_argument("--drift-pool-seed", type=int, default=DriftLearnerConfig.pool_seed, metavar="N",
                      help="the seed of that draw (default %(default)s)")
    fold.add_argument("--drift-response-tokens", type=int, default=DriftLearnerConfig.max_response_tokens,
                      metavar="N", help="reply tokens a new user's Drift profile scores per sequence (0: whole "
                                        "replies; default %(default)s)")
    fold.add_argument("--incontext-form", choices=FORMS, default=InContextConfig.form,
                      help="what the incontext learner puts in the prompt: its hypothesis of the user's preference, "
                           "the user's most relevant earlier choices, or both (default %(default)s)")
    fold.add_argument("--incontext-tokens", type=int, default=InContextConfig.max_tokens, metavar="N",
                      help="the most tokens the incontext learner adds to a prompt (default %(default)s)")
    fold.add_argument("--hypothesis-every", type=int, default=InContextConfig.hypothesis_every, metavar="N",
                      help="the incontext learner infers its hypothesis again after N new choices (default "
                           "%(default)s)")
    fold.add_argument("--fold-idle-ms", type=float, default=200.0, metavar="MS",
                      help="a folding forward's time when nothing decodes: also the longest a request arriving "
                           "meanwhile waits to start (default 200); where one forward's fixed cost is longer "
                           "(a slow or busy CPU), forwards grow so folding still progresses (docs/server.md)")
    conn = p.add_argument_group("connections (a slow or silent client cannot hold them)")
    conn.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                      help="a request's headers must arrive within S seconds of its first byte (or of the "
                           "connection opening); else the connection is closed (default 10)")
    conn.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                      help="a request's body must arrive within S seconds of its headers; else 408 and the "
                           "connection is closed (default 30)")
    conn.add_argument("--max-connections-per-client", type=int, default=64, metavar="N",
                      help="open connections from one client address; beyond it 503 with Retry-After (default 64)")
    p.add_argument("--playground-key", action="store_true",
                   help="print a key for the browser playground at start-up (a local trial needs no admin key or "
                        "curl): the key named 'playground' gets a new secret each start, keeping its users")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, let running requests finish for up to S seconds, then stop (default 30)")
    p.set_defaults(func=run)


def build_served(args: argparse.Namespace) -> tuple[Any, dict, dict[str, str]]:
    """``(backend, methods, unavailable)``: every registered method the flags' resources let this server
    serve, over ONE backend (``assembly``; P-DPO on its own copy of the base model), and why the others
    cannot be served."""
    resources = resources_from_args(args, shared=True)
    backend = build_backend(resources, METHODS.names())
    methods, unavailable = build_methods(METHODS.names(), backend, resources,
                                         params={"pdpo": method_params_from_args("pdpo", args, {})})
    return backend, methods, unavailable


def run(args: argparse.Namespace) -> int:


    if not 0 <= args.port <= 65535:
        raise ValueError(f"`--port` must lie in [0, 65535], got {args.port}.")
    if args.header_timeout <= 0 or args.body_timeout <= 0 or args.max_connections_per_client < 1:
        raise ValueError(f"`--header-timeout` and `--body-timeout` must be > 0 and `--max-connections-per-client` "
                         f">= 1, got {args.header_timeout}, {args.body_timeout}, {args.max_connections_per_client}.")
    if args.drain_seconds < 0:
        raise ValueError(f"`--drain-seconds` must be >= 0, got {args.drain_seconds}.")
    if args.fit_steps < 0 or args.fit_pairs < 1:
        raise ValueError(f"`--fit-steps` must be >= 0 and `--fit-pairs` >= 1, got {args.fit_steps} and {args.fit_pairs}.")
    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(256, args.max_tokens),
                    max_message_chars=args.max_message_chars, max_messages=args.max_messages,
                    max_body_bytes=args.max_body_bytes, max_id_chars=args.max_id_chars,
                    max_preference_chars=args.max_preference_chars, max_feedback_chars=args.max_feedback_chars,
                    max_feedback_tokens=args.max_feedback_tokens, max_folds=args.max_folds, max_n=args.max_n)
    store = Store(args.db)  # fail on a bad URL or a database that cannot be written before loading the model
    for m in store.migrated:
        print(f"personalign serve: renamed {m['kind']} id {m['old']!r} to {m['new']!r} (owner {m['owner']}): an "
              "earlier release stored it outside the ids a URL can address")
    backend, methods, unavailable = build_served(args)
    for name, why in unavailable.items():
        print(f"personalign serve: method {name} not served: {why}")
    engine = EngineWorker(backend, methods, max_pending=args.max_pending, max_batch=args.max_batch,
                          chat_template=not args.no_chat_template, batch_wait=args.batch_wait_ms / 1000,
                          max_folds=args.max_folds, fold_share=args.fold_share, fold_idle_ms=args.fold_idle_ms)
    model_id = args.model_id or Path(args.model.rstrip("/")).name
    try:
        learners = {"pdpo": False if args.fit_steps == 0 else EmbeddingFitConfig(steps=args.fit_steps,
                                                                                  max_pairs=args.fit_pairs),
                    "drift": DriftLearnerConfig(pool_size=args.drift_pool_size, pool_seed=args.drift_pool_seed,
                                                max_response_tokens=args.drift_response_tokens),
                    "incontext": InContextConfig(form=args.incontext_form, max_tokens=args.incontext_tokens,
                                                 hypothesis_every=args.hypothesis_every)}
    except ValueError as e:
        raise SystemExit(f"personalign serve: {e}") from None
    app = create_app(engine, store, limits=limits, model_id=model_id, unavailable=unavailable, learners=learners)
    if not os.environ.get("PERSONALIGN_ADMIN_KEY"):
        print("personalign serve: PERSONALIGN_ADMIN_KEY is not set: keys cannot be created over HTTP.")
    print(f"personalign serve: {model_id} on http://{args.host}:{args.port} (store: {store.dialect}; "
          f"methods: {', '.join(sorted(methods))}); the playground: http://{args.host}:{args.port}/playground",
          flush=True)
    if args.playground_key:
        kid, key = store.playground_key()
        print(f"personalign serve: the playground's key (paste it into the page; {kid}, replaced at the next "
              f"--playground-key start): {key}", flush=True)
    # SIGTERM: uvicorn stops accepting, lets running requests finish for --drain-seconds, then the app's
    # shutdown stops the engine (requests still running get a 503; unfolded feedback stays stored)
    protocol = guarded_protocol(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                                max_per_client=args.max_connections_per_client)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=protocol,
                timeout_graceful_shutdown=args.drain_seconds)
    return 0
