"""A Bradley–Terry reward model in minutes: a linear head on a frozen causal LM, saved as a standard
Hugging Face sequence-classification checkpoint (``personalign train rm``).

For pairs (x, y_w, y_l) the reward is r(x, y) = wᵀ h(x, y), with h the backbone's last hidden state
(after its final norm) at the last token of ``prompt_ids(x) ∘ ids(y)``. Training minimizes the
Bradley–Terry loss with an L2 penalty,

    L(w) = mean_i softplus(−wᵀ (h_w,i − h_l,i)) + λ ‖w‖²,

which is convex in w (L-BFGS to convergence); the backbone never changes, so the features are
computed once. The result is written as ``AutoModelForSequenceClassification`` (the backbone's
weights + ``score`` = w, ``num_labels = 1``) with its tokenizer, so ``--reward-model DIR`` loads it
anywhere a reward model is accepted (ARGS, best-of-N, the evaluation's reward metric), and ARGS
reads it through cached reward views (``RewardLMView``) when it shares the policy's tokenizer.

The text the head reads is exactly what ARGS' cached reward views hold: the prompt encoded by
``build_prompt_ids`` (chat template; with ``preference_in_prompt`` the pair's preference as the
system message) followed by the response's token ids. A preference-conditioned head is then one
reward model for every preference (``args --param reward_preference=true``).

``train_reward_lora`` (``train rm --lora``) goes further: it fine-tunes the same reward, a LoRA
adapter on the backbone's projections plus the head (initialized at the linear fit), on the same
Bradley–Terry loss without the penalty, then merges the adapter into a copy of the backbone and
saves the same kind of checkpoint. The linear fit alone is the cheapest explicit reward model (a
probe); the LoRA fine-tune is the usual one (minutes on CPU for ~100 pairs of a 135M model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from personalign.config import check_int, check_positive
from personalign.personas.prompts import build_prompt_ids, pad_token_id
from personalign.training.lora import fan_in_fan_out, lora_targets
from personalign.training.persrm.model import cosine_decay
from personalign.views.masks import padded_mask

__all__ = ["RewardHeadResult", "reward_features", "fit_reward_head", "save_reward_classifier", "reward_input_ids",
           "RewardLoRAConfig", "RewardLoRAResult", "train_reward_lora"]

logger = logging.getLogger(__name__)


@dataclass
class RewardHeadResult:
    weight: torch.Tensor  # float32 [D]
    train_accuracy: float
    eval_accuracy: float | None
    n_train: int
    n_eval: int


def reward_input_ids(tokenizer: Any, prompt: Any, response: str, preference: str | None = None,
                     chat_template: bool = True) -> list[int]:
    """Token ids the reward head reads: the (system = preference) prompt, then the response."""
    ids = list(build_prompt_ids(tokenizer, prompt, system=preference, chat_template=chat_template))
    return ids + list(tokenizer(response, add_special_tokens=False)["input_ids"])


def _backbone(lm: Any) -> Any:
    prefix = getattr(lm, "base_model_prefix", "model")
    dec = getattr(lm, prefix, None)
    if dec is None:
        raise ValueError(f"cannot find the backbone of {type(lm).__name__} (no attribute {prefix!r}).")
    return dec


def _left_padded(rows: Sequence[Sequence[int]], pad: int, max_length: int, device: Any) -> dict[str, torch.Tensor]:
    """Backbone inputs for ``rows`` (each cut to its last ``max_length`` tokens), left-padded so every
    row's last token sits in the last column, with positions counted from each row's first token."""
    rows = [list(r)[-max_length:] for r in rows]
    W = max(len(r) for r in rows)
    ids = torch.full((len(rows), W), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), W, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, W - len(r):] = torch.tensor(r)
        mask[i, W - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def _last_hidden(lm: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, D]: the backbone's last hidden state (after its final norm) at each row's last token."""

    batch = {**batch, "attention_mask": padded_mask(lm, batch["attention_mask"], batch["position_ids"])}
    return _backbone(lm)(**batch).last_hidden_state[:, -1]


@torch.no_grad()
def reward_features(lm: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                    max_length: int = 1024, progress: bool = False) -> torch.Tensor:
    """float32 [N, D]: the backbone's last hidden state at each sequence's last token."""
    dev = next(lm.parameters()).device
    pad = pad_token_id(tokenizer)
    out = []
    starts = range(0, len(sequences), batch_size)
    if progress:
        starts = tqdm(starts, desc="reward features", unit="batch")
    for s in starts:
        batch = _left_padded(sequences[s: s + batch_size], pad, max_length, dev)
        out.append(_last_hidden(lm, batch).float().cpu())
    return torch.cat(out)


def fit_reward_head(diff_train: torch.Tensor, diff_eval: torch.Tensor | None = None, *, l2: float = 1e-3,
                    max_iter: int = 500) -> RewardHeadResult:
    """Minimize mean softplus(−w·d) + l2‖w‖² over the feature differences ``d`` = h_w − h_l [N, D]."""
    if diff_train.dim() != 2 or diff_train.shape[0] < 1:
        raise ValueError(f"`diff_train` must be [N >= 1, D], got {tuple(diff_train.shape)}.")
    if l2 < 0:
        raise ValueError(f"`l2` must be >= 0, got {l2}.")
    d = diff_train.double()
    scale = d.norm(dim=1).mean().clamp(min=1e-12)  # conditioning only: w is rescaled back below
    d = d / scale  # optimize w' = scale·w: d'·w' = d·w and l2‖w‖² = (l2 / scale²)‖w'‖²
    l2_scaled = l2 / float(scale) ** 2
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(d @ w)).mean() + l2_scaled * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w.detach() / scale).float()
    acc = float(((diff_train.float() @ weight) > 0).float().mean())
    eval_acc = None
    if diff_eval is not None and diff_eval.shape[0]:
        eval_acc = float(((diff_eval.float() @ weight) > 0).float().mean())
    return RewardHeadResult(weight=weight, train_accuracy=acc, eval_accuracy=eval_acc,
                            n_train=int(diff_train.shape[0]), n_eval=0 if diff_eval is None else int(diff_eval.shape[0]))


def save_reward_classifier(lm: Any, tokenizer: Any, weight: torch.Tensor, out: str | Path,
                           meta: dict[str, Any] | None = None) -> Path:
    """Write ``lm``'s backbone + a one-label head = ``weight`` as a reward model directory (with the
    tokenizer): a sequence-classification checkpoint (``score`` head) that
    ``AutoModelForSequenceClassification.from_pretrained`` loads, where transformers has that class for
    the architecture; else the causal LM itself with the head beside it in ``reward_head.safetensors``
    (``views.reward.load_reward_model`` reads both)."""


    cfg = copy.deepcopy(lm.config)
    cfg.num_labels = 1
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        clf = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError:
        clf = None  # no sequence-classification class: the causal LM + a linear head file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if clf is None:
        lm.save_pretrained(out)
        save_file({"weight": weight[None].float().cpu().contiguous()}, str(out / "reward_head.safetensors"))
        kind = f"{type(lm).__name__} + linear reward head (reward_head.safetensors)"
    else:
        head = getattr(clf, "score", None)
        if head is None or head.weight.shape != (1, weight.shape[0]):
            raise ValueError(f"{type(clf).__name__} has no one-label `score` head of width {weight.shape[0]}.")
        missing, unexpected = _backbone(clf).load_state_dict(_backbone(lm).state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"the backbone weights do not fit the classifier: missing {missing}, unexpected {unexpected}.")
        with torch.no_grad():
            head.weight.copy_(weight[None].to(head.weight.dtype))
        clf.save_pretrained(out)
        kind = type(clf).__name__
    tokenizer.save_pretrained(out)
    if meta is not None:
        (out / "reward_head.json").write_text(json.dumps({"format": kind, **meta}, indent=2) + "\n")
    return out


# ------------------------------------------------------------------ LoRA fine-tuning (train rm --lora)
@dataclass(frozen=True, kw_only=True)
class RewardLoRAConfig:
    """Settings of ``train_reward_lora``.

    Attributes:
        epochs: passes over the training pairs.
        lr: learning rate of the LoRA adapter (AdamW, cosine decay to 0).
        head_lr: learning rate of the linear head.
        batch_size: pairs per optimizer step (both answers of a pair in one forward).
        grad_accum: steps of gradient accumulation.
        rank, alpha: LoRA rank and α on every attention and MLP projection.
        max_length: tokens kept per sequence (its end).
        seed: shuffling and initialization.
    """

    epochs: int = 2
    lr: float = 2e-4
    head_lr: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    rank: int = 8
    alpha: int = 16
    max_length: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "rank", "alpha", "max_length"):
            check_int(name, getattr(self, name), 1)
        for name in ("lr", "head_lr"):
            check_positive(name, getattr(self, name))


@dataclass
class RewardLoRAResult:
    model: Any  # a copy of the backbone LM with the trained adapter merged in
    weight: torch.Tensor  # float32 [D], the trained head
    history: list[dict[str, Any]]
    train_accuracy: float
    eval_accuracy: float | None
    lora_targets: tuple[str, ...] = ()  # the modules the adapter covered (training.lora)


class _BradleyTerryRM(torch.nn.Module):
    """r(x, y) = wᵀ h(x, y) over a PEFT-wrapped LM (only the adapter and w train)."""

    def __init__(self, peft_lm: Any, weight: torch.Tensor) -> None:
        super().__init__()
        self.lm = peft_lm
        self.head = torch.nn.Parameter(weight.detach().float().clone())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _last_hidden(self.lm.get_base_model(), batch).float() @ self.head


def _pair_rewards(model: _BradleyTerryRM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int,
                  max_length: int, device: Any) -> torch.Tensor:
    """[n, 2]: (r(chosen), r(rejected)) of each pair, all 2n sequences in one forward."""
    rows = [seq for pair in pairs for seq in pair]
    return model(_left_padded(rows, pad, max_length, device)).view(-1, 2)


@torch.no_grad()
def _accuracy(model: _BradleyTerryRM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int,
              cfg: RewardLoRAConfig, device: Any) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` on ``pairs``: r(chosen) > r(rejected)."""
    r = torch.cat([_pair_rewards(model, pairs[s: s + 8], pad, cfg.max_length, device) for s in range(0, len(pairs), 8)])
    margins = r[:, 0] - r[:, 1]
    return float((margins > 0).float().mean()), float(torch.nn.functional.softplus(-margins).mean())


def train_reward_lora(lm: Any, tokenizer: Any, train: Sequence[tuple[Sequence[int], Sequence[int]]],
                      held: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: RewardLoRAConfig, *,
                      init_weight: torch.Tensor | None = None, progress: bool = True,
                      log: Any = None) -> RewardLoRAResult:
    """Fine-tune r(x, y) = wᵀ h(x, y) with a LoRA adapter on (a copy of) ``lm``: Bradley–Terry loss
    mean softplus(r(x, y_l) − r(x, y_w)) over (chosen ids, rejected ids) pairs, built on ``accelerate``.

    ``lm`` itself is left untouched. ``init_weight`` starts the head (default: zeros, so the first
    steps move only the head). Held-out accuracy and loss are logged before training and after every
    epoch (``history``).
    """



    if not train:
        raise ValueError("`train` must hold at least one pair.")
    say = log or (lambda s: logger.info(s))
    set_seed(cfg.seed)
    targets = lora_targets(lm, what="the reward model's backbone")
    peft_lm = get_peft_model(copy.deepcopy(lm), LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                            target_modules=list(targets), bias="none",
                                                            fan_in_fan_out=fan_in_fan_out(lm, targets)))
    D = lm.get_input_embeddings().embedding_dim
    w0 = init_weight if init_weight is not None else torch.zeros(D)
    if w0.shape != (D,):
        raise ValueError(f"`init_weight` must have shape [{D}], got {tuple(w0.shape)}.")
    model = _BradleyTerryRM(peft_lm, w0)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    lora_params = [p for n, p in model.lm.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr}, {"params": [model.head], "lr": cfg.head_lr}],
                            weight_decay=0.0)
    steps = max(1, math.ceil(len(train) / cfg.batch_size / cfg.grad_accum) * cfg.epochs)
    sched = cosine_decay(opt, steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    core: _BradleyTerryRM = acc.unwrap_model(model)
    pad, dev = pad_token_id(tokenizer), acc.device
    history: list[dict[str, Any]] = []

    def evaluate(epoch: int, train_loss: float | None) -> None:
        core.eval()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        if held:
            row["eval_accuracy"], row["eval_loss"] = _accuracy(core, held, pad, cfg, dev)
            say(f"epoch {epoch}: held-out accuracy {row['eval_accuracy']:.3f} loss {row['eval_loss']:.4f} (n={len(held)})")
        history.append(row)

    evaluate(0, None)
    rng = random.Random(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        core.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = [[train[i] for i in order[s: s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
        bar = tqdm(batches, desc=f"reward LoRA epoch {epoch}/{cfg.epochs}", disable=not progress or not acc.is_main_process)
        losses = []
        for batch in bar:
            with acc.accumulate(model):
                r = _pair_rewards(model, batch, pad, cfg.max_length, dev)
                loss = torch.nn.functional.softplus(r[:, 1] - r[:, 0]).mean()
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        evaluate(epoch, sum(losses) / len(losses))
    core.eval()
    train_acc, _ = _accuracy(core, train, pad, cfg, dev)
    weight = core.head.detach().float().cpu().clone()
    merged = core.lm.merge_and_unload()
    return RewardLoRAResult(model=merged, weight=weight, history=history, train_accuracy=train_acc,
                            eval_accuracy=history[-1].get("eval_accuracy"), lora_targets=targets)
