"""The simulated-users benchmark end to end on stories260k (``--quick``): a live ``personalign serve``
subprocess, the official ``openai`` client, choices by hidden judges folded as feedback (Drift rows
and a P-DPO embedding fit for users the checkpoint never saw), held-out evaluations, the table and
the curves; a rerun resumes and redoes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260k is not there")
def test_quick_simulation_runs_resumes_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulate.py"), "--quick", "--model", str(STORIES),
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((tmp_path / "state.json").read_text())
    users = state["users"]
    assert sorted(users) == ["drift-concise-s0", "drift-random-s0", "pdpo-concise-s0", "pdpo-random-s0"]
    for u in users.values():
        assert [c["round"] for c in u["choices"]] == [0, 1] and sorted(u["evals"]) == ["0", "2"]
        assert all(len(v) == 2 for v in u["evals"].values())  # two held-out prompts
    # the concise user (its score is the word count) kept the shorter reply whenever the two differed in
    # length, unless the shorter one had fewer than `min_words` words and the other had enough
    min_words = json.loads((tmp_path / "config.json").read_text())["min_words"]
    for c in users["drift-concise-s0"]["choices"]:
        s = c["scores"]
        if s[0] != s[1]:
            usable = [w >= min_words for w in s]
            want = usable.index(True) if usable[0] != usable[1] else s.index(min(s))
            assert c["chosen"] == want, c
    assert users["drift-concise-s0"]["evals"]["0"] == state["references"]["base"]  # 0 choices: base
    table = (tmp_path / "results.md").read_text()
    assert "| concise (words, lower) |" in table and "| random (words, random choices) |" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # the server learnt both: Drift pairs and a fitted embedding on the pdpo user's profile
    import sqlite3

    db = sqlite3.connect(tmp_path / "server.db")
    rows = dict(db.execute("select user_id, pdpo_embedding from profiles").fetchall())
    assert json.loads(rows["pdpo-concise-s0"])["num_pairs"] == 2
    assert json.loads(rows["drift-concise-s0"] or "null") is None  # a drift learner's profile has no P-DPO user
    folded = db.execute("select count(*) from feedback where folded = 1").fetchone()[0]
    assert folded == 8
    # a rerun resumes: nothing left to do, the same state
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "state.json").read_text())["users"] == users
    assert db.execute("select count(*) from feedback").fetchone()[0] == 8
