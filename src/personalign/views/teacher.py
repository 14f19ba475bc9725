"""Teacher forcing: per-token log-probs of given continuations, without a cache.

Scoring known texts (Drift's attribute columns, preference accuracy, a P-DPO fit's reference) needs
no decoding state: each sequence is ``prompt + continuation``, left-padded into batches with explicit
position ids, and only the columns that predict continuation tokens are projected to the
vocabulary (continuations are right-aligned, so these are the last ``max len + 1`` columns), which
keeps the logits of long prompts out of memory. Sliding-window layers get their per-row masks
(``views.masks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from personalign.views.masks import AttentionLayout, sliding_masks

__all__ = ["left_padded", "teacher_forced_logprobs"]


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, pos)``, each long [R, W]: ``seqs`` left-padded to the longest, positions counted
    over real tokens only."""
    W = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), W), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), W, dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, W - len(q) :] = torch.tensor(q, dtype=torch.long)
        mask[r, W - len(q) :] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.inference_mode()
def teacher_forced_logprobs(model: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                            *, pad_id: int, vocab_size: int, layout: AttentionLayout) -> list[torch.Tensor]:
    """One uncached forward of ``model`` over the rows ``prompt + continuation``.

    Returns:
        per row, float32 [len(continuation)]: log p(continuation[t] | prompt, continuation[:t]) over
        the first ``vocab_size`` logits.
    """
    ids, mask, pos = left_padded([list(p) + list(c) for p, c in zip(prompts, continuations)], pad_id)
    keep = min(ids.shape[1], max(len(c) for c in continuations) + 1)
    dev = next(model.parameters()).device
    mask, pos = mask.to(dev), pos.to(dev)
    attn = sliding_masks(layout, mask, pos, model.get_input_embeddings().weight.dtype) if layout.sliding else mask
    logits = model(input_ids=ids.to(dev), attention_mask=attn, position_ids=pos, use_cache=False,
                   logits_to_keep=keep).logits
    logits = logits[..., :vocab_size].float()
    norm = torch.logsumexp(logits, -1)  # [R, keep]
    out: list[torch.Tensor] = []
    for r, c in enumerate(continuations):
        if not c:
            out.append(torch.zeros(0))
            continue
        start = keep - len(c) - 1  # kept column predicting the first continuation token
        tgt = torch.tensor(list(c), device=logits.device)
        picked = logits[r, start : start + len(c)].gather(-1, tgt[:, None])[:, 0]
        out.append((picked - norm[r, start : start + len(c)]).cpu())
    return out
