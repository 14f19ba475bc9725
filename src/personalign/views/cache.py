"""The engine's KV cache: transformers' ``DynamicCache`` whose full-attention layers append in place.

``DynamicLayer.update`` concatenates every new token onto the whole cache (``torch.cat``), so each
decode step copies every layer's keys and values: a cost that grows with the length and with the
number of rows (a method's views). ``GrowingLayer`` keeps each tensor in a buffer with spare room
along the sequence axis and writes new tokens into it; ``keys`` / ``values`` are views of the filled
part, so everything that reads or assigns them (masks, cropping, row selection, the engine's
merged forwards) works unchanged. A tensor assigned from outside is never written into: it becomes
the layer's content with no spare room, and the next append moves it into a fresh buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["GrowingLayer", "new_cache"]


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` writes into spare capacity instead of concatenating.

    Attributes:
        min_spare: the least spare room (tokens) a new buffer gets; it gets a quarter of its length
            when that is more, so a long generation reallocates O(log n) times.
    """

    min_spare = 32

    def __init__(self, **kwargs: Any) -> None:
        self._buf: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._len = {"keys": 0, "values": 0}
        super().__init__(**kwargs)

    def _get(self, name: str) -> torch.Tensor | None:
        buf = self._buf[name]
        if buf is None or buf.dim() < 2 or buf.shape[-2] == self._len[name]:
            return buf
        return buf[..., : self._len[name], :]

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        self._buf[name] = value  # taken as is: no spare room, never written into
        self._len[name] = int(value.shape[-2]) if value is not None and value.dim() >= 2 else 0

    keys = property(lambda self: self._get("keys"), lambda self, v: self._set("keys", v))
    values = property(lambda self: self._get("values"), lambda self, v: self._set("values", v))

    def _append(self, name: str, x: torch.Tensor) -> torch.Tensor:
        buf, n, add = self._buf[name], self._len[name], int(x.shape[-2])
        fits = (buf is not None and buf.dim() == x.dim() and buf.shape[:-2] == x.shape[:-2]
                and buf.shape[-1] == x.shape[-1] and buf.dtype == x.dtype and buf.device == x.device
                and n + add <= buf.shape[-2] and (torch.is_inference_mode_enabled() or not buf.is_inference()))
        if not fits:
            cap = n + add + max(self.min_spare, (n + add) // 4)
            new = x.new_empty(*x.shape[:-2], cap, x.shape[-1])
            if n:
                new[..., :n, :].copy_(buf[..., :n, :])
            buf = new
        buf[..., n: n + add, :].copy_(x)
        self._buf[name], self._len[name] = buf, n + add
        return buf[..., : n + add, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("keys", key_states), self._append("values", value_states)


def new_cache(model: Any) -> Any:
    """A ``DynamicCache`` for ``model`` whose attention layers are ``GrowingLayer``s.

    Sliding-window layers get one too: transformers' ``DynamicSlidingWindowLayer`` drops the columns
    that left the window, which rows with their own padding, holes and positions cannot follow; the
    engine keeps every column and masks the window by position instead (``views.masks``).
    """

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signatures
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                        for layer in layers]
    elif getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache
