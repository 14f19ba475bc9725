"""The personalized LLM ``pi_p(y | x, u)`` and the personalized reward model ``r_p(x, y, u)``.

``PersonalizedLM`` = a causal LM (LoRA adapter through PEFT) + a ``UserModel``. Every row is laid out as
``[e_u (P_b soft-prompt vectors) | prompt ids | response ids]``, left-padded, with position ids counted
over real columns — the layout ``HFBackend`` uses for ``ViewSpec(prefix_embeds=e_u)`` at generation
time, so training and generation see the same inputs. The reference ``pi_SFT(y | x)`` is the same
network with the adapter disabled and no user prompt: no second copy of the model in memory.

``PersonalizedRewardModel`` (paper App. F.2) = the LM trunk + the user model, with the user
embedding either as a soft prompt (then a linear value head on the last hidden state) or as the
linear head itself (``r = <e_u, h_last>``; needs a vector ``e_u``: T_u = 1 and no user text).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalign.training.pdpo.data import TokenizedPair
from personalign.training.user_model import UserModel
from personalign.views.masks import padded_mask

__all__ = ["PersonalizedLM", "PersonalizedRewardModel", "REWARD_HEADS", "base_identity", "check_base_identity",
           "pack_rows", "sequence_logps"]

REWARD_HEADS = ("soft_prompt", "linear")


def pack_rows(
    embed: nn.Module, prefixes: Sequence[torch.Tensor | None], ids: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``[prefix_b | embed(ids_b)]`` -> inputs_embeds [R, W, D], mask long [R, W], positions [R, W]."""
    weight = embed.weight
    rows = []
    for pre, seq in zip(prefixes, ids):
        e = embed(torch.tensor(list(seq), dtype=torch.long, device=weight.device))
        rows.append(e if pre is None or pre.shape[0] == 0 else torch.cat([pre.to(e.dtype), e], 0))
    W = max(r.shape[0] for r in rows)
    mask = torch.zeros(len(rows), W, dtype=torch.long, device=weight.device)
    padded = []
    for r, e in enumerate(rows):
        mask[r, W - e.shape[0]:] = 1
        padded.append(F.pad(e, (0, 0, W - e.shape[0], 0)))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return torch.stack(padded), mask, pos


def sequence_logps(
    lm: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    prefixes: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Summed log-probs float32 [R] of each response after its prefix and prompt under ``lm`` (no cache)."""
    if prefixes is None:
        prefixes = [None] * len(prompts)
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    embeds, mask, pos = pack_rows(lm.get_input_embeddings(), prefixes, seqs)
    n_resp = torch.tensor([len(r) for r in responses], device=mask.device)
    keep = int(n_resp.max()) + 1
    logits = lm(inputs_embeds=embeds, attention_mask=padded_mask(lm, mask, pos), position_ids=pos,
                use_cache=False, logits_to_keep=keep).logits  # [R, keep, V]
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1)  # column j predicts kept column j + 1
    targets = torch.zeros(len(seqs), keep - 1, dtype=torch.long, device=mask.device)
    valid = torch.zeros(len(seqs), keep - 1, dtype=torch.bool, device=mask.device)
    for r, resp in enumerate(responses):
        if resp:
            targets[r, keep - 1 - len(resp):] = torch.tensor(list(resp), device=mask.device)
            valid[r, keep - 1 - len(resp):] = True
    tok = logprobs.gather(-1, targets[..., None])[..., 0]
    return (tok * valid).sum(-1)


def _adapter_off(lm: Any) -> Any:
    return lm.disable_adapter() if hasattr(lm, "disable_adapter") else contextlib.nullcontext()


class PersonalizedLM(nn.Module):
    """``pi_p`` = LM (with its LoRA adapter, if any) + user model; see the module docstring."""

    def __init__(self, lm: nn.Module, users: UserModel) -> None:
        super().__init__()
        self.lm = lm
        self.users = users

    def input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def user_prefixes(self, rows: torch.Tensor, text_ids: Sequence[Sequence[int]] | None) -> list[torch.Tensor]:
        """Soft prompts e_u, a list of B float [P_b, D] (grad flows into the user model)."""
        return self.users.prefixes(rows, self.input_embeddings(), text_ids)

    def sequence_logps(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        prefixes: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Summed log-probs float32 [R] of each response after its prefix and prompt (no cache)."""
        return sequence_logps(self.lm, prompts, responses, prefixes)

    def reference_logps(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """``log pi_SFT(y | x)`` float32 [R]: adapter disabled, no user prompt, no grad."""
        with torch.no_grad(), _adapter_off(self.lm):
            return self.sequence_logps(prompts, responses)

    def user_logps(self, pairs: Sequence[TokenizedPair], rows: torch.Tensor) -> torch.Tensor:
        """``log pi_p(y | x, u_t, row)`` float32 [2B] (chosen then rejected) for user rows long [B]."""
        prefixes = self.user_prefixes(rows, [p.user_text_ids for p in pairs])
        prompts = [p.prompt_ids for p in pairs]
        return self.sequence_logps(prompts * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                                   prefixes * 2)

    def forward(self, pairs: Sequence[TokenizedPair], rows: torch.Tensor, generic: bool) -> dict[str, torch.Tensor]:
        """Everything the P-DPO loss needs for B pairs, each float32 [B].

        Args:
            pairs: the batch.
            rows: long [B] user rows (>= 1 for training pairs).
            generic: also compute the pairs under the generic user 0 (needed when alpha < 1).
        """
        B = len(pairs)
        all_rows = torch.cat([rows, torch.zeros_like(rows)]) if generic else rows
        prefixes = self.user_prefixes(all_rows, [p.user_text_ids for p in pairs] * (2 if generic else 1))
        n = 2 if generic else 1
        prompts = [p.prompt_ids for p in pairs]
        chosen, rejected = [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]
        # one policy forward: [user chosen | user rejected | generic chosen | generic rejected]
        pre = prefixes[:B] * 2 + (prefixes[B:] * 2 if generic else [])
        logps = self.sequence_logps(prompts * 2 * n, (chosen + rejected) * n, pre)
        ref = self.reference_logps(prompts * 2, chosen + rejected)
        out = {"user_chosen": logps[:B], "user_rejected": logps[B:2 * B],
               "reference_chosen": ref[:B], "reference_rejected": ref[B:]}
        if generic:
            out["generic_chosen"], out["generic_rejected"] = logps[2 * B:3 * B], logps[3 * B:]
        return out


class PersonalizedRewardModel(nn.Module):
    """``r_p(x, y, u)``: the user embedding as a soft prompt (+ value head) or as the linear head."""

    def __init__(self, lm: nn.Module, users: UserModel, head: str = "soft_prompt") -> None:
        super().__init__()
        if head not in REWARD_HEADS:
            raise ValueError(f"`head` must be one of {', '.join(REWARD_HEADS)}, got {head!r}.")
        D = lm.get_input_embeddings().weight.shape[1]
        if head == "linear" and users.config.user_tokens != 1:
            raise ValueError(
                f"a linear-head reward model needs a vector user embedding: `user_tokens` must be 1, "
                f"got {users.config.user_tokens}."
            )
        self.lm, self.users, self.head = lm, users, head
        self.value_head = nn.Linear(D, 1) if head == "soft_prompt" else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: torch.Tensor,
                text_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Rewards float32 [R] of each (prompt, response) for user rows long [R]."""
        embed = self.lm.get_input_embeddings()
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        if self.head == "soft_prompt":
            prefixes: list[torch.Tensor | None] = list(self.users.prefixes(rows, embed, text_ids))
        else:
            if text_ids is not None and any(text_ids):
                raise ValueError("a linear-head reward model takes no user text (its e_u must be one vector).")
            prefixes = [None] * len(seqs)
        embeds, mask, pos = pack_rows(embed, prefixes, seqs)
        out = self.lm(inputs_embeds=embeds, attention_mask=padded_mask(self.lm, mask, pos), position_ids=pos,
                      use_cache=False, output_hidden_states=True, logits_to_keep=1)
        last = out.hidden_states[-1][:, -1].float()  # [R, D], left padding: the last column is real
        if self.value_head is not None:
            return self.value_head(last)[:, 0]
        e_u = self.users.implicit(rows)[:, 0].float().to(last.device)  # [R, D]
        return (e_u * last).sum(-1)


def base_identity(model: Any, name: str | None = None, gguf_file: str | None = None) -> dict[str, Any]:
    """What a checkpoint records about its base model: name, shape and a fingerprint of its embeddings."""
    cfg = model.config
    weight = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return {
        "name": name,
        "gguf_file": gguf_file,
        "model_type": getattr(cfg, "model_type", None),
        "vocab_size": int(weight.shape[0]),
        "hidden_size": int(weight.shape[1]),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "embedding_sha256": hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16],
    }


def check_base_identity(saved: dict[str, Any], model: Any, name: str | None, where: str) -> None:
    """``ValueError`` unless ``model`` is the base model the checkpoint at ``where`` was trained on."""
    got = base_identity(model, name)
    diff = [k for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "embedding_sha256")
            if saved.get(k) != got.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {got.get(k)!r}" for k in diff)
        raise ValueError(
            f"checkpoint {where!r} was trained on base model {saved.get('name')!r}, but the given `model` "
            f"{name!r} differs ({detail}); pass the base model the checkpoint was trained on."
        )
