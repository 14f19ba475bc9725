"""Attention masks of the engine's rows, for every attention layout transformers gives a causal LM.

The backend keeps, per row, a 2-D mask over cache columns (1 = a real token, 0 = left padding, the
gap after a shared prefix, an unused column of a ragged step, a rolled-back token) and explicit
position ids. A column's position is then the number of real columns before it in its row, so a row
computes what it would compute alone, whatever its neighbours.

* **Full attention** (Llama, Qwen, GPT-2, ...): the 2-D mask is all a model needs; transformers
  builds the causal mask from it. A one-token step of padded rows gets a prepared additive 4-D mask
  instead (``decode_mask``): SDPA's CPU kernel would otherwise convert the boolean mask transformers
  makes in every layer.
* **Sliding window** (Mistral, Phi-3) and **hybrid** models (Gemma-2/3, Qwen2 with
  ``use_sliding_window``, Cohere-2: some layers full, some sliding): transformers' sliding mask counts
  the window in cache *columns* and its sliding cache layer drops the oldest columns, neither of which
  fits rows with padding, holes and their own positions. The engine therefore keeps every column in
  every layer (``views.cache.new_cache`` gives sliding layers a full-history ``GrowingLayer``) and
  builds the 4-D masks itself: a query at position ``q`` of row ``r`` sees a column ``c`` when
  ``c`` is a real token of ``r``, at or before the query's column, and, in a sliding layer, when its
  position is ``> q − window`` — transformers' own rule (``sliding_window_overlay``), counted in the
  row's real tokens, i.e. exactly what the row alone computes. A model with one kind of layer gets
  one mask; a hybrid one gets ``{"full_attention": ..., "sliding_attention": ...}``, the mapping its
  forward accepts in place of the 2-D mask. Keeping the full history costs the sliding layers' cache
  the length of the text instead of the window; it is what lets rows roll back (``truncate``), leave
  (``release``) and join other batches (``step_many``) on these models as on any other.

Other layer kinds (chunked attention, linear attention and state-space layers, KV-sharing layers) are
refused at load time by ``attention_layout`` with an error naming the model and the layer type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

__all__ = ["AttentionLayout", "attention_layout", "sliding_masks", "decode_mask", "layer_kinds", "padded_mask",
           "SUPPORTED_LAYER_TYPES"]

FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_LAYER_TYPES = (FULL, SLIDING)


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's layers attend, as the engine needs it.

    Attributes:
        kinds: the layer types present, a subset of ``("full_attention", "sliding_attention")``.
        window: the sliding window (tokens a query sees, itself included), None without sliding layers.
        additive: whether the attention adds a float 4-D mask as given (SDPA and eager attention).
        implementation: the attention implementation's name (for messages).
    """

    kinds: tuple[str, ...]
    window: int | None
    additive: bool
    implementation: str | None

    @property
    def sliding(self) -> bool:
        return SLIDING in self.kinds

    @property
    def hybrid(self) -> bool:
        return len(self.kinds) > 1


def _text_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def _layer_types(cfg: Any) -> list[str]:
    n = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0)
    try:
        types, kwargs = get_layer_types_and_kwargs(cfg)
        return [str(t) for t in types]
    except Exception:  # noqa: BLE001 - configs this helper does not know: read the fields directly
        types = getattr(cfg, "layer_types", None)
        if types:
            return [str(t) for t in types]
        return [SLIDING if getattr(cfg, "sliding_window", None) else FULL] * max(n, 1)


def attention_layout(model: Any, name: str = "main") -> AttentionLayout:
    """The attention layout of ``model`` (registered as ``name``).

    Raises:
        ValueError: a layer type the engine cannot mask per row, naming the model and the type; or
            sliding layers behind an attention implementation that takes no 4-D mask.
    """
    cfg = _text_config(model)
    impl = getattr(cfg, "_attn_implementation", None) or getattr(getattr(model, "config", None),
                                                                 "_attn_implementation", None)
    if cfg is None:
        return AttentionLayout(kinds=(FULL,), window=None, additive=impl in ("sdpa", "eager"), implementation=impl)
    types = _layer_types(cfg)
    bad = sorted({t for t in types if t not in SUPPORTED_LAYER_TYPES})
    arch = type(model).__name__
    if bad:
        raise ValueError(
            f"model {name!r} ({arch}) has layers of type {', '.join(repr(t) for t in bad)}; the engine's "
            f"batched, cached decoding supports {' and '.join(SUPPORTED_LAYER_TYPES)} layers only.")
    kinds = tuple(k for k in SUPPORTED_LAYER_TYPES if k in types)
    window = None
    if SLIDING in kinds:
        window = getattr(cfg, "sliding_window", None)
        per_layer = getattr(cfg, "per_layer_config", None) or []
        windows = {getattr(c, "sliding_window", window) for c, t in zip(per_layer, types) if t == SLIDING} or {window}
        if len(windows) != 1 or not isinstance(window, int) or window < 1:
            raise ValueError(f"model {name!r} ({arch}): its sliding layers need one integer `sliding_window`, "
                             f"got {sorted(map(str, windows))}.")
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"model {name!r} ({arch}) has sliding-window layers under attention {impl!r}, which takes no "
                "per-row 4-D mask; load it with attn_implementation='sdpa' or 'eager'.")
    return AttentionLayout(kinds=kinds, window=window, additive=impl in ("sdpa", "eager"), implementation=impl)


def decode_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D mask ``[R, S]`` of a one-token step as the additive 4-D mask ``[R, 1, 1, S]``."""
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, torch.finfo(dtype).min)
    return add[:, None, None, :]


def _allowed(mask: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [R, 1, L, S]: which columns each of the ``L`` new queries may attend (see the module doc)."""
    R, S = mask.shape
    L = int(pos.shape[1])
    real = mask.bool()
    qcol = torch.arange(S - L, S, device=mask.device)  # the new tokens sit in the last L columns
    causal = torch.arange(S, device=mask.device)[None, :] <= qcol[:, None]  # [L, S]
    allowed = real[:, None, :] & causal[None]  # [R, L, S]
    if window is not None:
        col_pos = mask.long().cumsum(1) - 1  # [R, S]: a real column's position in its row
        allowed &= col_pos[:, None, :] > (pos.long()[:, :, None] - window)
    # a query none of whose columns is visible (a padding query) attends everything: finite values
    # where no real query ever looks, instead of NaN from an empty softmax (transformers does the same)
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def _as_mask(allowed: torch.Tensor, layout: AttentionLayout, dtype: torch.dtype) -> torch.Tensor:
    # SDPA takes boolean masks (1 byte a cell) except for one-token steps, where a float mask skips
    # the kernel's per-layer conversion; eager attention adds the mask, so it must be float
    if layout.implementation == "sdpa" and allowed.shape[2] > 1:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def sliding_masks(layout: AttentionLayout, mask: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype
                  ) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` of a model with sliding layers, for rows with 2-D ``mask`` long [R, S]
    (the new columns included) feeding tokens at positions ``pos`` long [R, L]: 4-D masks
    ``[R, 1, L, S]``, one per layer kind (a ``{layer type: mask}`` dict for a hybrid model)."""
    out = {}
    for kind in layout.kinds:
        allowed = _allowed(mask, pos, layout.window if kind == SLIDING else None)
        out[kind] = _as_mask(allowed, layout, dtype)
    return out if layout.hybrid else out[layout.kinds[0]]


def padded_mask(model: Any, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` of one uncached forward of left-padded rows (``mask`` long [R, W],
    ``pos`` long [R, W]): the 2-D mask for full attention; per-row 4-D masks for sliding layers, whose
    window transformers would otherwise count in columns, padding included."""
    layout = attention_layout(model)
    if not layout.sliding:
        return mask
    return sliding_masks(layout, mask, pos, model.get_input_embeddings().weight.dtype)


def layer_kinds(model: Any) -> Sequence[str]:
    """The per-layer types of ``model`` (for tables and messages)."""
    return _layer_types(_text_config(model))
