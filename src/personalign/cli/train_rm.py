"""``personalign train rm``: a Bradley–Terry reward model, saved as a sequence-classification
checkpoint for ``--reward-model`` (ARGS, best-of-N, evaluation): a linear head on the frozen model
(convex fit), and with ``--lora`` that head and a LoRA adapter fine-tuned from there (merged on save).

    personalign train rm --pairs pairs.jsonl --model smollm2 --out runs/rm --preference-in-prompt [--lora]

Pairs are ``{"prompt","chosen","rejected"}`` records (TRL, DSP or HH layout; with
``--preference-in-prompt`` each needs ``preference``). A random ``--eval-fraction`` of the prompts is
held out (all pairs of a prompt on one side); the JSON output reports train and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from personalign.cli.common import add_model_options, load_from_args
from personalign.config import config_to_dict
from personalign.eval.datasets import load_pairs
from personalign.training.persrm.train import split_by_prompt
from personalign.training.reward_head import (
    RewardLoRAConfig,
    fit_reward_head,
    reward_features,
    reward_input_ids,
    save_reward_classifier,
    train_reward_lora,
)

HELP = "Bradley–Terry reward model (linear head; --lora: + LoRA fine-tune) -> a --reward-model checkpoint."


def register_rm(objectives: Any) -> None:
    q = objectives.add_parser("rm", help=HELP, description=HELP)
    add_model_options(q)
    q.add_argument("--pairs", required=True, metavar="FILE", help='pairs {"prompt","chosen","rejected","preference"?}')
    q.add_argument("--out", required=True, metavar="DIR", help="where to write the sequence-classification checkpoint")
    q.add_argument("--preference-in-prompt", action="store_true",
                   help="condition on each pair's preference (system message); use with args reward_preference=true")
    q.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of prompts held out for the accuracy (default 0.2; 0 = none)")
    q.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the head (default 1e-3)")
    q.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per feature forward")
    q.add_argument("--max-length", type=int, default=1024, metavar="T", help="tokens kept per sequence (the end)")
    q.add_argument("--seed", type=int, default=0)
    lo = q.add_argument_group("LoRA fine-tuning (--lora)")
    lo.add_argument("--lora", action="store_true",
                    help="after the linear fit, fine-tune a LoRA adapter and the head on the same loss (merged on save)")
    lo.add_argument("--epochs", type=int, default=2, help="passes over the training pairs (default 2)")
    lo.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default 2e-4)")
    lo.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate (default 1e-3)")
    lo.add_argument("--pairs-per-step", type=int, default=4, metavar="N", help="pairs per optimizer step (default 4)")
    lo.add_argument("--grad-accum", type=int, default=1, metavar="N", help="gradient accumulation steps (default 1)")
    lo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    q.add_argument("--no-chat-template", action="store_true", help="encode prompts as tokenizer(prompt)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.set_defaults(func=run_rm)


def run_rm(args: argparse.Namespace) -> int:


    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"`--eval-fraction` must lie in [0, 1), got {args.eval_fraction}.")
    if args.batch_size < 1 or args.max_length < 2:
        raise ValueError("`--batch-size` must be >= 1 and `--max-length` >= 2.")
    lora_cfg = None
    if args.lora:  # validated before any model is loaded
        lora_cfg = RewardLoRAConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.pairs_per_step,
                                    grad_accum=args.grad_accum, rank=args.rank, alpha=2 * args.rank,
                                    max_length=args.max_length, seed=args.seed)
    pairs = load_pairs(args.pairs)
    if not pairs:
        raise ValueError(f"`--pairs` {args.pairs!r} holds no pairs.")
    if args.preference_in_prompt:
        bad = [p.origin for p in pairs if not p.preference]
        if bad:
            raise ValueError(f"--preference-in-prompt needs a `preference` in every pair; missing at {bad[0]}"
                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ".")
    held_prompts = {p.prompt for p in split_by_prompt(pairs, args.eval_fraction, args.seed)[1]}
    lm = load_from_args(args)
    tok = lm.tokenizer
    chat = not args.no_chat_template
    seqs = []
    for p in pairs:
        pref = p.preference if args.preference_in_prompt else None
        seqs += [reward_input_ids(tok, p.prompt, p.chosen, pref, chat), reward_input_ids(tok, p.prompt, p.rejected, pref, chat)]
    feats = reward_features(lm.model, tok, seqs, batch_size=args.batch_size, max_length=args.max_length,
                            progress=not args.no_progress)
    diff = feats[0::2] - feats[1::2]
    is_eval = torch.tensor([p.prompt in held_prompts for p in pairs])
    res = fit_reward_head(diff[~is_eval], diff[is_eval] if held_prompts else None, l2=args.l2)
    meta = {"pairs": args.pairs, "model": args.model, "gguf_file": args.gguf_file,
            "preference_in_prompt": bool(args.preference_in_prompt), "chat_template": chat, "l2": args.l2,
            "n_train": res.n_train, "n_eval": res.n_eval, "train_accuracy": res.train_accuracy,
            "eval_accuracy": res.eval_accuracy, "seed": args.seed}
    model, weight = lm.model, res.weight
    if lora_cfg is not None:
        pair_ids = list(zip(seqs[0::2], seqs[1::2]))
        train = [q for q, p in zip(pair_ids, pairs) if p.prompt not in held_prompts]
        held = [q for q, p in zip(pair_ids, pairs) if p.prompt in held_prompts]
        out = train_reward_lora(lm.model, tok, train, held, lora_cfg, init_weight=res.weight,
                                progress=not args.no_progress,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
        model, weight = out.model, out.weight
        meta["linear"] = {"train_accuracy": res.train_accuracy, "eval_accuracy": res.eval_accuracy}
        meta.update(train_accuracy=out.train_accuracy, eval_accuracy=out.eval_accuracy,
                    lora={**config_to_dict(lora_cfg), "target_modules": list(out.lora_targets)}, history=out.history)
    save_reward_classifier(model, tok, weight, args.out, meta=meta)
    print(json.dumps({"out": args.out, **meta}, indent=2))
    return 0
