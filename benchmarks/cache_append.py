"""KV cache: in-place appends (the engine's GrowingLayer) vs transformers' concatenating DynamicLayer.

The same decode of PAD and Drift (untrained parts, as in `personalign bench`), interleaved
`--repeats` times each way in one process; prints ms per token and checks both ways emit the same
tokens (after one warm-up decode per method).

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/cache_append.py --max-new-tokens 96 --repeats 4
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import DynamicCache

import personalign.views.hf as hf
from personalign.decoding.loop import generate
from personalign.eval.bench import BENCH_PREFERENCES, BENCH_PROMPTS, bench_method
from personalign.types import Request
from personalign.views.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="pad,drift")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    m = load_model(args.model)
    reqs = [Request(prompt=BENCH_PROMPTS[0], preference=BENCH_PREFERENCES[0])]
    runs = {name: bench_method(name, m, hf.HFBackend(m.model, m.tokenizer))[:2] for name in args.methods.split(",")}
    ways = {"growing (engine)": hf._new_cache, "dynamic (cat)": lambda model: DynamicCache(config=model.config)}
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    for method, backend in runs.values():  # warm-up (first-call costs, e.g. PAD's preference weights)
        generate(method, reqs, backend, max_new_tokens=4, ignore_eos=True)
    try:
        for _ in range(args.repeats):
            for name, (method, backend) in runs.items():
                for way, fn in ways.items():
                    hf._new_cache = fn
                    t = time.perf_counter()
                    out = generate(method, reqs, backend, max_new_tokens=args.max_new_tokens, ignore_eos=True)
                    times.setdefault((name, way), []).append((time.perf_counter() - t) / args.max_new_tokens * 1000)
                    tokens[(name, way)] = out[0].token_ids
    finally:
        hf._new_cache = ways["growing (engine)"]
    print("| method | cache | ms/token (median) | runs | same tokens |")
    print("|---|---|---|---|---|")
    for (name, way), ts in times.items():
        same = tokens[(name, way)] == tokens[(name, "growing (engine)")]
        print(f"| {name} | {way} | {statistics.median(ts):.2f} | {', '.join(f'{t:.1f}' for t in ts)} | {same} |")


if __name__ == "__main__":
    main()
