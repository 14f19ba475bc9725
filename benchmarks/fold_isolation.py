"""Feedback folding beside chats: a chat's latency while feedback is queued, and fold throughput.

A live server (in this process, real HTTP through httpx) on each model:

* **chat latency**: an 8-token, greedy, non-streamed chat completion, median of ``--repeats``
  requests, on an idle server, then while 1 and 8 feedback items (``--chars`` characters each: a
  fifth prompt, two fifths chosen, two fifths rejected) are queued for folding (posted with
  ``wait: false`` just before; a chat counts only if folds were still queued when it finished);
* **fold throughput**: 8 items for one user posted one after another (each waiting until folded)
  against the same 8 posted at once: total wall time, concurrent / sequential.

``--contention both`` runs each model twice: on an otherwise idle machine, and with a second process
busy on the same cores (matrix products on ``--busy-threads`` threads, default 1: with the server's 2
threads on 2 cores, a load of 3), as a server shares a machine with other work. The table also counts the folding forwards and the tokens each fed: the
folding budget adapts to the machine, so a slower or busier CPU folds in larger forwards, not in
forwards of a few tokens.

Run: ``OMP_NUM_THREADS=2 python benchmarks/fold_isolation.py --models stories260k,smollm2 --contention both``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her "
         "friends, and every day she looked for new flowers and birds. ")


def text(n: int, tag: str) -> str:
    return (f"{tag}: " + STORY * (n // len(STORY) + 1))[:n]


def feedback(i: int, user: str, chars: int) -> dict:
    return {"id": f"{user}-{i}", "user": user, "prompt": text(chars // 5, f"question {i}"),
            "chosen": text(2 * chars // 5, f"a kind answer {i}"), "rejected": text(2 * chars // 5, f"a short one {i}")}


BUSY = ("import torch\ntorch.set_num_threads({threads})\nx = torch.randn(512, 512)\n"
        "while True:\n    x = torch.tanh(x @ x)\n")


def busy_process(threads: int) -> subprocess.Popen:
    """A second process keeping ``threads`` cores busy (matrix products), until it is killed."""
    return subprocess.Popen([sys.executable, "-c", BUSY.format(threads=threads)])


def start(model_name: str, pdpo_checkpoint: str | None = None) -> tuple[str, object, object]:
    import uvicorn

    from personalign.assembly import build_methods
    from personalign.methods import METHODS
    from personalign.server import EngineWorker, Limits, Store, create_app
    from personalign.views import HFBackend, load_model

    path = {"stories260k": str(ROOT.parent / "shared" / "models" / "stories260k")}.get(model_name, model_name)
    if pdpo_checkpoint is None:
        lm = load_model(path, dtype="float32")
        backend = HFBackend(lm.model, lm.tokenizer)
        methods, _ = build_methods(METHODS.names(), backend)
    else:  # as `personalign serve --checkpoint` builds it: pdpo on its own copy of the base model
        from personalign.assembly import Resources, build_backend

        res = Resources(model=path, dtype="float32", pdpo_checkpoint=pdpo_checkpoint, shared=True)
        backend = build_backend(res, METHODS.names())
        methods, _ = build_methods(METHODS.names(), backend, res)
    chat_template = backend.tokenizer("main").chat_template is not None
    engine = EngineWorker(backend, methods, chat_template=chat_template)
    import tempfile

    db = Path(tempfile.mkdtemp()) / "fold.db"
    app = create_app(engine, Store(f"sqlite:///{db}"), limits=Limits(max_folds=64), model_id="m", admin_key="admin")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, engine


def queue_state(c: httpx.Client) -> int:
    q = c.get("/health").json()["queue"]
    return q["folds_waiting"] + q["folds_running"]


def settle(c: httpx.Client) -> None:
    while queue_state(c):
        time.sleep(0.2)


def chat_latencies(c: httpx.Client, repeats: int, need_folds: bool) -> list[float]:
    out = []
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a short story."}], "max_tokens": 8,
            "temperature": 0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = c.post("/v1/chat/completions", json=body)
        dt = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        if need_folds and not queue_state(c):
            break  # the folds ran out: later chats would measure an idle server
        out.append(dt)
    return out


def run_model(name: str, chars: int, repeats: int) -> dict:
    url, server, engine = start(name)
    key = httpx.post(f"{url}/v1/keys", json={"name": "b"}, headers={"Authorization": "Bearer admin"}).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    res: dict = {"model": name, "chars": chars}
    with httpx.Client(base_url=url, headers=auth, timeout=3600) as c:
        for u in ("lat", "seq", "conc"):
            c.post("/v1/profiles", json={"user": u})
        r = c.post("/v1/feedback", json=feedback(0, "lat", chars))  # warm-up (and a first profile)
        assert r.status_code == 201, r.text
        chat_latencies(c, 2, False)
        res["idle"] = chat_latencies(c, repeats, False)
        print(f"{name}: idle chat {statistics.median(res['idle']):.3f} s", file=sys.stderr, flush=True)
        n_item = 1
        for queued in (1, 8):
            lat: list[float] = []
            while len(lat) < repeats:
                for _ in range(queued):
                    r = c.post("/v1/feedback", json={**feedback(n_item, "lat", chars), "wait": False})
                    assert r.status_code == 202, r.text
                    n_item += 1
                time.sleep(0.2)
                lat += chat_latencies(c, repeats - len(lat), True)
                settle(c)
            res[f"queued_{queued}"] = lat
            print(f"{name}: chat with {queued} queued {statistics.median(lat):.3f} s", file=sys.stderr, flush=True)
        f0, t0 = engine.stats.folds, time.perf_counter()
        for i in range(8):
            assert c.post("/v1/feedback", json=feedback(i, "seq", chars)).status_code == 201
        res["sequential_s"] = time.perf_counter() - t0
        print(f"{name}: 8 items one after another {res['sequential_s']:.1f} s", file=sys.stderr, flush=True)
        res["fold_s_per_item"] = res["sequential_s"] / 8
        res["fold_forwards"] = engine.stats.fold_forwards
        res["fold_tokens"] = engine.stats.fold_tokens
        res["folds"] = engine.stats.folds - f0

    async def together() -> float:
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=3600) as ac:
            t0 = time.perf_counter()
            rs = await asyncio.gather(*(ac.post("/v1/feedback", json=feedback(i, "conc", chars)) for i in range(8)))
            assert all(r.status_code == 201 for r in rs), [r.text for r in rs if r.status_code != 201]
            return time.perf_counter() - t0
    res["concurrent_s"] = asyncio.run(together())
    with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        res["profile_pairs"] = c.get("/v1/profiles/conc").json()["drift_profile"]["num_pairs"]
    server.should_exit = True
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="stories260k,smollm2")
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--contention", choices=["none", "busy", "both"], default="none",
                    help="run on an idle machine (none), beside a second busy process (busy), or both")
    ap.add_argument("--busy-threads", type=int, default=1, metavar="N", help="threads of the busy process")
    ap.add_argument("--json", metavar="FILE", help="the rows, written as each one finishes")
    a = ap.parse_args()
    rows = []
    for m in a.models.split(","):
        for load in {"none": ["idle"], "busy": ["busy"], "both": ["idle", "busy"]}[a.contention]:
            other = busy_process(a.busy_threads) if load == "busy" else None
            try:
                label = "idle" if other is None else f"busy ({a.busy_threads} thread{'s' * (a.busy_threads > 1)})"
                rows.append({**run_model(m, a.chars, a.repeats), "machine": label})
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=1))
    import torch

    print(f"device: cpu, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | machine | item chars | chat 8 tokens, idle (s) | 1 item queued (s) | 8 items queued (s) | "
          "worst / idle | 8 items sequential (s) | 8 at once (s) | at once / sequential | folding forwards | "
          "tokens a forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        idle = statistics.median(r["idle"])
        q1, q8 = statistics.median(r["queued_1"]), statistics.median(r["queued_8"])
        print(f"| {r['model']} | {r['machine']} | {r['chars']} | {idle:.3f} | {q1:.3f} | {q8:.3f} | "
              f"{max(q1, q8) / idle:.2f}× | {r['sequential_s']:.1f} | {r['concurrent_s']:.1f} | "
              f"{r['concurrent_s'] / r['sequential_s']:.2f}× | {r['fold_forwards']} | "
              f"{r['fold_tokens'] / max(r['fold_forwards'], 1):.0f} |")
    print("\ntargets: chat latency with feedback queued ≤ 2× idle; 8 items at once ≤ 1.2× one after another")
    ok = all(max(statistics.median(r["queued_1"]), statistics.median(r["queued_8"])) <= 2 * statistics.median(r["idle"])
             and r["concurrent_s"] <= 1.2 * r["sequential_s"] for r in rows)
    print("met" if ok else "not met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
