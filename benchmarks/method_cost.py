"""Deterministic and CPU-time cost of decoding methods relative to ``base`` (B = 1, greedy, EOS ignored).

For each method (built by ``eval.bench.bench_method``, as in ``personalign bench``) and each generation
length: model forwards of the decoding steps (prefill excluded) and token-rows they feed (real tokens
× rows), both per emitted token after the first (which comes from the prefill); and the median over
``--repeats`` interleaved runs of wall time and of this process's CPU time, each divided by ``base``'s.
With ``OMP_NUM_THREADS=1`` the CPU time is the work done, which other jobs on a shared machine inflate
far less than wall time (they still compete for caches and memory bandwidth); ``personalign bench``
gives the wall-clock ratio to ``model.generate`` and should be preferred on a quiet machine.

    OMP_NUM_THREADS=1 python benchmarks/method_cost.py --methods persona_judge,pad --max-new-tokens 48,128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from personalign.decoding.loop import generate
from personalign.eval.bench import BENCH_PREFERENCES, BENCH_PROMPTS, bench_method
from personalign.methods import get_method
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.loading import load_model


def count_steps(backend: HFBackend) -> dict[str, int]:
    """Wrap ``backend.step`` (on the instance) to count its forwards and token-rows."""
    counts = {"forwards": 0, "token_rows": 0}
    inner = backend.step

    def step(state, tokens, lengths=None, views=None):
        B, L = tokens.shape[0], tokens.shape[-1]
        n = torch.full((B,), L) if lengths is None else lengths.long().cpu()
        k = state.num_views if views is None else len(list(views))
        counts["token_rows"] += int(n.sum()) * k
        f0 = backend.forward_count
        out = inner(state, tokens, lengths, views)
        counts["forwards"] += backend.forward_count - f0
        return out

    backend.step = step
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="persona_judge,pad")
    ap.add_argument("--max-new-tokens", default="48,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--previous", action="store_true",
                    help="also time the earlier implementations: persona_judge schedule=block, pad with PEFT's "
                         "own LoRA forward (RowAdapterModel.lean_lora = False)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model(args.model, dtype="float32")
    main_be = HFBackend(lm.model, lm.tokenizer)
    runs = {"base": (get_method("base")(), main_be)}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        runs[name] = bench_method(name, lm, main_be)[:2]
        if args.previous and name == "persona_judge":
            runs["persona_judge[block]"] = (get_method(name)(second_preference=BENCH_PREFERENCES[4],
                                                             schedule="block"), main_be)
        if args.previous and name == "pad":
            m, be, _ = bench_method(name, lm, main_be)
            generate(m, [Request(prompt="Hi", preference="Be brief.")], be, max_new_tokens=1)  # registers the views
            for model in be.models.values():
                if hasattr(model, "lean_lora"):
                    model.lean_lora = False
            runs["pad[peft-lora]"] = (m, be)
    counters: dict[int, dict[str, int]] = {}
    for _, be in runs.values():  # one counter per backend (methods may share one)
        if id(be) not in counters:
            counters[id(be)] = count_steps(be)
    reqs = [Request(prompt=BENCH_PROMPTS[0], preference=BENCH_PREFERENCES[0])]
    if args.previous and "pad" in runs:  # the two pad rows compute the same tokens
        a, b = (generate(runs[k][0], reqs, runs[k][1], max_new_tokens=8, ignore_eos=True)[0].token_ids
                for k in ("pad", "pad[peft-lora]"))
        assert a == b, (a, b)
    print(f"model: {args.model}; B=1; greedy; EOS ignored; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"torch threads {torch.get_num_threads()}; load average before: {os.getloadavg()[0]:.2f}")
    print("| method | new tokens | forwards / token | token-rows / token | wall / base | CPU time / base |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.max_new_tokens.split(",")]:
        for m, be in runs.values():  # warm-up
            generate(m, reqs, be, max_new_tokens=4, ignore_eos=True)
        wall = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        per = {}
        for _ in range(args.repeats):
            for k, (m, be) in runs.items():
                c = counters[id(be)]
                f0, r0 = c["forwards"], c["token_rows"]
                t0, c0 = time.perf_counter(), time.process_time()
                generate(m, reqs, be, max_new_tokens=n, ignore_eos=True)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
                per[k] = ((c["forwards"] - f0) / (n - 1), (c["token_rows"] - r0) / (n - 1))
        wb, cb = statistics.median(wall["base"]), statistics.median(cpu["base"])
        for k in runs:
            print(f"| {k} | {n} | {per[k][0]:.2f} | {per[k][1]:.2f} | {statistics.median(wall[k]) / wb:.3f} | "
                  f"{statistics.median(cpu[k]) / cb:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
