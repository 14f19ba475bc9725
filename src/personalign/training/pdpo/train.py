"""Training loops: P-DPO / P-IPO on a personalized LLM, and the personalized reward model (P-RM).

Paper: Li et al., P-RLHF, Section 4.4 (P-DPO), Appendix F.2 (P-RM), F.3 (P-IPO), C.3 (metrics).

Both loops read top to bottom the same way: tokenize -> LoRA adapter (PEFT) on the LLM + a user
model -> ``accelerate`` prepares model, optimizer, data and schedule (so the loop runs unchanged on a
CPU, a GPU, or many processes under ``torchrun`` / ``accelerate launch``; DDP is tested with two CPU
processes, DeepSpeed/FSDP go through accelerate's own config and are not tested here) -> for each batch:
forward, loss from ``loss.py``, ``accelerator.backward`` inside ``accelerator.accumulate`` (gradient
accumulation), clip, step -> evaluate every ``eval_every`` optimizer steps and at the end -> save.

Reference log-probs come from the same network with the adapter disabled and no user prompt (no
second model in memory). Vanilla DPO is the special case ``user_model="uniform", user_tokens=0,
alpha=1`` (the empty uniform user model); vanilla reward modelling is ``uniform, T_u=0, alpha=0``.

Metrics per evaluation (accuracy-top, accuracy-generic, per-user and per-group accuracies, paper
App. C.3) are defined in ``metrics.py``; they are logged, kept in the history and written to
``metrics.jsonl`` beside the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from personalign.config import check_int, check_positive, config_to_dict
from personalign.training.lora import fan_in_fan_out, lora_targets
from personalign.training.pdpo.checkpoint import save_checkpoint
from personalign.training.pdpo.data import PreferencePair, TokenizedPair, tokenize_pairs
from personalign.training.pdpo.loss import (
    PREFERENCE_LOSSES,
    check_alpha,
    check_beta,
    dpo_margin,
    pdpo_loss,
    personalized_rm_loss,
)
from personalign.training.pdpo.metrics import accuracy_metrics, evaluate_pdpo, evaluate_prm, reward_pairs
from personalign.training.pdpo.model import (
    REWARD_HEADS,
    PersonalizedLM,
    PersonalizedRewardModel,
    base_identity,
)
from personalign.training.user_model import CLUSTER_WEIGHTINGS, USER_MODEL_KINDS, UserIndex, UserModel

__all__ = ["PDPOTrainConfig", "TrainResult", "train_pdpo", "train_prm", "evaluate_pdpo", "evaluate_prm",
           "accuracy_metrics"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PDPOTrainConfig:
    """Hyper-parameters of a P-DPO / P-IPO / P-RM run.

    The defaults follow the paper's TL;DR setting (App. C.2: β 0.5, lr 5e-5, cosine, 2 epochs, LoRA
    r 8, α 16) except the batch (8 pairs per step, the paper's 32) and the warm-up (none, the paper's
    150 steps), sized for small runs; ``preset="paper"`` is App. C.2 exactly and ``paper_psoups`` its
    P-SOUPS setting (docs/methods.md lists each value and where it comes from).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # App. C.2, TL;DR: beta 0.5, batch 32, lr 5e-5, cosine, 150 warm-up steps, 2 epochs, LoRA alpha 16, r 8
        "paper": {"beta": 0.5, "batch_size": 32, "grad_accum": 1, "learning_rate": 5e-5, "warmup_steps": 150,
                  "epochs": 2, "lora_r": 8, "lora_alpha": 16.0},
        # App. C.2, P-SOUPS: beta 0.1, batch 32, lr 5e-5, cosine, 150 warm-up, 2 epochs, LoRA alpha 32, r 8, dropout 0.1
        "paper_psoups": {"beta": 0.1, "batch_size": 32, "grad_accum": 1, "learning_rate": 5e-5, "warmup_steps": 150,
                         "epochs": 2, "lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.1},
    }

    user_model: str = "individual"  # uniform | individual | cluster (Examples 1-3)
    user_tokens: int = 10  # T_u; 0 only with the uniform model (empty: vanilla DPO)
    clusters: int = 5  # K of the cluster model
    weighting: str = "softmax"  # softmax | linear cluster weights
    alpha: float = 0.5  # weight of the user's own term; 1 - alpha on the generic user 0
    beta: float = 0.5  # KL strength of DPO / IPO (unused by P-RM)
    loss: str = "dpo"  # dpo (P-DPO) | ipo (P-IPO)
    head: str = "soft_prompt"  # P-RM only: soft_prompt | linear
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # module names; () = every attention and MLP projection (training.lora)
    learning_rate: float = 5e-5  # LoRA (and value-head) learning rate
    user_learning_rate: float = 0.0  # user-model learning rate; 0 = learning_rate
    epochs: int = 2
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    batch_size: int = 8  # pairs per forward (per process)
    grad_accum: int = 1  # forwards per optimizer step
    warmup_steps: int = 0  # linear warm-up, then cosine decay
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    eval_every: int = 0  # evaluate every N optimizer steps (0 = only at the end)
    eval_batch_size: int = 16
    seed: int = 0
    chat_template: bool = True  # format prompts with the tokenizer's chat template when it has one
    end_token_id: int = -1  # id that ends every response (and stops generation); -1 = the tokenizer's EOS

    def __post_init__(self) -> None:
        if self.user_model not in USER_MODEL_KINDS:
            raise ValueError(f"`user_model` must be one of {', '.join(USER_MODEL_KINDS)}, got {self.user_model!r}.")
        check_int("user_tokens", self.user_tokens, 0)
        if self.user_model != "uniform" and self.user_tokens < 1:
            raise ValueError(
                f"`user_tokens` (T_u) must be >= 1 for a {self.user_model!r} user model, got {self.user_tokens}; "
                "only the uniform model may be empty (T_u = 0, vanilla DPO)."
            )
        check_int("clusters", self.clusters, 1)
        if self.weighting not in CLUSTER_WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {', '.join(CLUSTER_WEIGHTINGS)}, got {self.weighting!r}.")
        check_alpha(self.alpha)
        check_beta(self.beta)
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"`loss` must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}.")
        if self.head not in REWARD_HEADS:
            raise ValueError(f"`head` must be one of {', '.join(REWARD_HEADS)}, got {self.head!r}.")
        check_int("lora_r", self.lora_r, 1)
        check_positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must lie in [0, 1), got {self.lora_dropout!r}.")
        check_positive("learning_rate", self.learning_rate)
        check_positive("user_learning_rate", self.user_learning_rate, allow_zero=True)
        check_int("epochs", self.epochs, 1)
        check_int("max_steps", self.max_steps, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_int("max_prompt_tokens", self.max_prompt_tokens, 1)
        check_int("max_response_tokens", self.max_response_tokens, 1)
        check_int("eval_every", self.eval_every, 0)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("end_token_id", self.end_token_id, -1)


@dataclass
class TrainResult:
    """A finished run: the trained model (LM with adapter + user model), its index and the metric log."""

    model: Any
    index: UserIndex
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------- shared setup
def _setup(base: Any, train_pairs: Sequence[PreferencePair], config: PDPOTrainConfig,
           eval_pairs: Sequence[PreferencePair] | None, user_ids: Sequence[str] | None):
    """Index, tokenized data, LoRA-wrapped LM and user model (before ``accelerate``)."""

    index = UserIndex(user_ids if user_ids is not None else list(dict.fromkeys(
        p.user_id for p in train_pairs if p.user_id is not None)))
    for n, p in enumerate(train_pairs):
        if p.user_id is None:
            raise ValueError(f"training pair {n}: `user_id` is required (the annotator's identifier).")
        index.row(p.user_id, strict=True)  # unknown user at training -> ValueError
    tok_kw = dict(max_prompt_tokens=config.max_prompt_tokens, max_response_tokens=config.max_response_tokens,
                  chat_template=config.chat_template,
                  end_token_id=None if config.end_token_id < 0 else config.end_token_id)
    if config.end_token_id >= len(base.tokenizer):
        raise ValueError(f"`end_token_id` must be a token id < {len(base.tokenizer)}, got {config.end_token_id}.")
    train = tokenize_pairs(train_pairs, base.tokenizer, **tok_kw)
    evals = tokenize_pairs(eval_pairs, base.tokenizer, **tok_kw) if eval_pairs else []
    torch.manual_seed(config.seed)
    identity = base_identity(base.model, base.name, getattr(base, "gguf_file", None))
    targets = lora_targets(base.model, config.lora_targets, what=f"the P-DPO base model {base.name!r}")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(targets), fan_in_fan_out=fan_in_fan_out(base.model, targets), bias="none")
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", category=FutureWarning)
        lm = get_peft_model(base.model, lora)
    users = UserModel.for_model(base.model, kind=config.user_model, num_users=len(index),
                                user_tokens=config.user_tokens, clusters=config.clusters,
                                weighting=config.weighting, seed=config.seed)
    users.to(next(base.model.parameters()).device)
    return index, train, evals, lm, users, identity


def _run(model: torch.nn.Module, train: list[TokenizedPair], config: PDPOTrainConfig,
         loss_fn: Callable[[Any, list[TokenizedPair]], tuple[torch.Tensor, torch.Tensor]],
         evaluate: Callable[[Any], dict[str, Any]], param_groups: list[dict[str, Any]],
         progress: bool) -> tuple[Any, list[dict[str, Any]], bool]:
    """THE loop shared by both objectives: accelerate, accumulate, clip, step, evaluate."""

    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum)
    gen = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(list(range(len(train))), batch_size=config.batch_size, shuffle=True,
                                         generator=gen, collate_fn=lambda idx: [train[i] for i in idx])
    # optimizer steps per process: the prepared loader yields this process's shard of every epoch
    steps_per_epoch = math.ceil(math.ceil(len(loader) / accelerator.num_processes) / config.grad_accum)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    # accelerate steps a prepared scheduler once per process at every optimizer step
    n = accelerator.num_processes
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * n, max(total, 1) * n)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    logger.info("training on %d process(es), %d batches per epoch each, %d optimizer steps",
                accelerator.num_processes, len(loader), total)
    bar = tqdm(total=total, desc="train", disable=not progress or not accelerator.is_main_process)
    history: list[dict[str, Any]] = []
    step, run_loss, run_acc, n_fw = 0, 0.0, 0.0, 0
    model.train()
    for _epoch in range(config.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss, correct = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            run_loss, run_acc, n_fw = run_loss + float(loss.detach()), run_acc + float(correct.float().mean()), n_fw + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / n_fw:.4f}", acc=f"{run_acc / n_fw:.2f}")
            if config.eval_every and step % config.eval_every == 0 and step < total:
                history.append(_log_eval(step, run_loss / n_fw, evaluate(accelerator.unwrap_model(model))))
                run_loss, run_acc, n_fw = 0.0, 0.0, 0
            if step >= total:
                break
        if step >= total:
            break
    bar.close()
    history.append(_log_eval(step, run_loss / max(n_fw, 1), evaluate(accelerator.unwrap_model(model))))
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), history, accelerator.is_main_process


def _log_eval(step: int, train_loss: float, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"step": step, "train_loss": train_loss, **metrics}
    logger.info("step %d: loss %.4f accuracy_top %.3f accuracy_generic %.3f", step, train_loss,
                metrics.get("accuracy_top", float("nan")), metrics.get("accuracy_generic", float("nan")))
    return row


def _groups(lm: Any, users: UserModel, config: PDPOTrainConfig, extra: Sequence[torch.nn.Parameter] = ()):
    lora = [p for p in lm.parameters() if p.requires_grad]
    groups = [{"params": lora + list(extra), "lr": config.learning_rate}]
    user_params = list(users.parameters())
    if user_params and any(p.numel() for p in user_params):
        groups.append({"params": user_params, "lr": config.user_learning_rate or config.learning_rate})
    return groups


# ----------------------------------------------------------------------------- P-DPO / P-IPO
def train_pdpo(
    base: Any,
    train_pairs: Sequence[PreferencePair],
    config: PDPOTrainConfig,
    *,
    eval_pairs: Sequence[PreferencePair] | None = None,
    out: str | Path | None = None,
    user_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a personalized LLM with P-DPO (``config.loss="dpo"``) or P-IPO (``"ipo"``).

    Args:
        base: a ``LoadedModel`` (the SFT model; its weights stay frozen, a LoRA adapter is added in place).
        train_pairs: pairs with a ``user_id`` each.
        config: hyper-parameters.
        eval_pairs: pairs for the metrics (users outside the index count as unseen: accuracy-generic).
        out: checkpoint directory (written at the end), or None.
        user_ids: the seen users in row order (default: the training ids by first appearance); a
            training pair of any other user is an error.
        progress: show a progress bar.
    """
    index, train, evals, lm, users, identity = _setup(base, train_pairs, config, eval_pairs, user_ids)
    policy = PersonalizedLM(lm, users)
    generic = config.alpha < 1.0

    def loss_fn(model: Any, batch: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(model.parameters()).device
        rows = index.rows([p.user_id for p in batch], strict=True).to(dev)
        o = model(batch, rows, generic)
        losses = pdpo_loss(o["user_chosen"], o["user_rejected"], o.get("generic_chosen"), o.get("generic_rejected"),
                           o["reference_chosen"], o["reference_rejected"], beta=config.beta, alpha=config.alpha,
                           loss=config.loss)
        margin = dpo_margin(o["user_chosen"], o["user_rejected"], o["reference_chosen"], o["reference_rejected"])
        return losses.mean(), margin.detach() > 0

    def evaluate(model: Any) -> dict[str, Any]:
        return evaluate_pdpo(model, evals, index, config.eval_batch_size) if evals else {}

    model, history, is_main = _run(policy, train, config, loss_fn, evaluate, _groups(lm, users, config), progress)
    ckpt = None
    if out is not None and is_main:
        ckpt = save_checkpoint(out, lm=model.lm, users=model.users, index=index,
                               objective="pdpo" if config.loss == "dpo" else "pipo",
                               train_config=config_to_dict(config), base=identity,
                               metrics=history[-1] if history else {})
        _write_history(ckpt, history)
    return TrainResult(model=model, index=index, history=history, checkpoint=ckpt)


# ----------------------------------------------------------------------------- P-RM
def train_prm(
    base: Any,
    train_pairs: Sequence[PreferencePair],
    config: PDPOTrainConfig,
    *,
    eval_pairs: Sequence[PreferencePair] | None = None,
    out: str | Path | None = None,
    user_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a personalized reward model (App. F.2) with the alpha-mixed Bradley-Terry loss.

    Same arguments as ``train_pdpo``; ``config.head`` picks soft-prompt or linear-head user embeddings.
    """
    if config.head == "linear" and any(p.user_text for p in [*train_pairs, *(eval_pairs or [])]):
        raise ValueError("`head` 'linear' takes no `user_text` (its user embedding must be one vector); "
                         "use `head` 'soft_prompt' for users with text.")
    if config.head == "linear" and config.user_tokens != 1:
        raise ValueError(f"`head` 'linear' needs `user_tokens` 1 (a vector user embedding), got {config.user_tokens}.")
    index, train, evals, lm, users, identity = _setup(base, train_pairs, config, eval_pairs, user_ids)
    rm = PersonalizedRewardModel(lm, users, head=config.head)
    if rm.value_head is not None:
        rm.value_head.to(next(base.model.parameters()).device)
    generic = config.alpha < 1.0

    def loss_fn(model: Any, batch: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(model.parameters()).device
        B = len(batch)
        rows = index.rows([p.user_id for p in batch], strict=True).to(dev)
        both = batch * 2 if generic else batch
        all_rows = torch.cat([rows, torch.zeros_like(rows)]) if generic else rows
        r = reward_pairs(model, both, torch.cat([all_rows, all_rows]))
        # r = [chosen of `both` | rejected of `both`] = [user c | (generic c) | user r | (generic r)]
        if generic:
            uc, gc, ur, gr = r.split(B)
        else:
            (uc, ur), gc, gr = r.split(B), None, None
        losses = personalized_rm_loss(uc, ur, gc, gr, alpha=config.alpha)
        return losses.mean(), (uc - ur).detach() > 0

    def evaluate(model: Any) -> dict[str, Any]:
        return evaluate_prm(model, evals, index, config.eval_batch_size) if evals else {}

    extra = list(rm.value_head.parameters()) if rm.value_head is not None else []
    model, history, is_main = _run(rm, train, config, loss_fn, evaluate, _groups(lm, users, config, extra), progress)
    ckpt = None
    if out is not None and is_main:
        ckpt = save_checkpoint(out, lm=model.lm, users=model.users, index=index, objective="prm",
                               train_config=config_to_dict(config), base=identity,
                               metrics=history[-1] if history else {}, value_head=model.value_head)
        _write_history(ckpt, history)
    return TrainResult(model=model, index=index, history=history, checkpoint=ckpt)


def _write_history(directory: Path, history: list[dict[str, Any]]) -> None:
    with (directory / "metrics.jsonl").open("w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
