"""What a loaded Hugging Face model supports, as ``views.hf.HFBackend`` asks it: the attention mask it
takes, its cache argument, its context, whether its rows may share a prefix; and whether two
tokenizers agree."""

from __future__ import annotations

from typing import Any

from personalign.views.adapters import _cache_name

__all__ = ["check_same_tokenizer", "takes_additive_mask", "cache_kwarg", "context_length", "can_share_prefix"]


def check_same_tokenizer(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless tokenizers ``a`` and ``b`` map text to the same ids."""
    if a is b:
        return
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        raise ValueError(
            f"views mix models whose tokenizers differ: {name_a!r} ({type(a).__name__}, {len(a)} tokens) and "
            f"{name_b!r} ({type(b).__name__}, {len(b)} tokens); all views of a request must share one tokenizer."
        )


def takes_additive_mask(model: Any) -> bool:
    """Whether the model's attention adds a 4-D float mask as given (SDPA and eager attention do;
    flash-attention kernels take only 2-D padding masks, and ALiBi models such as BLOOM build their
    position biases from the 2-D mask)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    alibi = getattr(cfg, "model_type", None) in ("bloom", "mpt") or getattr(cfg, "alibi", False) is True
    return impl in ("sdpa", "eager") and not alibi


def cache_kwarg(model: Any) -> str:
    return _cache_name(model.forward)


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def can_share_prefix(model: Any) -> bool:
    """Prefix sharing repeats a batch-1 cache: every row must run the same weights.

    A model whose rows run different weights (``mixed_rows``, e.g. a LoRA adapter on some rows
    only) cannot share a prefix computed once for all of them. (Sliding layers can: the engine keeps
    their whole history and masks by position, ``views.masks``.)
    """
    return not getattr(model, "mixed_rows", False)
