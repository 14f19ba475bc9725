"""Durability: ``personalign serve`` killed with SIGKILL while clients post feedback.

After the kill, every feedback item the server acknowledged (2xx) is in the store (the same SQLite
file) exactly once; a server restarted on that file (in this process: one subprocess start is slow
enough) answers re-posts of every attempted item, acknowledged or not, leaving each one recorded
exactly once (idempotent by the client's id).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from tests.integration.server.conftest import start_subprocess_server, stop_subprocess_server

from personalign.server import Store

ADMIN = "durability-admin"
REPO = Path(__file__).resolve().parents[3]


def test_sigkill_keeps_every_acknowledged_feedback_exactly_once(tmp_path, tiny_lm, tiny_chat_tokenizer,
                                                                 live_factory):
    model_dir = tmp_path / "tiny"
    tiny_lm.save_pretrained(model_dir)
    tiny_chat_tokenizer.save_pretrained(model_dir)
    db, log = f"sqlite:///{tmp_path / 'srv.db'}", tmp_path / "server.log"
    proc, url = start_subprocess_server(model_dir, db, log, admin=ADMIN)
    try:
        key = httpx.post(f"{url}/v1/keys", json={"name": "d"}, headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{url}/v1/profiles", json={"user": "u"}, headers=auth).status_code == 201

        acked: list[str] = []
        attempted: list[str] = []
        lock = threading.Lock()

        def item(fid: str) -> dict:
            return {"id": fid, "user": "u", "prompt": f"question {fid}", "chosen": f"good {fid}",
                    "rejected": f"bad {fid}"}

        def client(t: int) -> None:
            with httpx.Client(base_url=url, headers=auth, timeout=10) as c:
                for i in range(10_000):
                    fid = f"t{t}-{i}"
                    with lock:
                        attempted.append(fid)
                    try:
                        r = c.post("/v1/feedback", json=item(fid))
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code in (200, 201):
                        with lock:
                            acked.append(fid)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.time() + 30
        while len(acked) < 30 and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-flight: clients are posting right now
        proc.wait(10)
        for th in threads:
            th.join(30)
        assert len(acked) >= 30

        store = Store(db)
        stored = Counter(f.feedback_id for f in store.list_feedback(store.owner_of(key), "u", 100_000)[0])
        store.close()
        assert all(stored[fid] == 1 for fid in acked), [fid for fid in acked if stored[fid] != 1]
        assert set(stored) <= set(attempted) and set(stored.values()) == {1}

        lv = live_factory(db=db)
        with httpx.Client(base_url=lv.url, headers=auth, timeout=30) as c:
            for fid in attempted:  # clients retry everything
                r = c.post("/v1/feedback", json=item(fid))
                assert r.status_code == (200 if fid in stored else 201), (fid, r.status_code, r.text)
            # items stored but not folded when the server died are folded by the restarted one
            deadline = time.time() + 120
            while time.time() < deadline:
                q = c.get("/health").json()["queue"]
                if q["folds_waiting"] == 0 and q["folds_running"] == 0:
                    break
                time.sleep(0.1)
            items, after = [], None
            while True:  # every page
                body = c.get("/v1/feedback", params={"user": "u", "limit": 50, **({"after": after} if after else {})}).json()
                items += body["data"]
                if not body["has_more"]:
                    break
                after = body["last_id"]
            final = Counter(f["id"] for f in items)
        assert set(final) == set(attempted) and set(final.values()) == {1}
        assert all(f["folded"] for f in items), [f["id"] for f in items if not f["folded"]]
        # each item was folded once, in the same transaction that marked it folded
        drift = lv.store.get_profile(lv.store.owner_of(key), "u")["drift_profile"]
        assert drift["num_pairs"] == len(final)
    finally:
        stop_subprocess_server(proc)
