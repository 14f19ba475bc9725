"""Throughput of ``personalign serve`` at different client concurrencies (docs/performance.md).

Starts the server in this process (uvicorn on a thread, a free port on 127.0.0.1) over one model,
then for each concurrency C runs C clients that together send ``--requests`` chat completions
(greedy, ``--max-tokens`` each; request i uses the i-th of ``--method``'s comma-separated methods,
cycling) and reports requests/s, generated tokens/s, mean latency, how many rows and how many
different methods the engine ran in one forward.

    python benchmarks/server_throughput.py --model smollm2 --requests 32 --concurrency 1,16 --max-tokens 32 \
        --method base,preference_prompting,amulet,linear_alignment
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time

import httpx

from personalign.assembly import build_methods
from personalign.environment import environment_record
from personalign.methods import METHODS
from personalign.server import EngineWorker, Limits, Store, create_app
from personalign.views import HFBackend
from personalign.views.loading import load_model

TOPICS = ["a cat", "the sea", "a robot", "autumn", "a city at night", "a dragon", "a garden", "the moon"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(url: str, key: str, n: int, conc: int, max_tokens: int, methods: list[str]) -> dict:
    lat: list[float] = []
    tokens = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def client() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}],
                        "personalization": {"method": methods[i % len(methods)], "preference": "vivid and concise"}}
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - t0
    return {"concurrency": conc, "requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": tokens / wall,
            "tokens": tokens, "mean_latency_s": statistics.mean(lat)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--method", default="base", help="one method, or several separated by commas (requests cycle)")
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a shape preset (llama3-8b, llama3-1b, tiny-llama, ...) with random weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    a = p.parse_args()
    names = [m.strip() for m in a.method.split(",") if m.strip()]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(a.model, dtype=a.dtype, device=device, random_weights=a.random_weights)
    backend = HFBackend(lm.model, lm.tokenizer)
    methods, _ = build_methods(METHODS.names(), backend)
    tmp = tempfile.mkdtemp()
    admin = "bench-admin"
    rows = []
    import uvicorn

    for conc in [int(c) for c in a.concurrency.split(",")]:
        engine = EngineWorker(backend, methods, max_pending=256, max_batch=max(16, conc))
        store = Store(f"sqlite:///{os.path.join(tmp, f'bench{conc}.db')}")
        app = create_app(engine, store, limits=Limits(max_tokens=a.max_tokens, default_max_tokens=a.max_tokens),
                         model_id="bench", admin_key=admin)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        key = httpx.post(f"{url}/v1/keys", json={}, headers={"Authorization": f"Bearer {admin}"}).json()["key"]
        f0 = backend.forward_count
        row = asyncio.run(_run(url, key, a.requests, conc, a.max_tokens, names))
        row["max_rows_in_step"] = engine.stats.max_cohort_rows
        row["methods_in_forward"] = engine.stats.max_methods_in_forward
        row["batches"] = engine.stats.cohorts
        row["engine_steps"] = engine.stats.steps
        row["forwards"] = backend.forward_count - f0
        rows.append(row)
        server.should_exit = True
        th.join()
        store.close()
    # the library without the server, for reference: one batch of C requests through ``generate``
    from personalign.decoding.loop import generate
    from personalign.decoding.sampling import SamplingConfig
    from personalign.types import Request

    lib = {}
    for conc in [int(c) for c in a.concurrency.split(",")]:
        t0, n_tok = time.perf_counter(), 0
        for name in names:  # one batch per method (the library has no cross-method batch)
            k = len(range(names.index(name), conc, len(names)))
            if k == 0:
                continue
            reqs = [Request(prompt=[{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}],
                            preference="vivid and concise") for i in range(k)]
            outs = generate(methods[name], reqs, backend, max_new_tokens=a.max_tokens,
                            sampling=SamplingConfig(temperature=0.0))
            n_tok += sum(len(o.token_ids) for o in outs)
        lib[conc] = n_tok / (time.perf_counter() - t0)
    env = environment_record(lm.model)
    if a.json:
        import json

        for r in rows:
            r["library_tok_per_s"] = lib[r["concurrency"]]
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "methods": names, "max_tokens": a.max_tokens, "rows": rows,
                       "environment": env}, f, indent=1)
    print(f"model {a.model}, methods {','.join(names)}, {a.requests} requests x max_tokens {a.max_tokens} (greedy); "
          f"{env['device']}, torch threads {env['threads']}, commit {env['commit']}, {env['date']}\n")
    print("| concurrency | wall s | requests/s | tokens/s | mean latency s | batches | most requests in one forward "
          "| most methods in one forward | rounds | model forwards | library `generate`, C requests: tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['wall_s']:.1f} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['mean_latency_s']:.2f} | {r['batches']} | {r['max_rows_in_step']} | {r['methods_in_forward']} | "
              f"{r['engine_steps']} | {r['forwards']} | {lib[r['concurrency']]:.1f} |")
    if len(rows) >= 2:
        print(f"\nthroughput ratio (tokens/s) concurrency {rows[-1]['concurrency']} vs {rows[0]['concurrency']}: "
              f"{rows[-1]['tok_per_s'] / rows[0]['tok_per_s']:.2f}x")


if __name__ == "__main__":
    main()
