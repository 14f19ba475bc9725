"""``personalign serve``: the OpenAI-compatible personalized chat API over one model (see ``server``).

Every registered method whose inputs are given is served from ONE backend: the method flags are
``personalign generate``'s (``--persrm DIR`` for ``pad``; ``--reward-model PATH`` or ``--persrm DIR``
for ``args`` and ``best_of_n``; ``--checkpoint DIR`` for ``pdpo``; ``--profile``/``--steer-model`` for
``drift``), while the preference, the P-DPO user and the Drift profile come with each request or
the user's profile. Methods are built with ``shared_backend`` set, so none changes the main model
the others decode (``pdpo`` merges its adapter into its own copy of the base model).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from personalign.cli.common import add_model_options, load_from_args
from personalign.methods import METHODS

HELP = "Serve an OpenAI-compatible chat API that personalizes every reply (profiles, feedback, API keys)."

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP + " Set PERSONALIGN_ADMIN_KEY to create API keys.")
    add_model_options(p)
    for name in METHODS.names():
        METHODS.get(name).add_cli_arguments(p)
    if "--steer-model" not in p._option_string_actions:
        p.add_argument("--steer-model", metavar="PATH", help="small steering model for methods that use one")
    p.add_argument("--db", default="sqlite:///personalign.db", metavar="URL",
                   help="sqlite:///FILE (default: sqlite:///personalign.db) or postgresql://user:pass@host/db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", metavar="NAME", help="the `model` name clients send (default: the model's name)")
    p.add_argument("--max-pending", type=int, default=64, metavar="N", help="waiting requests before 429 (default 64)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="rows decoded at once (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                   help="how long a request may wait for others to start in its batch (default 20)")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="largest max_tokens (default 1024)")
    p.add_argument("--no-chat-template", action="store_true", help="encode prompts without the chat template")
    p.set_defaults(func=run, shared_backend=True)


def build_backend(args: argparse.Namespace) -> Any:
    """The ``HFBackend`` of ``--model`` plus the extra models the served methods ask for."""
    from personalign.views import HFBackend

    main = load_from_args(args)
    models, tokenizers = {"main": main.model}, {"main": main.tokenizer}
    load = lambda m, g=None: load_from_args(args, m, g)  # noqa: E731
    for name in METHODS.names():
        try:
            extra = METHODS.get(name).extra_models(args, load)
        except ValueError as e:
            logger.warning("method %s: %s", name, e)
            continue
        for key, lm in extra.items():
            models.setdefault(key, lm.model)
            tokenizers.setdefault(key, lm.tokenizer)
    if args.steer_model and "steer" not in models:
        steer = load(args.steer_model)
        models["steer"], tokenizers["steer"] = steer.model, steer.tokenizer
    return HFBackend(models, tokenizers)


def build_methods(args: argparse.Namespace, backend: object) -> tuple[dict, dict[str, str]]:
    """Every registered method this backend can serve, and why the others cannot."""
    methods, unavailable = {}, {}
    for name in METHODS.names():
        try:
            methods[name] = METHODS.get(name).from_cli(args, {}, backend)
        except (ValueError, OSError) as e:
            unavailable[name] = str(e)
    return methods, unavailable


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from personalign.server import EngineWorker, Limits, Store, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"`--port` must lie in [0, 65535], got {args.port}.")
    store = Store(args.db)  # fail on a bad URL before loading the model
    backend = build_backend(args)
    methods, unavailable = build_methods(args, backend)
    for name, why in unavailable.items():
        print(f"personalign serve: method {name} not served: {why}")
    engine = EngineWorker(backend, methods, max_pending=args.max_pending, max_batch=args.max_batch,
                          chat_template=not args.no_chat_template, batch_wait=args.batch_wait_ms / 1000)
    model_id = args.model_id or Path(args.model.rstrip("/")).name
    app = create_app(engine, store, limits=Limits(max_tokens=args.max_tokens,
                                                  default_max_tokens=min(256, args.max_tokens)),
                     model_id=model_id, unavailable=unavailable)
    if not os.environ.get("PERSONALIGN_ADMIN_KEY"):
        print("personalign serve: PERSONALIGN_ADMIN_KEY is not set: keys cannot be created over HTTP.")
    print(f"personalign serve: {model_id} on http://{args.host}:{args.port} (store: {store.dialect}; "
          f"methods: {', '.join(sorted(methods))})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
