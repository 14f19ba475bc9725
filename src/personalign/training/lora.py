"""Which modules of a backbone get LoRA: resolved per architecture, never guessed from Llama's names.

Every trainer that adds a LoRA adapter (the PersRM of PAD, P-DPO, ``train rm --lora``) asks
``lora_targets(model)``. By default it returns the leaf names of **every linear projection inside
the decoder blocks**: the attention projections and the MLP's, fused ones included (Phi-3's
``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's and Falcon's ``query_key_value``, GPT-2's ``c_attn``,
``c_fc``, ``c_proj`` — ``Conv1D`` layers, which PEFT adapts with ``fan_in_fan_out``), and nothing
else: not the embeddings, not the output head, not a mixture-of-experts router (a linear map to the
experts). Names a user requests are checked against the same list: one that does not name a
projection of this model is an error that lists the ones it has, so an adapter never silently covers
part of a model. The names chosen are logged and stored with the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["lora_targets", "projection_names", "fan_in_fan_out", "LEGACY_LLAMA_TARGETS"]

logger = logging.getLogger(__name__)

# What earlier checkpoints stored as their default (Llama's names); still read as given.
LEGACY_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_projection(module: Any) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2 linear


def _decoder_blocks(model: Any) -> list[tuple[str, Any]]:
    """The decoder blocks: the longest ``ModuleList`` of one repeated class (``model.layers``, ``h``, ...)."""
    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
                and (best is None or len(module) > len(best[1]))):
            best = (name, module)
    return [] if best is None else [(f"{best[0]}.{i}" if best[0] else str(i), m) for i, m in enumerate(best[1])]


def _num_experts(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    cfg = get(decoder=True) if callable(get) else cfg
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return None


def projection_names(model: Any) -> tuple[str, ...]:
    """Leaf names of the linear projections inside ``model``'s decoder blocks, in first-seen order
    (a mixture-of-experts router, a linear map onto the experts, is left out)."""
    experts = _num_experts(model)
    names: dict[str, None] = {}
    for _, block in _decoder_blocks(model):
        for name, module in block.named_modules():
            if not name or not _is_projection(module):
                continue
            leaf = name.rsplit(".", 1)[-1]
            out = getattr(module, "out_features", None) or getattr(module, "nf", None)
            if experts is not None and out == experts and leaf in ("gate", "router", "gate_proj_router", "wg"):
                continue  # the MoE router: routing weights, not a projection of the hidden state
            names.setdefault(leaf, None)
    return tuple(names)


def fan_in_fan_out(model: Any, targets: Sequence[str]) -> bool:
    """Whether ``targets`` are ``Conv1D`` layers (GPT-2's), whose weights PEFT must read transposed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, m in base.named_modules())


def lora_targets(model: Any, requested: Sequence[str] | None = None, *, what: str = "the backbone") -> tuple[str, ...]:
    """The LoRA ``target_modules`` for ``model``: ``requested`` checked, or every projection.

    Args:
        model: the causal LM (or a PEFT model over it).
        requested: module leaf names; None or empty = all of ``projection_names(model)``.
        what: how messages name the model.

    Raises:
        ValueError: the model has no linear projection in its decoder blocks, or ``requested`` names a
            module that is not one (the message lists the ones it has).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    have = projection_names(base)
    if not have:
        raise ValueError(f"{what} ({type(base).__name__}) has no linear projection in its decoder blocks to put "
                         "LoRA on.")
    if not requested:
        logger.info("LoRA targets of %s (%s): %s", what, type(base).__name__, ", ".join(have))
        return have
    if "lm_head" in requested:
        raise ValueError("LoRA `target_modules` must not include the output head `lm_head`.")
    missing = [t for t in requested if t not in have]
    if missing:
        raise ValueError(f"LoRA `target_modules` {missing} are not projections of {what} ({type(base).__name__}); "
                         f"its projections are {list(have)} (leave `target_modules` empty to take them all).")
    return tuple(requested)
