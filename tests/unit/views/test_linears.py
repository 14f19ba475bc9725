"""The decode-step linear path (``views.linears``): every formulation computes ``F.linear`` to float32
rounding, tuning picks a candidate only when it beats the stock path, choices persist per machine,
and nothing outside a decode step changes.

Tolerance: each output is one reduction of ``in`` float32 products summed in another order, so it
differs from ``F.linear`` by at most ``reduction_atol(in, Σ|x_k w_k|)`` (``tests.numerics``).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from tests.numerics import reduction_atol

from personalign.views import linears
from personalign.views.linears import FORMULATIONS, DecodeLinears, from_env, linear, pick


def _close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x, w, b)
    mag = float((x.abs().reshape(-1, x.shape[-1]) @ w.abs().t()).max()) + (float(b.abs().max()) if b is not None else 0)
    diff = float((y - ref).abs().max())
    assert y.shape == ref.shape and diff <= reduction_atol(x.shape[-1], mag), diff


@pytest.mark.numerics
@pytest.mark.parametrize("name", FORMULATIONS)
@pytest.mark.parametrize("rows", [1, 2, 3, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_every_formulation_computes_the_linear(name, rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 1, 96)  # [rows, one token, in], as a decode step feeds it
    tuner = DecodeLinears(force=name, extra_bytes=1 << 30)
    with torch.inference_mode(), tuner.active(layer):
        y = layer(x)
    copied = name == "x_wt" or name == "onednn" and torch.backends.mkldnn.is_available()
    assert tuner.extra_used == (layer.weight.numel() * 4 if copied else 0)  # one copy of the weight
    _close(y, x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    (row,) = tuner.table()
    # the padded ones pad to the smallest size they try: the next even count, else the next multiple of 4
    want = name if "pad" not in name else f"{name}{ {1: 2, 2: 4, 3: 4, 9: 10}[rows]}"
    if name == "onednn" and not torch.backends.mkldnn.is_available():
        want = "stock"
    assert row["choice"] == want and row["source"] == "forced"


def test_pick_keeps_stock_unless_a_candidate_beats_it_by_the_margin():
    assert pick({"stock": 1.0, "w_xt": 0.97, "pad4": 1.3}, 0.05) == "stock"
    assert pick({"stock": 1.0, "w_xt": 0.90, "pad4": 0.80}, 0.05) == "pad4"
    assert pick({"stock": 1.0, "w_xt": 1.20}, 0.0) == "stock"
    assert pick({"stock": 1.0}, 0.05) == "stock"
    # a weight copy only where it pays: the fastest copy-free one within the margin wins
    assert pick({"stock": 1.0, "pad16": 0.60, "onednn": 0.58}, 0.05) == "pad16"
    assert pick({"stock": 1.0, "pad16": 0.80, "onednn": 0.58}, 0.05) == "onednn"
    assert pick({"stock": 1.0, "x_wt": 0.80}, 0.05) == "x_wt"


def test_a_shape_is_timed_once_and_recorded():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 64))
    tuner = DecodeLinears(rounds=2, extra_bytes=1 << 30)
    x = torch.randn(3, 1, 64)
    with torch.inference_mode(), tuner.active(model):
        y = model(x)
        spent = tuner.tuned_seconds
        y2 = model(x)
    assert torch.equal(y, y2) and spent > 0 and tuner.tuned_seconds == spent
    rows = {r["shape"]: r for r in tuner.table()}
    assert set(rows) == {"3x64->512:float32:cpu:bias", "3x512->64:float32:cpu:bias"}
    for r in rows.values():
        assert r["source"] == "timed" and r["choice"] in r["ms"] and "stock" in r["ms"]
        assert {"w_xt", "pad4", "x_wt"} <= set(r["ms"])
        assert r["choice"] == pick(r["ms"], tuner.margin)
    assert tuner.summary()["choices"] == {k: r["choice"] for k, r in rows.items()}
    # the copies of a formulation not chosen are not kept
    kept = {r["choice"] for r in rows.values()} & {"x_wt", "onednn"}
    assert (tuner.extra_used > 0) == bool(kept)


def test_outside_a_step_the_modules_are_untouched():
    layer = torch.nn.Linear(8, 8)
    tuner = DecodeLinears()
    seen = {}

    def other_thread():
        seen["tuner"] = getattr(linears._state, "tuner", None)

    with torch.inference_mode(), tuner.active(layer):
        assert "forward" in layer.__dict__ and linears._state.tuner is tuner
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert "forward" not in layer.__dict__ and getattr(linears._state, "tuner", None) is None
    assert seen["tuner"] is None  # another thread (another engine) runs stock meanwhile
    with pytest.raises(RuntimeError), tuner.active(layer):
        raise RuntimeError("a failing step")
    assert "forward" not in layer.__dict__ and getattr(linears._state, "tuner", None) is None
    x = torch.randn(2, 8)
    assert torch.equal(linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))


def test_autograd_and_wide_inputs_run_stock():
    layer = torch.nn.Linear(16, 16)
    tuner = DecodeLinears(force="w_xt", max_rows=4)
    x = torch.randn(8, 16)
    with tuner.active(layer):
        y = layer(x)  # grad enabled, weights require grad: stock, untuned
        with torch.inference_mode():
            wide = layer(x)  # 8 rows > max_rows
    assert y.requires_grad and tuner.table() == []
    assert torch.equal(wide, F.linear(x, layer.weight, layer.bias).detach())


def test_weights_off_the_cpu_run_stock():
    layer = torch.nn.Linear(16, 16, device="meta")
    tuner = DecodeLinears(force="w_xt")
    with torch.inference_mode(), tuner.active(layer):
        y = layer(torch.randn(2, 16, device="meta"))
    assert y.shape == (2, 16) and tuner.table() == []


def test_choices_persist_on_disk_per_machine(tmp_path):
    path = tmp_path / "tune.json"
    layer = torch.nn.Linear(32, 256, bias=False)
    x = torch.randn(2, 32)
    first = DecodeLinears(cache_path=path, rounds=2)
    with torch.inference_mode(), first.active(layer):
        layer(x)
    (row,) = first.table()
    data = json.loads(path.read_text())
    assert data == {first.fingerprint: {"2x32->256:float32:cpu": row["choice"]}}
    data["another CPU | threads=7"] = {"2x32->256:float32:cpu": "pad4"}
    path.write_text(json.dumps(data))
    second = DecodeLinears(cache_path=path)
    with torch.inference_mode(), second.active(layer):
        layer(x)
    assert second.table()[0]["choice"] == row["choice"] and second.table()[0]["source"] == "disk"
    assert second.tuned_seconds == 0
    path.write_text("{not json")  # a damaged file is ignored (with a warning in the log), never fatal
    assert DecodeLinears(cache_path=path)._disk == {}


def test_tuning_time_and_memory_are_bounded():
    layer = torch.nn.Linear(32, 64, bias=False)
    x = torch.randn(3, 32)
    spent = DecodeLinears(tune_seconds=0)
    with torch.inference_mode(), spent.active(layer):
        y = layer(x)
    assert spent.table()[0]["choice"] == "stock" and spent.table()[0]["source"] == "budget"
    assert torch.equal(y, F.linear(x, layer.weight))
    no_copies = DecodeLinears(extra_bytes=0, rounds=1)
    with torch.inference_mode(), no_copies.active(layer):
        layer(x)
    assert not {"x_wt", "onednn"} & set(no_copies.table()[0]["ms"]) and no_copies.extra_used == 0
    quarter = DecodeLinears(rounds=1)  # the default budget: a quarter of the linear weights
    with torch.inference_mode(), quarter.active(layer):
        layer(x)
    assert not {"x_wt", "onednn"} & set(quarter.table()[0]["ms"]) and quarter.extra_used == 0
    forced = DecodeLinears(extra_bytes=0, force="x_wt")
    with torch.inference_mode(), forced.active(layer):
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight)) and forced.extra_used == 0  # over budget: stock


def test_a_copy_follows_its_weight():
    layer = torch.nn.Linear(16, 24, bias=False)
    x = torch.randn(2, 16)
    tuner = DecodeLinears(force="x_wt", extra_bytes=1 << 30)
    with torch.inference_mode(), tuner.active(layer):
        layer(x)
    assert tuner.extra_used > 0
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place update (training between decodes)
    with torch.inference_mode(), tuner.active(layer):
        y = layer(x)
    _close(y, x, layer.weight.detach(), None)


def test_the_switch():
    assert from_env("off") is False and from_env("stock") is False
    assert from_env("") is None and from_env("auto") is None and from_env("on") is True
    forced = from_env("force:pad")
    assert isinstance(forced, DecodeLinears) and forced.force == "pad"
    with pytest.raises(ValueError, match="PERSONALIGN_DECODE_LINEARS must be off, on, auto"):
        from_env("fast")
    with pytest.raises(ValueError, match="`force` must be one of"):
        from_env("force:gemv")
    with pytest.raises(ValueError, match="`candidates` must include 'stock'"):
        DecodeLinears(candidates=("w_xt",))


@pytest.mark.parametrize("tuned_cost,verdict", [(2.0, "stock"), (0.5, "tuned")])
def test_each_row_count_keeps_the_tuned_path_only_if_its_steps_are_faster(tuned_cost, verdict):
    """The first steps of a row count alternate between the tuned and the untouched stock path
    (timed on the tuner's clock, here a fake one that a tuned step advances by ``tuned_cost``)."""
    layer = torch.nn.Linear(8, 8)
    tuner = DecodeLinears(trial_steps=3, force=None, rounds=1)
    now = [0.0]
    tuner._clock = lambda: now[0]
    paths = []
    with torch.inference_mode():
        for _ in range(2 + 2 * 3 + 4):
            with tuner.active(layer, 2):
                tuned = "forward" in layer.__dict__
                paths.append("tuned" if tuned else "stock")
                layer(torch.randn(2, 8))
                now[0] += tuned_cost if tuned else 1.0
    ((_, rows), got), = tuner.verdicts.items()
    assert rows == 2 and got == verdict
    assert paths[:8] == ["tuned", "stock"] * 4  # the trial: alternating, the first two untimed
    assert paths[8:] == [verdict] * 4  # then the verdict's path only
    assert tuner.summary()["steps"] == {"2": {"path": verdict, "stock_ms": 1000.0, "tuned_ms": 1000.0 * tuned_cost}}
    with tuner.active(layer):  # without a row count: always the tuned formulations
        assert "forward" in layer.__dict__
