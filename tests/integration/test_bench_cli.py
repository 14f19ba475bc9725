"""``personalign bench --methods all``: every registered method, several batch sizes, scaling table."""

from __future__ import annotations

import pytest

from personalign.eval.bench import BenchRow, format_scaling, format_targets, resolve_methods
from personalign.methods import METHODS


def test_resolve_methods():
    assert resolve_methods("all") == METHODS.names()
    assert resolve_methods("base, preference_prompting") == ["base", "preference_prompting"]
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods("base,nope")
    with pytest.raises(ValueError, match="at least one"):
        resolve_methods(" , ")


def test_scaling_and_targets_golden():
    """generate: 10 tok/s at B=1, 50 at B=16 -> 5.00×; m: 8 -> 80 -> 10.00×, time ratio 1.25 ≤ 1.3."""
    rows = [BenchRow("generate", 1, 8, 100, 10, 1, 1.0), BenchRow("m", 1, 8, 125, 8, 1, 1.25),
            BenchRow("generate", 16, 8, 20, 50, 1, 1.0), BenchRow("m", 16, 8, 12.5, 80, 1, 0.625)]
    s = format_scaling(rows)
    assert "| generate | 10.0 | 50.0 | 5.00× |" in s and "| m | 8.0 | 80.0 | 10.00× |" in s
    t = format_targets(rows)
    assert "m: B=1 time / generate = 1.25 (target ≤ 1.3): yes" in t
    assert "m: tokens/s B=16 / B=1 = 10.00 (GPU target ≥ 8.0): yes" in t
    assert "generate: tokens/s B=16 / B=1 = 5.00 (GPU target ≥ 8.0): no" in t


def test_bench_cli_all_methods(tmp_path, tiny_lm, tiny_chat_tokenizer, capsys):
    from personalign.cli.main import main

    tiny_lm.save_pretrained(tmp_path)
    tiny_chat_tokenizer.save_pretrained(tmp_path)
    rc = main(["bench", "--model", str(tmp_path), "--methods", "all", "--batch-size", "1", "--batch-size", "3",
               "--max-new-tokens", "3", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in METHODS.names():
        assert f"| {name} | 1 | 3 |" in out and f"| {name} | 3 | 3 |" in out
    assert "tokens/s B=1 | tokens/s B=3 | B=3 / B=1" in out and "Targets:" in out
    assert "decode linears: tuned (" in out and "model.generate runs stock" in out


def test_bench_says_which_linears_it_ran(tmp_path, tiny_lm, tiny_chat_tokenizer, capsys):
    import json

    from personalign.cli.main import main

    tiny_lm.save_pretrained(tmp_path)
    tiny_chat_tokenizer.save_pretrained(tmp_path)
    common = ["bench", "--model", str(tmp_path), "--methods", "amulet", "--max-new-tokens", "3", "--repeats", "1",
              "--device", "cpu", "--json"]
    assert main([*common, "--decode-linears", "stock"]) == 0
    stock = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["decode_linears"] for r in stock} == {"stock"} and stock[0]["decode_linear_choices"] is None
    assert main(common) == 0
    tuned = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    choices = tuned[0]["decode_linear_choices"]["choices"]
    assert tuned[0]["decode_linears"] == "tuned"
    # amulet's two views of one request: the step's linears at 2 rows (and the output head)
    assert any(k.startswith("2x") for k in choices) and set(choices.values()) <= {
        "stock", "w_xt", "x_wt", "onednn", *(f"{padded}{m}" for padded in ("pad", "w_xt_pad") for m in (4, 8, 16))}
    common[common.index("--json")] = "--decode-linears"
    assert main([*common, "both"]) == 0
    out = capsys.readouterr().out
    assert "| amulet | 1 | 3 |" in out and "| amulet (stock linears) | 1 | 3 |" in out and "| generate | 1 | 3 |" in out


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["high-water-mark", "sampling-thread"])
def test_peak_rss_sees_a_freed_block(monkeypatch, kernel_peak):
    """A 64 MiB block written and freed inside the block shows in the peak, by either way of measuring."""
    import sys

    import torch

    from personalign.eval import bench

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc (Linux)")
    if not kernel_peak:
        monkeypatch.setattr(bench._PeakRSS, "reset_high_water_mark", staticmethod(lambda: False))
    bench._release_freed_memory()
    with bench._PeakRSS() as m:
        block = torch.ones(16 * 2**20)  # 64 MiB, every page written
        if not kernel_peak:
            import time

            time.sleep(0.05)  # the sampler runs every 2 ms
        del block
    assert (m._t is None) == kernel_peak
    assert m.peak - m.base >= 60 * 2**20
