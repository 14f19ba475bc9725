"""The bench builds untrained helpers for pad/args/best_of_n (and says so) and times them."""

from __future__ import annotations

import pytest

from personalign.eval.bench import format_table, format_targets, run_bench, weights_mb
from personalign.views import HFBackend, LoadedModel
from tests.conftest import make_tiny_lm


def test_bench_pad_args_best_of_n(tiny_tokenizer):
    main = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    rows = run_bench(main, HFBackend(main.model, main.tokenizer), ["base", "pad", "args", "best_of_n"],
                     max_new_tokens=3, repeats=1)
    by = {r.method: r for r in rows}
    assert set(by) == {"generate", "base", "pad", "args", "best_of_n"}
    assert "untrained PersRM" in by["pad"].note and "one batched forward" in by["pad"].note
    assert "fresh linear head" in by["args"].note and "cached reward views" in by["args"].note
    assert "fresh linear head" in by["best_of_n"].note
    assert all(r.time_ratio > 0 for r in rows)
    assert "untrained PersRM" in format_table(rows)
    # footprint: weights counted once per storage; PAD adds exactly its adapter and head to the shared weights
    from personalign.training.persrm import PersRM

    plain = sum(t.numel() * t.element_size() for t in list(main.model.parameters()) + list(main.model.buffers())) / 2**20
    assert by["generate"].weights_mb == pytest.approx(plain) and by["base"].weights_mb == pytest.approx(plain)
    rm = PersRM.create(make_tiny_lm(len(tiny_tokenizer)), tiny_tokenizer, name="tiny")
    extra = sum(p.numel() * p.element_size() for n, p in rm.named_parameters() if "lora_" in n or n.startswith("head.")) / 2**20
    assert by["pad"].weights_mb == pytest.approx(plain + extra)
    assert weights_mb(rm) == pytest.approx(plain + extra) == pytest.approx(weights_mb(rm, rm.base_lm, rm.lm))
    assert plain < by["args"].weights_mb < plain + 0.01  # the fresh head on the shared backbone
    for r in rows:
        assert r.footprint_ratio == pytest.approx((r.weights_mb + r.peak_mem_mb) / (plain + by["generate"].peak_mem_mb))
    assert "- pad: B=1 memory footprint / generate = " in format_targets(rows)
    assert "footprint / generate" in format_table(rows)
