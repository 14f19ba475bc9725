"""``personalign train <objective>``: fine-tune what a personalization method needs.

One function per objective (``pad`` in ``cli/train_pad.py``, ``rm`` in ``cli/train_rm.py``; ``pdpo``, ``dpo``, ``prm`` here); each parses its flags into the objective's
config (defaults < ``--config FILE`` < flags), loads the data and the base model, runs the training
loop and prints the final metrics. Under ``accelerate launch personalign train ...`` the same loop runs
on many devices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from personalign.cli.common import add_model_options, load_from_args
from personalign.cli.train_pad import register_pad
from personalign.cli.train_rm import register_rm
from personalign.config import config_from_mapping
from personalign.training.pdpo.data import read_training_pairs
from personalign.training.pdpo.train import PDPOTrainConfig, train_pdpo, train_prm

HELP = ("Train what a method needs: pad (PersRM), pdpo, dpo, prm (personalized reward model), "
        "rm (a linear reward head for --reward-model).")

# flag -> PDPOTrainConfig field, for the flags every objective shares
_COMMON = {
    "epochs": "epochs", "max_steps": "max_steps", "batch_size": "batch_size", "grad_accum": "grad_accum",
    "lr": "learning_rate", "user_lr": "user_learning_rate", "warmup_steps": "warmup_steps",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "max_prompt_tokens": "max_prompt_tokens", "max_response_tokens": "max_response_tokens",
    "eval_every": "eval_every", "seed": "seed", "end_token_id": "end_token_id",
}
_USER = {"user_model": "user_model", "clusters": "clusters", "user_tokens": "user_tokens",
         "weighting": "weighting", "alpha": "alpha"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP)
    objectives = p.add_subparsers(dest="objective", metavar="OBJECTIVE")
    register_pad(objectives)
    _register_pdpo(objectives)
    _register_dpo(objectives)
    _register_prm(objectives)
    register_rm(objectives)
    p.set_defaults(func=lambda args: _no_objective(p))


def _no_objective(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _common_options(q: argparse.ArgumentParser) -> None:
    add_model_options(q)
    q.add_argument("--pairs", required=True, metavar="FILE.jsonl",
                   help='training pairs {"prompt","chosen","rejected","user_id","user_text"?}')
    q.add_argument("--eval-pairs", metavar="FILE.jsonl", help="pairs for the metrics (unseen users -> user 0)")
    q.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory")
    q.add_argument("--users", metavar="FILE", help="the seen user ids, one per line (default: those in --pairs)")
    q.add_argument("--config", metavar="FILE", help="YAML or JSON training config (flags override it)")
    q.add_argument("--preset", choices=sorted(PDPOTrainConfig.PRESETS),
                   help="start from the paper's settings (App. C.2: paper = TL;DR, paper_psoups = P-SOUPS); "
                        "--config and flags override it")
    q.add_argument("--epochs", type=int)
    q.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    q.add_argument("--batch-size", type=int, metavar="N", help="pairs per forward")
    q.add_argument("--grad-accum", type=int, metavar="N", help="forwards per optimizer step")
    q.add_argument("--lr", type=float, help="LoRA learning rate")
    q.add_argument("--user-lr", type=float, help="user-model learning rate (default: --lr)")
    q.add_argument("--warmup-steps", type=int)
    q.add_argument("--lora-r", type=int)
    q.add_argument("--lora-alpha", type=float)
    q.add_argument("--lora-dropout", type=float)
    q.add_argument("--max-prompt-tokens", type=int)
    q.add_argument("--max-response-tokens", type=int)
    q.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N optimizer steps")
    q.add_argument("--seed", type=int)
    q.add_argument("--end-token-id", type=int, metavar="ID",
                   help="id that ends every response and stops generation (default: the tokenizer's EOS)")
    q.add_argument("--no-chat-template", action="store_true", help="encode prompts as tokenizer(prompt)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _user_options(q: argparse.ArgumentParser, alpha_help: str) -> None:
    q.add_argument("--user-model", choices=["individual", "cluster", "uniform"], help="implicit user model")
    q.add_argument("--clusters", type=int, metavar="K", help="cluster centres of the cluster model")
    q.add_argument("--user-tokens", type=int, metavar="T_u", help="soft-prompt tokens per user (0: uniform only)")
    q.add_argument("--weighting", choices=["softmax", "linear"], help="cluster weights")
    q.add_argument("--alpha", type=float, metavar="A", help=alpha_help)


def _register_pdpo(objectives: Any) -> None:
    q = objectives.add_parser("pdpo", help="personalized DPO / IPO (P-RLHF)",
                              description="Personalized DPO (or IPO) with a user model; vanilla DPO is "
                                          "--user-model uniform --user-tokens 0 --alpha 1.")
    _common_options(q)
    _user_options(q, "weight of the user's own term, 1 - A on the generic user 0 (default 0.5)")
    q.add_argument("--beta", type=float, metavar="B", help="KL strength (default 0.5)")
    q.add_argument("--loss", choices=["dpo", "ipo"], help="P-DPO (default) or P-IPO")
    q.set_defaults(func=pdpo)


def _register_dpo(objectives: Any) -> None:
    q = objectives.add_parser("dpo", help="vanilla DPO baseline (= pdpo, empty uniform user model, alpha 1)")
    _common_options(q)
    q.add_argument("--beta", type=float, metavar="B", help="KL strength (default 0.5)")
    q.add_argument("--loss", choices=["dpo", "ipo"], help="DPO (default) or IPO")
    q.set_defaults(func=dpo)


def _register_prm(objectives: Any) -> None:
    q = objectives.add_parser("prm", help="personalized reward model (P-RLHF App. F.2)")
    _common_options(q)
    _user_options(q, "weight of the user's own Bradley-Terry term (default 0.5)")
    q.add_argument("--head", choices=["soft_prompt", "linear"], help="user embedding as soft prompt or linear head")
    q.set_defaults(func=prm)


def _config(args: argparse.Namespace, flags: dict[str, str], fixed: dict[str, Any] | None = None) -> Any:
    values: dict[str, Any] = {"preset": args.preset} if getattr(args, "preset", None) else {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"`--config` file {args.config!r} does not exist.")

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"`--config` file {args.config!r} must hold a mapping of config fields.")
        values.update(loaded)
    for flag, fname in flags.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[fname] = v
    if args.no_chat_template:
        values["chat_template"] = False
    for k, v in (fixed or {}).items():
        if k in values and values[k] != v:
            raise ValueError(f"`{k}` is fixed to {v!r} for `train {args.objective}`, got {values[k]!r}.")
        values[k] = v
    return config_from_mapping(PDPOTrainConfig, values)


def _data(args: argparse.Namespace) -> tuple[list[Any], list[Any] | None, list[str] | None]:
    train = read_training_pairs(args.pairs)
    evals = read_training_pairs(args.eval_pairs, require_user=False) if args.eval_pairs else None
    users = None
    if args.users:
        path = Path(args.users)
        if not path.is_file():
            raise ValueError(f"`--users` file {args.users!r} does not exist.")
        users = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return train, evals, users


def _load_base(args: argparse.Namespace) -> Any:
    base = load_from_args(args)
    p = Path(args.model).expanduser()
    if p.exists():  # record where the base model lives, so `generate --checkpoint` finds it from anywhere
        base.name = str(p.resolve())
    return base


def _report(result: Any) -> int:
    if result.checkpoint is None:  # not the main process of a multi-process run
        return 0
    metrics = {k: v for k, v in result.final_metrics.items() if not k.startswith("accuracy_user/")}
    print(json.dumps({"checkpoint": str(result.checkpoint), **metrics}, indent=1, default=str))
    return 0


def _train(args: argparse.Namespace, config: Any, objective: str) -> int:
    train, evals, users = _data(args)  # fail on bad data before loading the model
    base = _load_base(args)
    fn = train_prm if objective == "prm" else train_pdpo
    result = fn(base, train, config, eval_pairs=evals, out=args.out, user_ids=users, progress=not args.no_progress)
    return _report(result)


def pdpo(args: argparse.Namespace) -> int:
    """``personalign train pdpo``: P-DPO / P-IPO (paper Section 4.4, App. F.3)."""
    config = _config(args, {**_COMMON, **_USER, "beta": "beta", "loss": "loss"})
    return _train(args, config, "pdpo")


def dpo(args: argparse.Namespace) -> int:
    """``personalign train dpo``: vanilla DPO, i.e. P-DPO with the empty uniform user model and alpha = 1."""
    config = _config(args, {**_COMMON, "beta": "beta", "loss": "loss"},
                     fixed={"user_model": "uniform", "user_tokens": 0, "alpha": 1.0})
    return _train(args, config, "dpo")


def prm(args: argparse.Namespace) -> int:
    """``personalign train prm``: personalized reward model (paper App. F.2)."""
    config = _config(args, {**_COMMON, **_USER, "head": "head"})
    return _train(args, config, "prm")
