"""Rows of several batches in one forward: joining KV caches row-wise and splitting them back.

A server decodes every running request, whatever its batch, method and view layout, with one forward
per model (``HFBackend.step_many``). The groups' caches hold different numbers of columns; they are
right-aligned into one cache (shorter ones padded on the left with columns their masks never
attend to), run together, and each group takes its rows back with its own columns. Positions are
explicit and padding columns are masked, so every row computes what it computes alone (up to float
rounding in batched matmuls).

Only caches whose every layer keeps its whole history (``DynamicLayer`` or the engine's
``GrowingLayer``) can be joined; ``mergeable`` says so, and others run one forward each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.functional import pad
from transformers.cache_utils import DynamicLayer

from personalign.views.cache import GrowingLayer, new_cache

__all__ = ["cache_layers", "join_caches", "mergeable", "select_cache_rows", "set_cache_layers", "split_cache"]


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) tensors [R, H, S, D] of every layer of a ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def set_cache_layers(cache: Any, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make ``cache`` hold ``pairs`` (no copy where the layers exist already)."""
    for i, (k, v) in enumerate(pairs):
        if i < len(cache.layers) and cache.layers[i].is_initialized:
            cache.layers[i].keys, cache.layers[i].values = k, v
        else:
            cache.update(k, v, i)


def select_cache_rows(cache: Any, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` (long [R']) of every layer of ``cache``, in that order."""
    set_cache_layers(cache, [(k[idx.to(k.device)], v[idx.to(v.device)]) for k, v in cache_layers(cache)])


def mergeable(cache: Any) -> bool:
    """Dynamic caches (every layer keeping its whole history) can be joined row-wise; static ones cannot."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowingLayer) and layer.is_initialized
                                for layer in layers)


def join_caches(model: Any, caches: Sequence[Any], widths: Sequence[int]) -> Any:
    """One new cache for ``model`` holding the rows of every cache in order, right-aligned.

    Args:
        caches: the caches to join; cache ``i`` holds ``widths[i]`` columns.
    Returns:
        a cache of ``max(widths)`` columns; cache ``i``'s rows are left-padded with zeros (columns
        the caller's masks must leave unattended).
    """
    S = max(widths)
    layers = [cache_layers(c) for c in caches]
    n_layers = len(layers[0])
    if any(len(ls) != n_layers for ls in layers):
        raise ValueError("the caches to merge hold different numbers of layers.")
    joined = []
    for i in range(n_layers):
        ks, vs = [], []
        for ls, w in zip(layers, widths):
            k, v = ls[i]
            ks.append(pad(k, (0, 0, S - w, 0)) if w < S else k)
            vs.append(pad(v, (0, 0, S - w, 0)) if w < S else v)
        joined.append((torch.cat(ks), torch.cat(vs)))
    cache = new_cache(model)
    set_cache_layers(cache, joined)
    return cache


def split_cache(joined: Any, caches: Sequence[Any], rows: Sequence[int], widths: Sequence[int]) -> None:
    """Give each of ``caches`` its ``rows[i]`` rows of ``joined`` back, without the left padding.

    ``widths`` are the columns each cache held before the join; columns ``joined`` gained since (the
    forward's new tokens) go to every cache.
    """
    S = max(widths)
    out_layers = cache_layers(joined)
    r0 = 0
    for cache, n, w in zip(caches, rows, widths):
        set_cache_layers(cache, [(k[r0 : r0 + n, :, S - w :], v[r0 : r0 + n, :, S - w :]) for k, v in out_layers])
        r0 += n
