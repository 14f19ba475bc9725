"""What one choice costs with the server's defaults: ``personalign serve --model smollm2`` as a user
starts it (its own process, no tuning flags), against the same server with earlier defaults.

Per configuration: a fresh server (SQLite in a temporary directory); the idle latency of a short chat
(greedy, ``--chat-tokens`` tokens; median of 3); then per repeat (the first warms up) a chat completion
with ``n = 2`` sampled replies of ``--max-tokens`` tokens for user ``u``, and ``POST /v1/feedback``
choosing reply 0 (``wait: true``): the time until every learner of the user's profile has folded it,
nothing else running (the fold time). Each such choice is followed by another during which another
client sends the short chat every 2 seconds: the worst and the median latency of those chats against
idle (the folding budget slows a fold while chats decode, so these choices are not timed).

Configurations (``--configs``, comma-separated):

* ``defaults``: no flags; the profile names no learner (Drift weights);
* ``earlier``: the defaults before this release (``--drift-pool-size 0 --drift-response-tokens 64``:
  all 48 attributes, 64 reply tokens scored);
* ``incontext``: no flags; the profile's learner is ``incontext`` (no method: ``base`` until it has
  learned something, then ``preference_prompting`` from it);
* ``pool16``, ``pool24``, ``tokens24``: candidates (16 or 24 of the 48 attributes at 64 reply tokens;
  all 48 at 24 reply tokens).

Run: ``OMP_NUM_THREADS=2 python benchmarks/choice_defaults.py`` (``--json FILE`` keeps the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from personalign.environment import cpu_name

ADMIN = "bench-admin"
CONFIGS = {
    "defaults": ([], {}),
    "earlier": (["--drift-pool-size", "0", "--drift-response-tokens", "64"], {}),
    "incontext": ([], {"learner": "incontext"}),  # base until the first choice, then preference_prompting
    # candidates for the defaults, measured side by side
    "pool16": (["--drift-pool-size", "16", "--drift-response-tokens", "64"], {}),
    "pool24": (["--drift-pool-size", "24", "--drift-response-tokens", "64"], {}),
    "tokens24": (["--drift-pool-size", "0", "--drift-response-tokens", "24"], {}),
}
PROMPTS = ["Why is the sky blue?", "How do vaccines work?", "Explain what a mortgage is.",
           "How should I start running?", "What makes a good story?", "Plan a weekend in a city I do not know."]


def serve(flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Path(tempfile.mkdtemp()) / "bench.db"
    env = {**os.environ, "PERSONALIGN_ADMIN_KEY": ADMIN}
    cmd = [sys.executable, "-m", "personalign", "serve", "--model", "smollm2", "--db", f"sqlite:///{db}",
           "--port", str(port), "--model-id", "m", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["status"] == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not come up: {log.read_text()[-2000:]}")


def run_config(name: str, repeats: int, max_tokens: int, chat_tokens: int, log: Path, probe_every: float = 2.0
               ) -> dict:
    flags, profile = CONFIGS[name]
    proc, url = serve(flags, log)
    try:
        key = httpx.post(f"{url}/v1/keys", json={"name": "b"}, headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=h, timeout=3600) as c:
            assert c.post("/v1/profiles", json={"user": "u", **profile}).status_code == 201
            short = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": chat_tokens,
                     "temperature": 0, "user": "other"}

            def chat() -> float:
                t0 = time.perf_counter()
                r = c.post("/v1/chat/completions", json=short)
                assert r.status_code == 200, r.text
                return time.perf_counter() - t0
            chat()  # warm
            idle = statistics.median(chat() for _ in range(3))
            folds, during = [], []
            k = 0
            for rep in range(2 * repeats + 1):  # the first warms up; then alone, then with probe chats
                probes = rep > 0 and rep % 2 == 0
                body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}], "n": 2,
                        "temperature": 1.0, "seed": k, "max_tokens": max_tokens, "user": "u"}
                comp = c.post("/v1/chat/completions", json=body).json()
                done: dict = {}

                def post(comp=comp, k=k, done=done) -> None:
                    t0 = time.perf_counter()
                    with httpx.Client(base_url=url, headers=h, timeout=3600) as c2:
                        done["r"] = c2.post("/v1/feedback", json={"id": f"c{k}", "completion_id": comp["id"],
                                                                   "chosen_index": 0})
                    done["s"] = time.perf_counter() - t0
                k += 1
                t = threading.Thread(target=post)
                t.start()
                lat = []
                while probes and t.is_alive():  # a chat every `probe_every` seconds while the choice folds
                    time.sleep(probe_every)
                    if t.is_alive():
                        lat.append(chat())
                t.join()
                r = done["r"]
                if r.status_code == 400:  # two identical replies: nothing to learn
                    continue
                assert r.status_code == 201 and r.json()["folded"], r.text
                if rep == 0:
                    continue  # warm-up
                if probes:
                    during.extend(lat)
                else:
                    folds.append(done["s"])
                print(f"{name}: choice {k}{' (with probe chats)' if probes else ''}: {done['s']:.1f} s", file=sys.stderr,
                      flush=True)
            learners = c.get("/v1/profiles/u").json()
        return {"config": name, "fold_s": folds, "chat_idle_s": idle, "chat_during_s": during,
                "drift_pairs": (learners.get("drift_profile") or {}).get("num_pairs"),
                "attributes": len((learners.get("drift_profile") or {}).get("weights") or {}),
                "hypothesis": (learners.get("incontext") or {}).get("hypothesis")}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="earlier,defaults,incontext")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chat-tokens", type=int, default=16)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    rows = [run_config(n, a.repeats, a.max_tokens, a.chat_tokens, log) for n in a.configs.split(",")]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    import torch

    print(f"device: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    print("| configuration | attributes scored | fold time per choice (s, median; each) | chat idle (s) | "
          "chat while folding (s, median / worst) | worst / idle |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["chat_during_s"] or [float("nan")]
        print(f"| {r['config']} | {r['attributes'] or '—'} | {statistics.median(r['fold_s']):.1f} "
              f"({', '.join(f'{x:.1f}' for x in r['fold_s'])}) | {r['chat_idle_s']:.2f} | "
              f"{statistics.median(d):.2f} / {max(d):.2f} | {max(d) / r['chat_idle_s']:.1f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
