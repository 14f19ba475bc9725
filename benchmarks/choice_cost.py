"""The cost of one choice: the server time to fold a user's choice among ``n`` alternatives.

A live server in this process (real HTTP through httpx, ``benchmarks/fold_isolation.py``'s set-up) on
each model. Per repeat and ``n``: a chat completion with ``n`` sampled choices (``--max-tokens`` each),
then ``POST /v1/feedback`` with ``completion_id`` and ``chosen_index`` (``wait: true``, nothing else
running): the time until the choice is folded into the user's Drift profile (its ``n − 1`` pairs, the
chosen reply scored once: ``n`` replies under the base and every attribute prompt of the default
pool), with the sequences and tokens the engine scored for it. With ``--pdpo-checkpoint`` (a
``train pdpo`` checkpoint of that model) the user is a ``pdpo`` user the checkpoint never saw, so the
same fold also fits their P-DPO embedding (``training.pdpo.user_fit``, the server's defaults): the
rows ``+ P-DPO fit`` time both learners together.

Run: ``OMP_NUM_THREADS=2 python benchmarks/choice_cost.py --models stories260k,smollm2``
(``--models smollm2 --pdpo-checkpoint DIR`` for the embedding fit)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from personalign.personas.attributes import default_pool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_isolation import start  # noqa: E402  (the same in-process server)

PROMPTS = ["How do vaccines work?", "Plan a weekend in a city I do not know.", "Why is the sky blue?",
           "Explain what a mortgage is.", "How should I start running?", "What makes a good story?"]


def run_model(name: str, ns: list[int], repeats: int, max_tokens: int, checkpoint: str | None = None) -> list[dict]:
    url, server, engine = start(name, checkpoint)
    key = httpx.post(f"{url}/v1/keys", json={"name": "b"}, headers={"Authorization": "Bearer admin"}).json()["key"]
    rows = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as c:
        c.post("/v1/profiles", json={"user": "u", **({"method": "pdpo"} if checkpoint else {})})
        k = 0
        for n in [ns[0], *ns]:  # the first round warms up
            times, tokens, seqs, pairs, reply_tokens = [], [], [], [], []
            for _ in range(repeats):
                body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}], "n": n,
                        "temperature": 1.0, "seed": k, "max_tokens": max_tokens, "user": "u"}
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                comp = r.json()
                t0_tokens, t0_folds = engine.stats.fold_tokens, engine.stats.folds
                t0 = time.perf_counter()
                f = c.post("/v1/feedback", json={"id": f"c{k}", "completion_id": comp["id"], "chosen_index": 0})
                dt = time.perf_counter() - t0
                k += 1
                if f.status_code == 400:  # identical choices: nothing to compare (rare when sampled)
                    continue
                assert f.status_code == 201 and f.json()["folded"], f.text
                assert engine.stats.folds - t0_folds == 1
                assert not checkpoint or f.json() and c.get("/v1/profiles/u").json()["pdpo_embedding"]
                times.append(dt)
                tokens.append(engine.stats.fold_tokens - t0_tokens)
                pairs.append(1 + len(f.json()["also_rejected"]))
                seqs.append((1 + pairs[-1]) * (len(default_pool()) + 1))
                reply_tokens.append(comp["usage"]["completion_tokens"] / n)
            rows.append({"model": name + (" + P-DPO fit" if checkpoint else ""), "n": n, "fold_s": times, "tokens": tokens, "pairs": pairs, "sequences": seqs,
                         "reply_tokens": reply_tokens})
            print(f"{name} n={n}: {statistics.median(times):.2f} s per choice", file=sys.stderr, flush=True)
    server.should_exit = True
    return rows[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="stories260k,smollm2")
    ap.add_argument("--n", default="2,4", help="choices per completion, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--pdpo-checkpoint", metavar="DIR", help="also fit the user's P-DPO embedding (train pdpo)")
    a = ap.parse_args()
    ns = [int(x) for x in a.n.split(",")]
    rows = [r for m in a.models.split(",") for r in run_model(m, ns, a.repeats, a.max_tokens, a.pdpo_checkpoint)]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    import torch

    print(f"device: cpu, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | n | pairs | reply tokens (mean) | sequences scored | tokens scored | fold time per choice (s, "
          "median) | per pair (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["fold_s"])
        pairs = statistics.median(r["pairs"])
        print(f"| {r['model']} | {r['n']} | {pairs:g} | {statistics.mean(r['reply_tokens']):.0f} | "
              f"{statistics.median(r['sequences']):g} | {statistics.median(r['tokens']):g} | {med:.2f} | "
              f"{med / pairs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
