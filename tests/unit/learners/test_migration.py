"""A store written by the release before ``learner_states`` opens, and its users keep what they learned:
Drift weights and P-DPO embeddings move to one row per (user, learner), feedback items' kept state is
renamed to the learner's name. SQLite: a database file that release wrote (``data/``); PostgreSQL: the
same columns built in place."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

from sqlalchemy import text
from tests.unit.server.test_store import _pg_store

from personalign.server.store import Store

LEGACY = Path(__file__).parent / "data" / "legacy_store.sqlite"


def _legacy_rows(path: Path) -> dict:
    con = sqlite3.connect(path)
    rows = {u: (json.loads(d) if d else None, json.loads(e) if e else None)
            for u, d, e in con.execute("SELECT user_id, drift_profile, pdpo_embedding FROM profiles")}
    learned = {f: json.loads(v) for f, v in con.execute("SELECT feedback_id, learned FROM feedback")}
    con.close()
    return {"profiles": rows, "learned": learned}


def test_a_database_written_by_the_earlier_release_opens_and_keeps_what_users_learned(tmp_path):
    path = tmp_path / "store.db"
    shutil.copy(LEGACY, path)
    before = _legacy_rows(path)
    assert before["profiles"]["alice"][0] is not None and before["profiles"]["bob"][1] is not None
    store = Store(f"sqlite:///{path}")
    owner = store.list_keys()[0]["id"]
    alice, bob, carol = (store.get_profile(owner, u) for u in ("alice", "bob", "carol"))
    assert alice["drift_profile"] == before["profiles"]["alice"][0]
    assert alice["method"] == "drift" and alice["learner"] is None and alice["pdpo_embedding"] is None
    assert bob["pdpo_embedding"] == before["profiles"]["bob"][1] and bob["drift_profile"] is None
    assert bob["preference"] == "short" and carol["preference"] == "plain words"
    assert carol["drift_profile"] is None and carol["pdpo_embedding"] is None and carol["incontext"] is None
    items = store.folded_items(owner, "bob")
    assert [f.learned for f in items[:2]] == [{"pdpo": before["learned"][f"f{i}"]["pdpo_embedding"]} for i in (0, 1)]
    assert items[2].stale and items[2].learned == {"stale": True, "pdpo": None}
    assert store.stale_users() == [(owner, "bob", items[2].pk)]
    # the state lives in learner_states now; the old columns are emptied, so a second open moves nothing
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM learner_states").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM profiles WHERE drift_profile IS NOT NULL OR pdpo_embedding IS NOT NULL"
                       ).fetchone()[0] == 0
    con.close()
    store.close()
    again = Store(f"sqlite:///{path}")
    assert again.get_profile(owner, "alice") == alice and again.get_profile(owner, "bob") == bob
    # and it takes writes: a state set, a state cleared, a profile deleted with its states
    moved = again.update_profile(owner, "alice", {"drift_profile": None, "incontext": {"hypothesis": "x"}})
    assert moved["drift_profile"] is None and moved["incontext"] == {"hypothesis": "x"}
    assert again.delete_profile(owner, "alice", keep_history=True) is not None
    con = sqlite3.connect(path)
    assert con.execute("SELECT learner FROM learner_states").fetchall() == [("pdpo",)]
    con.close()
    again.close()


def test_postgresql_columns_of_the_earlier_release_move_too():
    store = _pg_store()
    owner, _ = store.create_key("legacy")
    user = f"legacy-{uuid.uuid4().hex[:8]}"
    drift = {"weights": {"formal": 0.5}, "n_pairs": 1}
    emb = {"format": "float32-base64", "shape": [1, 2], "data": "AACAPwAAAEA=", "num_pairs": 1}
    with store.engine.begin() as c:
        for col in ("drift_profile", "pdpo_embedding"):
            c.execute(text(f"ALTER TABLE profiles ADD COLUMN IF NOT EXISTS {col} JSON"))
        c.execute(text("INSERT INTO profiles (owner, user_id, params, drift_profile, pdpo_embedding, version, "
                       "created_at, updated_at) VALUES (:o, :u, '{}', CAST(:d AS JSON), CAST(:e AS JSON), 1, :t, :t)"),
                  {"o": owner, "u": user, "d": json.dumps(drift), "e": json.dumps(emb), "t": time.time()})
    store.close()
    try:
        reopened = _pg_store()
        p = reopened.get_profile(owner, user)
        assert p["drift_profile"] == drift and p["pdpo_embedding"] == emb
        with reopened.engine.begin() as c:
            left = c.execute(text("SELECT count(*) FROM profiles WHERE user_id = :u AND (drift_profile IS NOT NULL OR "
                                  "pdpo_embedding IS NOT NULL)"), {"u": user}).scalar()
        assert left == 0
        reopened.delete_profile(owner, user)
        reopened.close()
    finally:  # the shared test database goes back to the current schema
        cleanup = Store(store.url)
        with cleanup.engine.begin() as c:
            for col in ("drift_profile", "pdpo_embedding"):
                c.execute(text(f"ALTER TABLE profiles DROP COLUMN IF EXISTS {col}"))
        cleanup.close()
