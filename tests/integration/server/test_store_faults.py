"""A store that fails while the server runs is answered, through a real HTTP client: 503 with
Retry-After, the server alive, ``/health`` honest (``degraded`` naming the fault, ``ok`` again once the
store recovers), and nothing acknowledged lost: an item stored before the fault folds once the store
answers again.

Faults made for real: a full disk (SQLite's own "database or disk is full", by capping the database's
pages on fresh connections) and the database files made immutable (``chattr +i``) under a server in
its own process — the case that killed the server with SIGBUS while SQLite ran in WAL mode.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from sqlalchemy import event
from tests.integration.server.conftest import ADMIN, start_subprocess_server, stop_subprocess_server

ITEM = {"user": "u", "prompt": "tell me about the cat", "chosen": "the cat was happy", "rejected": "no"}


def _wait_health(url: str, status: str, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while True:
        h = httpx.get(f"{url}/health", timeout=5).json()
        if h["status"] == status:
            return h
        assert time.time() < deadline, h
        time.sleep(0.1)


def _wait_folded(c: httpx.Client, fid: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not c.get(f"/v1/feedback/{fid}").json().get("folded"):
        assert time.time() < deadline, c.get(f"/v1/feedback/{fid}").text
        time.sleep(0.1)


def test_a_full_disk_answers_503_and_recovers(live_factory, tmp_path):
    lv = live_factory(db=f"sqlite:///{tmp_path / 'full.db'}")
    with lv.client(lv.new_key()) as c:
        assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
        assert c.post("/v1/feedback", json={"id": "before", **ITEM}).status_code == 201

        def cap(dbapi_conn, _):  # the disk is full: the database may not grow by one page
            cur = dbapi_conn.cursor()
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            cur.execute(f"PRAGMA max_page_count={pages}")
            cur.close()

        event.listen(lv.store.engine, "connect", cap)
        lv.store.engine.dispose()  # every connection from now on is capped
        try:
            big = {"user": "u", "preference": "x" * 1_900}
            codes = set()
            for i in range(200):  # fill the free pages the database still has, then fail
                r = c.post("/v1/profiles", json={**big, "user": f"p{i}"})
                codes.add(r.status_code)
                if r.status_code == 503:
                    break
            assert 503 in codes, codes
            assert r.headers["Retry-After"] and r.json()["error"]["code"] == "store_unavailable"
            assert "full" in r.json()["error"]["message"]
            h = _wait_health(lv.url, "degraded")
            assert "full" in h["store_health"]["fault"]
            assert c.get("/v1/feedback/before").status_code == 200  # reads still answer
        finally:
            event.remove(lv.store.engine, "connect", cap)
            lv.store.engine.dispose()
        _wait_health(lv.url, "ok")  # the probe saw a write succeed
        assert c.post("/v1/profiles", json={**big, "user": "after"}).status_code == 201


def _chattr(flag: str, paths: list) -> None:
    for p in paths:
        if p.exists():
            subprocess.run(["chattr", flag, str(p)], check=True, capture_output=True)


@pytest.fixture()
def immutable_ok(tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: the immutable-file fault cannot be made here")
    r = subprocess.run(["chattr", "+i", str(probe)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"chattr +i is not allowed here ({r.stderr.decode().strip()}): needs root on ext4 or the like")
    subprocess.run(["chattr", "-i", str(probe)], check=True)


def test_database_files_made_immutable_under_a_running_server(model_dir, tmp_path, immutable_ok):
    db = tmp_path / "imm.db"
    files = [db, tmp_path / "imm.db-journal", tmp_path / "imm.db-wal", tmp_path / "imm.db-shm"]
    log = tmp_path / "imm.log"
    proc, url = start_subprocess_server(model_dir, f"sqlite:///{db}", log)
    try:
        key = httpx.post(f"{url}/v1/keys", json={"name": "i"}, headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            assert c.post("/v1/profiles", json={"user": "u"}).status_code == 201
            chat = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            assert c.post("/v1/chat/completions", json=chat).status_code == 200  # a write before the fault
            long = {**ITEM, "chosen": "the cat was happy and " * 40}
            assert c.post("/v1/feedback", json={"id": "acked", **long, "wait": False}).status_code == 202
            _chattr("+i", files)
            try:
                assert c.get("/v1/profiles/u").status_code in (200, 503)  # a read: answered either way
                r = c.post("/v1/profiles", json={"user": "v"})
                assert r.status_code == 503 and r.headers["Retry-After"], r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                r = c.post("/v1/chat/completions", json=chat)
                assert r.status_code in (200, 503), r.text  # never a 500, never a crash
                h = _wait_health(url, "degraded")
                assert h["store_health"]["fault"]
                time.sleep(1.0)  # the acknowledged item's merge meets the fault and waits
                assert proc.poll() is None, "the server died"
            finally:
                _chattr("-i", files)
            _wait_health(url, "ok")
            _wait_folded(c, "acked")  # acknowledged before the fault: folded once the store answers
            assert c.get("/v1/profiles/u").json()["drift_profile"]["num_pairs"] == 1
            assert c.post("/v1/profiles", json={"user": "v"}).status_code == 201
    finally:
        _chattr("-i", files)
        stop_subprocess_server(proc)
    text = log.read_text(errors="replace")
    assert "the store failed:" in text and "Traceback" not in text, text[-3000:]
