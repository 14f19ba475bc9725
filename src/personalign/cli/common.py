"""Options shared by several commands: the model, and the resources methods need (``assembly.Resources``)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from personalign.assembly import Resources
from personalign.views.loading import load_model

__all__ = ["add_model_options", "add_resource_options", "resources_from_args", "method_params_from_args",
           "load_from_args", "make_generator", "device_of"]


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="PATH",
                   help="local model directory, .gguf file, hub id, or 'smollm2' (the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--gguf-file", metavar="NAME", help="GGUF file name inside --model")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")


def add_resource_options(p: argparse.ArgumentParser) -> None:
    """The inputs methods may need (each names the method that reads it): mapped to ``Resources``."""
    g = p.add_argument_group("method inputs")
    g.add_argument("--persrm", metavar="DIR",
                   help="a PersRM checkpoint (personalign train pad): pad, and the reward of args / best_of_n")
    g.add_argument("--reward-model", metavar="PATH",
                   help="a local reward model (personalign train rm, or a sequence-classification model): args, best_of_n")
    g.add_argument("--reward-label", type=int, default=0, metavar="I", help="the reward model's output column")
    g.add_argument("--reward-function", metavar="MODULE:NAME",
                   help="a Python reward function f(prompt, response[, preference]) -> float, as "
                        "package.module:name or path/to/file.py:name (args, best_of_n)")
    g.add_argument("--checkpoint", metavar="DIR", help="pdpo: a checkpoint from `personalign train pdpo`")
    g.add_argument("--user", metavar="USER_ID", help="pdpo: the user's id (unknown ids use the generic user)")
    g.add_argument("--user-text", metavar="TEXT", help="pdpo: the user's textual information (optional)")
    g.add_argument("--profile", metavar="PROFILE.json", help="drift: the user's profile (personalign fit drift)")
    g.add_argument("--steer-model", metavar="PATH",
                   help="drift: the small steering model the profile was fitted with (default: --model)")
    g.add_argument("--steer-gguf-file", metavar="NAME", help="drift: GGUF file name inside --steer-model")


def resources_from_args(args: argparse.Namespace, *, shared: bool = False) -> Resources:
    """The ``Resources`` the flags name (``shared``: one backend serves several methods)."""
    return Resources(model=args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                     random_weights=getattr(args, "random_weights", False), tokenizer=getattr(args, "tokenizer", None),
                     persrm=args.persrm, steer_model=args.steer_model, steer_gguf_file=args.steer_gguf_file,
                     reward_model=args.reward_model, reward_label=args.reward_label,
                     reward_function=args.reward_function, pdpo_checkpoint=args.checkpoint,
                     drift_profile=args.profile, shared=shared)


def method_params_from_args(name: str, args: argparse.Namespace, params: dict) -> dict:
    """``params`` with the method's own flags (P-DPO's ``--user``, ``--user-text``) where not given."""
    params = dict(params)
    if name == "pdpo":
        if args.user is not None:
            params.setdefault("user", args.user)
        if args.user_text is not None:
            params.setdefault("user_text", args.user_text)
    return params


def device_of(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_from_args(args: argparse.Namespace, model: str | None = None, gguf_file: str | None = None) -> Any:
    return load_model(
        model or args.model,
        gguf_file=gguf_file if model else args.gguf_file,
        dtype=args.dtype,
        device=device_of(args),
        random_weights=getattr(args, "random_weights", False),
        tokenizer=getattr(args, "tokenizer", None),
    )


def make_generator(seed: int | None, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g
