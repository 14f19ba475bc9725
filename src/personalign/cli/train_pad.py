"""``personalign train pad``: the PersRM of PAD (two stages, Algorithm 1 of seed 000) from preference pairs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from personalign.cli.common import add_model_options, load_from_args
from personalign.config import config_from_mapping
from personalign.training.persrm import PersRM
from personalign.training.persrm.train import (
    PersRMTrainConfig,
    kept_stage2,
    read_pairs,
    split_by_prompt,
    train_persrm,
)


def register_pad(objectives: argparse._SubParsersAction) -> None:
    d = PersRMTrainConfig()
    help_ = "Train a PAD personalized reward model (LoRA π_θ over the frozen backbone + preference head)."
    p = objectives.add_parser("pad", help=help_, description=help_)
    add_model_options(p)
    p.add_argument("--pairs", required=True, metavar="FILE.jsonl",
                   help='training pairs, one JSON per line: {"prompt", "chosen", "rejected", "preference"}')
    p.add_argument("--eval-pairs", metavar="FILE.jsonl",
                   help="held-out pairs (default: hold out --eval-fraction of the prompts of --pairs)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (adapter, head, persrm.json)")
    p.add_argument("--preset", choices=sorted(PersRMTrainConfig.PRESETS),
                   help="start from the paper's settings (App. A: lr 5e-6, 3 epochs, effective batch 128); "
                        "flags override it")
    p.add_argument("--epochs", type=int, default=None, help=f"stage-1 epochs (LoRA, w_p = 1; default {d.epochs})")
    p.add_argument("--head-epochs", type=int, default=None, help="stage-2 epochs (value head only)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--head-select", choices=["best", "last"], default=None,
                   help="keep the stage-2 head of the epoch with the lowest held-out loss, the head before "
                        "stage 2 included (best), or the last epoch's (last)")
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--eval-fraction", type=float, default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_pad, dtype="float32")


def run_pad(args: argparse.Namespace) -> int:
    fields = ("epochs", "head_epochs", "batch_size", "grad_accum", "lr", "head_lr", "head_select", "beta", "lora_r",
              "eval_fraction", "max_prompt_tokens", "max_response_tokens", "seed")
    values: dict[str, Any] = {"preset": args.preset} if args.preset else {}
    values.update({f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    cfg = config_from_mapping(PersRMTrainConfig, {**values, "chat_template": not args.no_chat_template})
    pairs = read_pairs(args.pairs)  # validate the data before loading the model
    if args.eval_pairs:
        train, held = pairs, read_pairs(args.eval_pairs)
    else:
        train, held = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
    lm = load_from_args(args)
    rm = PersRM.create(lm.model, lm.tokenizer, name=args.model, gguf_file=lm.gguf_file, lora_r=cfg.lora_r,
                       beta=cfg.beta)
    print(f"PersRM on {args.model}: {len(train)} training pairs, {len(held)} held-out pairs")
    hist = train_persrm(rm, train, held, cfg, out_dir=args.out, progress=not args.quiet, log=print)
    final = kept_stage2(hist) or (hist["stage1"] or [{}])[-1]
    print(json.dumps({"out": args.out, "held_out_accuracy": final.get("accuracy"),
                      "per_preference": final.get("per_preference"),
                      "stage2_selected_epoch": hist.get("stage2_selected")},
                     ensure_ascii=False))
    return 0
