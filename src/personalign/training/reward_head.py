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

NOTE: this is the paper baselines' "explicit reward model" at its cheapest (a linear probe); it is
a fair, fast stand-in on CPU, not a fine-tuned reward model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalign.personas.prompts import build_prompt_ids

__all__ = ["RewardHeadResult", "reward_features", "fit_reward_head", "save_reward_classifier", "reward_input_ids"]

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


@torch.no_grad()
def reward_features(lm: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                    max_length: int = 1024, progress: bool = False) -> torch.Tensor:
    """float32 [N, D]: the backbone's last hidden state at each sequence's last token."""
    dec = _backbone(lm)
    dev = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    starts = range(0, len(sequences), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reward features", unit="batch")
    for s in starts:
        rows = [list(q)[-max_length:] for q in sequences[s: s + batch_size]]
        W = max(len(r) for r in rows)
        ids = torch.full((len(rows), W), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), W, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last token sits in the last column
            ids[i, W - len(r):] = torch.tensor(r)
            mask[i, W - len(r):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        h = dec(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)).last_hidden_state
        out.append(h[:, -1].float().cpu())
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
    lam = l2 / float(scale) ** 2
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(d @ w)).mean() + lam * (w @ w)
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
    """Write ``lm``'s backbone + a one-label ``score`` head = ``weight`` as a sequence-classification
    checkpoint (with the tokenizer) that ``AutoModelForSequenceClassification.from_pretrained`` loads."""
    import json

    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(lm.config)
    cfg.num_labels = 1
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        clf = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as e:
        raise ValueError(f"{type(lm).__name__} has no sequence-classification counterpart in transformers: {e}") from e
    head = getattr(clf, "score", None)
    if head is None or head.weight.shape != (1, weight.shape[0]):
        raise ValueError(f"{type(clf).__name__} has no one-label `score` head of width {weight.shape[0]}.")
    missing, unexpected = _backbone(clf).load_state_dict(_backbone(lm).state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the backbone weights do not fit the classifier: missing {missing}, unexpected {unexpected}.")
    with torch.no_grad():
        head.weight.copy_(weight[None].to(head.weight.dtype))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if meta is not None:
        (out / "reward_head.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
