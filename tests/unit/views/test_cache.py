"""The engine's KV cache layer: appends in place, and reads, crops and assignments behave as
transformers' DynamicLayer does."""

from __future__ import annotations

import pytest
import torch
from tests.numerics import assert_close_forward
from transformers.cache_utils import DynamicLayer

from personalign.views.cache import GrowingLayer, new_cache


def _kv(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)


def test_growing_layer_equals_dynamic_layer_through_appends_crops_and_assignments():
    grow, ref = GrowingLayer(), DynamicLayer()
    steps = [5, 1, 1, 40, 1, 3]  # the 40 outgrows the first buffer
    for i, n in enumerate(steps):
        k, v = _kv(3, n, i)
        out_g, out_r = grow.update(k, v), ref.update(k, v)
        assert torch.equal(out_g[0], out_r[0]) and torch.equal(out_g[1], out_r[1])
        assert grow.get_seq_length() == ref.get_seq_length()
    buf = grow._buf["keys"]
    k, v = _kv(3, 1, 99)
    grow.update(k, v)
    ref.update(k, v)
    assert grow._buf["keys"] is buf  # room was left: no new buffer, no copy of the cache
    grow.crop(-2)
    ref.crop(-2)
    k, v = _kv(3, 2, 7)
    assert torch.equal(grow.update(k, v)[0], ref.update(k, v)[0])
    # an assigned tensor is taken as is and never written into
    sel_k, sel_v = ref.keys[[0, 2]].clone(), ref.values[[0, 2]].clone()
    grow.keys, grow.values = sel_k, sel_v
    ref.keys, ref.values = sel_k.clone(), sel_v.clone()
    before = sel_k.clone()
    k, v = _kv(2, 1, 8)
    out_g, out_r = grow.update(k, v), ref.update(k, v)
    assert torch.equal(out_g[0], out_r[0]) and torch.equal(out_g[1], out_r[1])
    assert torch.equal(sel_k, before)
    grow.reset()
    assert grow.keys is None and grow.get_seq_length() == 0


def test_earlier_views_keep_their_values():
    """A view returned by one update still reads the same values after later appends."""
    layer = GrowingLayer()
    k, v = _kv(1, 3, 0)
    k0, _ = layer.update(k, v)
    snapshot = k0.clone()
    for i in range(5):
        layer.update(*_kv(1, 1, i + 1))
    assert torch.equal(k0, snapshot)


def test_buffers_made_in_inference_mode_are_not_written_outside_it():
    layer = GrowingLayer()
    with torch.inference_mode():
        layer.update(*_kv(1, 3, 0))
    k, v = _kv(1, 1, 1)
    out, _ = layer.update(k, v)  # outside inference mode: moved to a fresh buffer, no error
    assert out.shape[-2] == 4 and torch.equal(out[..., -1:, :], k)


@pytest.mark.parametrize("with_config", [True, False])
def test_new_cache_uses_growing_layers(tiny_lm, with_config):
    model = tiny_lm if with_config else type("NoConfig", (), {"config": None})()
    cache = new_cache(model)
    ids = torch.tensor([[1, 5, 6, 7]])
    if with_config:
        assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)
        with torch.no_grad():
            a = tiny_lm(input_ids=ids, past_key_values=cache, use_cache=True).logits
            b = tiny_lm(input_ids=torch.tensor([[9]]), past_key_values=cache, use_cache=True).logits
            full = tiny_lm(input_ids=torch.cat([ids, torch.tensor([[9]])], 1)).logits
        assert_close_forward(torch.cat([a, b], 1), full, tiny_lm)  # cached vs one forward: other sums
    else:
        cache.update(*_kv(1, 2, 0), 0)
        assert type(cache.layers[0]) is GrowingLayer
