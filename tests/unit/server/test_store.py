"""The store against SQLite and a real PostgreSQL: keys, profiles, completions, idempotent feedback,
optimistic locking. PostgreSQL tests need a server at ``PERSONALIGN_TEST_PG`` (default
``postgresql://personalign:personalign@127.0.0.1:5432/personalign_test``; ``.ci/run`` starts one).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from personalign.server.store import FeedbackConflict, ProfileConflict, Store, StoredFeedback, hash_key

PG = os.environ.get("PERSONALIGN_TEST_PG", "postgresql://personalign:personalign@127.0.0.1:5432/personalign_test")


def _pg_store() -> Store:
    try:
        import psycopg

        psycopg.connect(PG.replace("postgresql://", "postgresql://", 1), connect_timeout=3).close()
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'personalign[postgres]')")
    except Exception as e:  # noqa: BLE001 - no server: skip with the reason
        pytest.skip(f"no PostgreSQL server reachable at {PG}: {e}")
    return Store(PG)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}") if request.param == "sqlite" else _pg_store()
    yield s
    s.close()


def _fb(fid: str, user: str = "u", chosen: str = "a") -> StoredFeedback:
    return StoredFeedback(fid, user, [{"role": "user", "content": "p"}], chosen, "b", None, False, time.time())


def test_keys(store):
    kid, key = store.create_key("k")
    assert store.owner_of(key) == kid and store.owner_of(key + "x") is None
    assert any(k["id"] == kid and not k["revoked"] for k in store.list_keys())
    assert hash_key(key) != key and len(hash_key(key)) == 64
    assert store.revoke_key(kid) and not store.revoke_key(kid)
    assert store.owner_of(key) is None


def test_profile_crud_round_trip(store):
    owner, _ = store.create_key()
    drift = {"weights": {"formal": 0.6, "concise": -0.8}, "n_pairs": 3}
    p = store.create_profile(owner, "ann", {"preference": "kind", "method": "base", "params": {"x": 1},
                                            "drift_profile": drift, "pdpo_user_id": "u7"})
    assert p["version"] == 1 and p["drift_profile"] == drift and p["params"] == {"x": 1}
    assert store.create_profile(owner, "ann", {}) is None  # one profile per (key, user)
    assert store.get_profile(owner, "ann") == p
    q = store.update_profile(owner, "ann", {"preference": "brief"})
    assert q["preference"] == "brief" and q["version"] == 2 and q["drift_profile"] == drift
    assert [x["user"] for x in store.list_profiles(owner)[0]] == ["ann"]
    other, _ = store.create_key()
    assert store.get_profile(other, "ann") is None and store.update_profile(other, "ann", {"preference": "x"}) is None
    assert store.delete_profile(owner, "ann") and store.get_profile(owner, "ann") is None
    assert not store.delete_profile(owner, "ann")


def test_feedback_is_idempotent_and_atomic_with_the_profile(store):
    owner, _ = store.create_key()
    store.create_profile(owner, "u", {})
    stored, created = store.add_feedback(owner, _fb("f1"), {"drift_profile": {"n": 1}}, expect_version=1)
    assert created and store.get_profile(owner, "u")["drift_profile"] == {"n": 1}
    again, created = store.add_feedback(owner, _fb("f1"), {"drift_profile": {"n": 1}}, expect_version=2)
    assert not created and again == stored
    # the replay rolled back its profile write with it
    assert store.get_profile(owner, "u")["version"] == 2
    with pytest.raises(FeedbackConflict):
        store.add_feedback(owner, _fb("f1", chosen="other"))
    # a stale version writes nothing at all
    with pytest.raises(ProfileConflict):
        store.add_feedback(owner, _fb("f2"), {"drift_profile": {"n": 2}}, expect_version=1)
    assert store.get_feedback(owner, "f2") is None and store.get_profile(owner, "u")["drift_profile"] == {"n": 1}
    assert [f.feedback_id for f in store.list_feedback(owner, "u")[0]] == ["f1"]


def test_delete_feedback_with_its_profile_change(store):
    owner, _ = store.create_key()
    store.create_profile(owner, "u", {"drift_profile": {"n": 0}})
    store.add_feedback(owner, _fb("f1"), {"drift_profile": {"n": 1}}, expect_version=1)
    with pytest.raises(ProfileConflict):
        store.delete_feedback(owner, "f1", {"drift_profile": {"n": 0}}, expect_version=1)
    assert store.get_feedback(owner, "f1") is not None
    other, _ = store.create_key()
    assert not store.delete_feedback(other, "f1")
    assert store.delete_feedback(owner, "f1", {"drift_profile": {"n": 0}}, expect_version=2)
    assert store.get_feedback(owner, "f1") is None and store.get_profile(owner, "u")["drift_profile"] == {"n": 0}
    assert not store.delete_feedback(owner, "f1")


def test_concurrent_writers_record_each_feedback_once(store):
    """8 threads post the same 20 ids with version-guarded profile updates: 20 rows, 20 increments."""
    owner, _ = store.create_key()
    store.create_profile(owner, "u", {"drift_profile": {"n": 0}})
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for i in range(20):
                while True:
                    if store.get_feedback(owner, f"f{i}") is not None:
                        break
                    p = store.get_profile(owner, "u")
                    try:
                        store.add_feedback(owner, _fb(f"f{i}"), {"drift_profile": {"n": p["drift_profile"]["n"] + 1}},
                                           expect_version=p["version"])
                        break
                    except ProfileConflict:
                        continue
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(store.list_feedback(owner)[0]) == 20
    assert store.get_profile(owner, "u")["drift_profile"] == {"n": 20}


def test_completions(store):
    owner, _ = store.create_key()
    cid = f"chatcmpl-{owner}"
    store.record_completion(owner, cid, "u", [{"role": "user", "content": "hi"}],
                            [{"index": 0, "text": "hello", "method": "base", "finish_reason": "stop"}])
    c = store.get_completion(owner, cid)
    assert c["text"] == "hello" and c["messages"] == [{"role": "user", "content": "hi"}]
    other, _ = store.create_key()
    assert store.get_completion(other, cid) is None


def test_sqlite_runs_a_rollback_journal_without_memory_mapped_files(tmp_path):
    """No WAL (its memory-mapped -shm kills the process with SIGBUS once the file turns unwritable),
    no mmap, every commit synced; a database an earlier release left in WAL mode is switched."""
    import sqlite3

    from sqlalchemy import text

    old = sqlite3.connect(tmp_path / "w.db")
    assert old.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    old.close()
    s = Store(f"sqlite:///{tmp_path / 'w.db'}")
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "truncate"
        assert c.execute(text("PRAGMA mmap_size")).scalar() == 0
        assert c.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    s.close()
    assert not (tmp_path / "w.db-shm").exists()


def test_bad_url():
    with pytest.raises(ValueError, match="database URL"):
        Store("personalign.db")


def test_folding_steps_and_restart_queue(store):
    """An item stored unfolded is pending; ``complete_fold`` writes the profile and marks it folded in one
    transaction under the version check; ``fail_fold`` records why; a deleted item cannot be folded."""
    from personalign.server.store import ProfileConflict

    owner, _ = store.create_key()
    p = store.create_profile(owner, "u", {})
    for fid in ("f1", "f2", "f3"):
        store.add_feedback(owner, _fb(fid, chosen=fid))
    assert [f.feedback_id for o, f in store.pending_feedback() if o == owner] == ["f1", "f2", "f3"]
    with pytest.raises(ProfileConflict):
        store.complete_fold(owner, "f1", {"drift_profile": {"n": 1}}, p["version"] + 7)
    assert store.get_feedback(owner, "f1").folded is False  # the failed transaction left nothing
    done = store.complete_fold(owner, "f1", {"drift_profile": {"n": 1}}, p["version"])
    assert done.folded and store.get_profile(owner, "u")["drift_profile"] == {"n": 1}
    assert store.fail_fold(owner, "f2", "no luck").fold_error == "no luck"
    assert [f.feedback_id for o, f in store.pending_feedback() if o == owner] == ["f3"]
    assert store.count_feedback(owner, "u") == {"total": 3, "folded": 1, "failed": 1, "pending": 1}
    store.delete_feedback(owner, "f3")
    assert store.complete_fold(owner, "f3", {"drift_profile": {"n": 2}}, store.get_profile(owner, "u")["version"]) \
        is None


def test_pages_and_profile_cascade(store):
    owner, _ = store.create_key()
    for u in ("a", "b", "c"):
        store.create_profile(owner, u, {})
    rows, more = store.list_profiles(owner, 2)
    assert [r["user"] for r in rows] == ["a", "b"] and more
    rows, more = store.list_profiles(owner, 2, "b")
    assert [r["user"] for r in rows] == ["c"] and not more
    for i in range(3):
        store.add_feedback(owner, _fb(f"x{i}", user="a"))
    store.record_completion(owner, f"cc-{owner}", "a", [], [{"index": 0, "text": "t", "method": "base",
                                                               "finish_reason": "stop"}])
    page, more = store.list_feedback(owner, "a", 2)
    assert [f.feedback_id for f in page] == ["x0", "x1"] and more
    assert [f.feedback_id for f in store.list_feedback(owner, "a", 2, "x1")[0]] == ["x2"]
    assert store.list_feedback(owner, "a", 2, "nope") == ([], False)
    assert store.delete_profile(owner, "a") == {"feedback": 3, "completions": 1}
    assert store.get_completion(owner, f"cc-{owner}") is None
    store.add_feedback(owner, _fb("y", user="b"))
    assert store.delete_profile(owner, "b", keep_history=True) == {"feedback": 0, "completions": 0}
    assert store.get_feedback(owner, "y") is not None
    assert store.delete_profile(owner, "zz") is None


def test_an_older_database_gains_the_new_columns(tmp_path):
    """A store created before ``fold_error`` existed opens: the column is added in place, the rows kept."""
    import sqlite3

    path = tmp_path / "old.db"
    Store(f"sqlite:///{path}").close()
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE feedback DROP COLUMN fold_error")
    con.execute("INSERT INTO api_keys (id, key_hash, name, created_at) VALUES ('k', 'h', '', 0)")
    con.execute("INSERT INTO feedback (owner, feedback_id, user_id, prompt, chosen, rejected, folded, created_at) "
                "VALUES ('k', 'old', 'u', '[]', 'a', 'b', 1, 0)")
    con.commit()
    con.close()
    s = Store(f"sqlite:///{path}")
    f = s.get_feedback("k", "old")
    assert f.folded and f.fold_error is None
    s.close()


def test_a_locked_database_raises_store_busy_after_its_budget(tmp_path):
    import sqlite3
    import time

    from personalign.server.store import StoreBusy

    s = Store(f"sqlite:///{tmp_path / 'b.db'}", busy_seconds=0.3)
    lock = sqlite3.connect(tmp_path / "b.db")
    lock.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    with pytest.raises(StoreBusy, match="busy"):
        s.create_key()
    assert time.monotonic() - t0 < 5
    lock.rollback()
    lock.close()
    assert s.create_key()


def _earlier_release_db(path) -> tuple[str, str]:
    """A database as an earlier release left it: profiles, feedback and a completion whose ids that
    release accepted but a URL cannot address (``a/b``, ``..``, ``.``), beside clean ones."""
    from personalign.server.store import StoredFeedback

    url = f"sqlite:///{path}"
    s = Store(url)
    kid, _ = s.create_key("old")
    for uid in ("a/b", "..", ".", "ok", "a_b"):  # "a_b" is taken: "a/b" must become something else
        assert s.create_profile(kid, uid, {}) is not None
    s.record_completion(kid, "cmp/1", "a/b", [{"role": "user", "content": "hi"}],
                        [{"index": 0, "text": "hello", "method": "base", "finish_reason": "stop"}])
    s.add_feedback(kid, StoredFeedback("f/1", "a/b", [{"role": "user", "content": "hi"}], "yes", "no", "cmp/1",
                                       True, 1.0))
    s.add_feedback(kid, StoredFeedback("fine", "ok", [{"role": "user", "content": "hi"}], "yes", "no", None, True, 1.0))
    s.close()
    return url, kid


def test_ids_an_earlier_release_accepted_are_renamed_with_their_references(tmp_path):
    from personalign.server.schemas import ID_PATTERN

    url, kid = _earlier_release_db(tmp_path / "old.db")
    s = Store(url)
    renamed = {(m["kind"], m["old"]): m["new"] for m in s.migrated}
    assert set(renamed) == {("user", "a/b"), ("user", ".."), ("user", "."), ("feedback", "f/1"),
                            ("completion", "cmp/1")}
    assert renamed[("user", "a/b")] == "a_b-2" and renamed[("user", "..")] == "id.."
    assert renamed[("user", ".")] == "id." and renamed[("feedback", "f/1")] == "f_1"
    assert all(ID_PATTERN.fullmatch(new) for new in renamed.values())
    users = {p["user"] for p in s.list_profiles(kid)[0]}
    assert users == {"a_b-2", "id..", "id.", "ok", "a_b"}
    fb = s.get_feedback(kid, "f_1")
    assert fb.user_id == "a_b-2" and fb.completion_id == "cmp_1"  # references follow their rows
    assert s.get_completion(kid, "cmp_1")["user"] == "a_b-2"
    assert s.get_feedback(kid, "fine").user_id == "ok"  # clean rows untouched
    s.close()
    assert Store(url).migrated == []  # once only


def test_a_database_without_the_learned_column_opens_and_gets_it(tmp_path):
    """Stores written before items recorded what they taught their learners (no ``feedback.learned``)
    open: the column is added, their items read as having taught nothing, and deletes work."""
    import sqlite3

    from personalign.learners import state_before
    from personalign.server.store import StoredFeedback

    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = Store(url)
    kid, _ = s.create_key("old")
    s.create_profile(kid, "u", {})
    for fid in ("f1", "f2"):
        s.add_feedback(kid, StoredFeedback(fid, "u", [{"role": "user", "content": "hi"}], "yes", "no", None, True, 1.0))
    s.close()
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("ALTER TABLE feedback DROP COLUMN learned")
    con.commit()
    con.close()
    s = Store(url)
    items = s.folded_items(kid, "u")  # the state before f2, by the rule a delete and a replay use
    assert s.get_feedback(kid, "f1").learned is None and state_before(items, 1, "pdpo") is None
    assert s.stale_users() == []
    assert s.delete_feedback(kid, "f1", stale_after=True)
    s.complete_fold(kid, "f2", {}, s.get_profile(kid, "u")["version"], {"pdpo_embedding": {"x": 1}})
    assert s.get_feedback(kid, "f2").learned == {"pdpo_embedding": {"x": 1}}
    s.close()


def test_the_playground_key_keeps_its_users_across_starts(tmp_path):
    """``serve --playground-key``: each start gives the key named 'playground' a new secret; its id, and so
    the users it owns, stay, and the old secret stops working."""
    s = Store(f"sqlite:///{tmp_path / 'pg.db'}")
    kid, key = s.playground_key()
    assert s.owner_of(key) == kid
    s.create_profile(kid, "maya", {"preference": "short"})
    kid2, key2 = s.playground_key()
    assert kid2 == kid and key2 != key and key2.startswith(f"pa-{kid[4:]}-")
    assert s.owner_of(key) is None and s.owner_of(key2) == kid
    assert s.get_profile(kid, "maya")["preference"] == "short"
    assert [k["name"] for k in s.list_keys()] == ["playground"]
    s.close()
