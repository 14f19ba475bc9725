"""Two-stage PersRM training (seed 000, Algorithm 1), one readable loop on ``accelerate``.

Data: JSONL (or a JSON array), one pair per line ``{"prompt", "chosen", "rejected", "preference"}``.

* Stage 1 — w_p ← 1, the value head frozen: train the LoRA adapter π_θ with the Eq. 9 loss (with
  w_p = 1 that is DPO on the preference-conditioned pairs).
* Stage 2 — π_θ frozen: train only the value head p -> w_p with the same loss. π_θ no longer
  changes, so each pair's Φ_w − Φ_l and each preference encoding e_p are computed once and the head
  trains on them (exactly the same loss and gradients as recomputing them every step).

After every epoch of either stage: held-out preference accuracy (margin > 0) on the eval pairs.
Runs on CPU, one GPU, or many GPUs/nodes under ``accelerate launch`` (gradient accumulation,
mixed precision and device placement come from ``Accelerator``).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from personalign.config import config_to_dict
from personalign.environment import environment_record
from personalign.records import PAIR_TEXTS, PairWording, PreferencePair, load_pairs
from personalign.training.persrm.loss import persrm_loss, persrm_margins
from personalign.training.persrm.model import PersRM, cosine_decay, persrm_prompt_ids

__all__ = ["PreferencePair", "PersRMTrainConfig", "read_pairs", "train_persrm", "evaluate_pairs", "encode_pairs",
           "kept_stage2"]

logger = logging.getLogger(__name__)
_FIELDS = (*PAIR_TEXTS, "preference")
_WORDING = PairWording(invalid_json="not valid JSON ({msg}).",
                       not_object="expected an object {{prompt, chosen, rejected, preference}}.",
                       missing="`{key}` must be a non-empty string (a PAD pair is prompt, chosen, rejected and the "
                               "preference it answers: one reward model learns all preferences), got None.",
                       not_text="`{key}` must be a non-empty string, got {value}.")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Read a pairs file (JSON lines or a JSON array) of ``{prompt, chosen, rejected, preference}``
    (``records.load_pairs``, trl layout). A malformed record raises ``ValueError`` naming the file,
    line and field; other fields are ignored.
    """
    return load_pairs(path, layout="trl", required=_FIELDS, optional=(), wording=_WORDING)


@dataclass(frozen=True, kw_only=True)
class PersRMTrainConfig:
    """Training settings (defaults sized for a small backbone on CPU; ``preset="paper"`` is the
    paper's App. A stage 1: lr 5e-6, 3 epochs, an effective batch of 128 pairs, LoRA r 8).

    Attributes:
        epochs: stage-1 epochs over the pairs (LoRA π_θ, w_p = 1).
        head_epochs: stage-2 epochs (value head only, on cached features).
        batch_size: pairs per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: stage-1 learning rate (AdamW, cosine schedule as in the paper's Appendix A).
        head_lr: stage-2 learning rate.
        head_weight_decay: stage-2 weight decay (keeps w_p near 1 for unseen preferences).
        head_select: ``best`` keeps the head of the stage-2 epoch with the lowest held-out loss,
            counting the head before stage 2 as epoch 0 (so stage 2 never worsens held-out loss);
            ``last`` keeps the last epoch's. Without held-out pairs both keep the last.
        beta: β of Eq. 9.
        lora_r: LoRA rank.
        eval_fraction: share of pairs held out when no eval file is given (split by prompt).
        max_prompt_tokens: prompt token budget (left-truncated: the end of a prompt is kept).
        max_response_tokens: response token budget (right-truncated).
        chat_template: render prompts with the tokenizer's chat template.
        seed: data order, split and LoRA init.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # App. A: LoRA r 8 on all layers, per-device batch 4 x 8 accumulation steps x 4 GPUs = 128,
        # lr 5e-6, 3 epochs, cosine schedule (Eq. 9's beta: 1.0 here, the paper's decoding beta)
        "paper": {"epochs": 3, "batch_size": 4, "grad_accum": 32, "lr": 5e-6, "lora_r": 8},
    }

    epochs: int = 1
    head_epochs: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    head_lr: float = 1e-3
    head_weight_decay: float = 0.01
    head_select: str = "best"
    beta: float = 1.0
    lora_r: int = 8
    eval_fraction: float = 0.1
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    chat_template: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "head_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("batch_size", "grad_accum", "lora_r", "max_prompt_tokens", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("lr", "head_lr", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        if self.head_select not in ("best", "last"):
            raise ValueError(f"`head_select` must be 'best' or 'last', got {self.head_select!r}.")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must lie in [0, 1), got {self.eval_fraction}.")


@dataclass
class EncodedPair:
    preference: str
    chosen: tuple[tuple[int, ...], tuple[int, ...]]  # (state prefix ids, response ids)
    rejected: tuple[tuple[int, ...], tuple[int, ...]]


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, cfg: PersRMTrainConfig) -> list[EncodedPair]:
    """Token ids of every pair under the PersRM prompt, truncated to the token budgets."""
    out = []
    for r in pairs:
        prefix = persrm_prompt_ids(tokenizer, r.prompt, r.preference, cfg.chat_template)[-cfg.max_prompt_tokens:]

        def resp(text: str) -> tuple[int, ...]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.max_response_tokens]
            return tuple(ids) or (tokenizer.eos_token_id or 0,)
        out.append(EncodedPair(r.preference, (prefix, resp(r.chosen)), (prefix, resp(r.rejected))))
    return out


def _pair_features(model: Any, batch: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Φ_w, Φ_l) float [B, D] each, from one forward per view over the 2B sequences.

    ``model`` is the PersRM or its accelerate/DDP wrapper (its forward is ``sequence_features``).
    """
    seqs = [p.chosen for p in batch] + [p.rejected for p in batch]
    feats = model([s[0] for s in seqs], [s[1] for s in seqs])
    return feats[: len(batch)], feats[len(batch):]


@torch.no_grad()
def evaluate_pairs(model: PersRM, pairs: Sequence[EncodedPair], *, stage: int, beta: float,
                   batch_size: int = 8) -> dict[str, Any]:
    """Held-out preference accuracy (margin > 0) overall and per preference, and the mean loss."""
    margins: list[float] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s: s + batch_size]
        fw, fl = _pair_features(model, chunk)
        w = torch.ones_like(fw) if stage == 1 else model.preference_weights([p.preference for p in chunk]).float()
        margins.extend(persrm_margins(w, fw, fl, beta).tolist())
    return _summary(margins, [p.preference for p in pairs])


def _cached_diffs(model: PersRM, pairs: Sequence[EncodedPair], batch_size: int = 8) -> torch.Tensor:
    """Φ_w − Φ_l of every pair, float [N, D] (π_θ frozen: computed once for stage 2)."""
    if not pairs:
        return torch.zeros(0, model.hidden_size, device=model.out_weight.device)
    return torch.cat([torch.sub(*_pair_features(model, pairs[s: s + batch_size]))
                      for s in range(0, len(pairs), batch_size)])


def _summary(margins: Sequence[float], prefs: Sequence[str]) -> dict[str, Any]:
    if not margins:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0, "per_preference": {}}
    per: dict[str, list[float]] = {}
    for m, p in zip(margins, prefs):
        per.setdefault(p, []).append(m)
    acc = lambda ms: sum(m > 0 for m in ms) / len(ms)  # noqa: E731
    loss = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / len(margins)
    return {"accuracy": acc(margins), "loss": loss, "n": len(margins),
            "per_preference": {p: {"accuracy": acc(ms), "n": len(ms)} for p, ms in per.items()}}


def kept_stage2(history: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out summary of the head ``train_persrm`` kept (``stage2_selected``; epoch 0 = the head
    before stage 2), or None without stage-2 epochs."""
    if not history.get("stage2"):
        return None
    sel = history.get("stage2_selected")
    if sel:
        return history["stage2"][sel - 1]
    return history.get("stage2_start", history["stage2"][-1])


def split_by_prompt(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out ``fraction`` of the distinct prompts (all their pairs), so eval prompts are unseen."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: int(round(fraction * len(prompts)))])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


def train_persrm(
    model: PersRM,
    train_pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair],
    cfg: PersRMTrainConfig,
    *,
    out_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Algorithm 1: stage 1 (π_θ, w_p = 1), then stage 2 (value head). Returns the history."""

    set_seed(cfg.seed)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    say = log or (lambda s: logger.info(s))
    train = encode_pairs(train_pairs, model.tokenizer, cfg)
    held = encode_pairs(eval_pairs, model.tokenizer, cfg)
    history: dict[str, Any] = {"stage1": [], "stage2": [], "n_train": len(train), "n_eval": len(held)}
    rng = random.Random(cfg.seed)

    # ---- stage 1: w_p <- 1, head frozen, train the LoRA adapter
    model.head.requires_grad_(False)
    params = [p for n, p in model.lm.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    steps = max(1, math.ceil(len(train) / cfg.batch_size / cfg.grad_accum) * cfg.epochs)
    sched = cosine_decay(opt, steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    core: PersRM = acc.unwrap_model(model)
    for epoch in range(cfg.epochs):
        core.lm.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = [[train[i] for i in order[s: s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
        bar = tqdm(batches, desc=f"stage 1 epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not acc.is_main_process)
        for batch in bar:
            with acc.accumulate(model):
                fw, fl = _pair_features(model, batch)
                loss = persrm_loss(torch.ones_like(fw), fw, fl, cfg.beta)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        core.lm.eval()
        ev = evaluate_pairs(core, held, stage=1, beta=cfg.beta)
        history["stage1"].append({"epoch": epoch + 1, **ev})
        say(f"stage 1 epoch {epoch + 1}: held-out accuracy {ev['accuracy']:.3f} loss {ev['loss']:.4f} (n={ev['n']})")

    # ---- stage 2: freeze π_θ, train only the head on cached Φ_w − Φ_l and e_p
    core.lm.eval()
    for p in core.lm.parameters():
        p.requires_grad_(False)
    core.head.requires_grad_(True)
    if cfg.head_epochs > 0 and train:
        with torch.no_grad():
            diffs = _cached_diffs(core, train)
            held_diffs = _cached_diffs(core, held)
            prefs = sorted({p.preference for p in train} | {p.preference for p in held})
            enc = core.encode_preferences(prefs)
        pref_idx = torch.tensor([prefs.index(p.preference) for p in train], dtype=torch.long, device=diffs.device)
        held_idx = torch.tensor([prefs.index(p.preference) for p in held], dtype=torch.long, device=diffs.device)
        hopt = acc.prepare(torch.optim.AdamW(core.head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay))

        def held_out() -> dict[str, Any]:
            if not held:  # no held-out pairs: nothing to measure
                return _summary([], [])
            with torch.no_grad():
                w = 1.0 + core.head(enc[held_idx])
                m = persrm_margins(w, held_diffs, torch.zeros_like(held_diffs), cfg.beta)
            return _summary(m.tolist(), [p.preference for p in held])

        best = None  # (held-out loss, epoch, head state): epoch 0 = the head before stage 2
        if held and cfg.head_select == "best":
            ev0 = held_out()
            history["stage2_start"] = ev0
            best = (ev0["loss"], 0, {k: v.detach().clone() for k, v in core.head.state_dict().items()})
        for epoch in range(cfg.head_epochs):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"stage 2 epoch {epoch + 1}/{cfg.head_epochs}",
                       disable=not progress or not acc.is_main_process, leave=False)
            for s in bar:
                idx = order[s: s + cfg.batch_size].to(diffs.device)
                with acc.accumulate(model):
                    w = 1.0 + core.head(enc[pref_idx[idx]])
                    loss = persrm_loss(w, diffs[idx], torch.zeros_like(diffs[idx]), cfg.beta)
                    acc.backward(loss)
                    hopt.step()
                    hopt.zero_grad()
            ev = held_out()
            history["stage2"].append({"epoch": epoch + 1, **ev})
            say(f"stage 2 epoch {epoch + 1}: held-out accuracy {ev['accuracy']:.3f} loss {ev['loss']:.4f}")
            if best is not None and ev["loss"] < best[0]:
                best = (ev["loss"], epoch + 1, {k: v.detach().clone() for k, v in core.head.state_dict().items()})
        if best is not None:
            core.head.load_state_dict(best[2])
            history["stage2_selected"] = best[1]
            say(f"stage 2: kept the head of epoch {best[1]} (lowest held-out loss {best[0]:.4f})")
        else:
            history["stage2_selected"] = cfg.head_epochs
    core.head.requires_grad_(False)
    core.eval()
    if out_dir is not None and acc.is_main_process:
        core.save(out_dir, extra={"train": config_to_dict(cfg), "history": history,
                                  "environment": environment_record(core.base_lm)})
    return history
