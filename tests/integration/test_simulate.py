"""The simulated-users benchmark end to end on stories260k (``--quick``): a live ``personalign serve``
subprocess, the official ``openai`` client, choices by hidden judges folded as feedback (Drift rows
over the server's default pool, a P-DPO embedding fit for users the checkpoint never saw, the
in-context learner's hypothesis), held-out evaluations, the paired table and the curves; a rerun
resumes and redoes nothing."""

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
    assert sorted(users) == [f"{le}-{j}-s0" for le in ("drift", "incontext_both", "pdpo") for j in ("concise", "random")]
    for u in users.values():
        assert [c["round"] for c in u["choices"]] == [0, 1] and sorted(u["evals"]) == ["0", "2"]
        assert all(len(v) == 3 for v in u["evals"].values())  # three held-out prompts
    # the concise user (its score is the word count) kept the shorter reply whenever the two differed in
    # length, unless the shorter one had fewer than `min_words` words and the other had enough
    min_words = json.loads((tmp_path / "config.json").read_text())["min_words"]
    for c in users["drift-concise-s0"]["choices"]:
        s = c["scores"]
        if s[0] != s[1]:
            usable = [w >= min_words for w in s]
            want = usable.index(True) if usable[0] != usable[1] else s.index(min(s))
            assert c["chosen"] == want, c
    for le in ("drift", "incontext_both"):  # 0 choices: nothing learned, base's replies
        assert users[f"{le}-concise-s0"]["evals"]["0"] == state["references"]["base"]
    # no learner is told the answer: Drift's pool is the server's default for a new user
    from personalign.learners.drift import DriftLearnerConfig

    assert state["drift_pool"] == sorted(DriftLearnerConfig().pool.names)
    table = (tmp_path / "results.md").read_text()
    assert "| concise (words, lower) | drift |" in table and "| random (words, random choices) | pdpo |" in table
    assert "bootstrap" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # the server learnt each: Drift pairs, a fitted embedding, a hypothesis, for their own users only
    import sqlite3

    db = sqlite3.connect(tmp_path / "server.db")
    states = {(u, le): json.loads(st) for u, le, st in db.execute("select user_id, learner, state from learner_states")}
    assert states[("pdpo-concise-s0", "pdpo")]["num_pairs"] == 2
    assert states[("drift-concise-s0", "drift")]["num_pairs"] == 2
    assert states[("incontext_both-concise-s0", "incontext")]["choices"] == 2
    assert isinstance(states[("incontext_both-concise-s0", "incontext")]["hypothesis"], str)
    assert {le for (u, le) in states if u.startswith("pdpo-")} == {"pdpo"}  # a named learner learns alone
    folded = db.execute("select count(*) from feedback where folded = 1").fetchone()[0]
    assert folded == 12
    # a rerun resumes: nothing left to do, the same state
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "state.json").read_text())["users"] == users
    assert db.execute("select count(*) from feedback").fetchone()[0] == 12
