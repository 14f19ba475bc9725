"""Persona-judge speed anatomy: acceptance, model forwards and token-rows per emitted token, by λ and
schedule (``lockstep``: one batched forward of every view per token; ``block``: Algorithm 1 literally).

Greedy, EOS ignored, the bench prompts and preferences of ``personalign bench`` (request b has
preference ``BENCH_PREFERENCES[b]``; the second preference is ``BENCH_PREFERENCES[4]``, as in the
bench's ``bench_method``). Forwards and token-rows (tokens fed × rows, over all forwards after the
prefill) are deterministic; time is the median of ``--repeats`` interleaved runs per row after a
warm-up, relative to ``base`` through the same loop and backend in the same process
(``personalign bench`` gives the ratio to ``model.generate``).

    python benchmarks/persona_judge_speed.py --max-new-tokens 48 --draft-tokens 1,2,4,6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from personalign.decoding.loop import generate
from personalign.eval.bench import BENCH_PREFERENCES, BENCH_PROMPTS
from personalign.methods import get_method
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.loading import load_model


class CountingBackend(HFBackend):
    """HFBackend that also counts the forwards of its steps (not the prefill) and the token-rows they
    feed (real tokens × views, ragged rows exact)."""

    step_forwards = 0
    token_rows = 0

    def step(self, state, tokens, lengths=None, views=None):  # noqa: D102
        B, L = tokens.shape[0], tokens.shape[-1]
        n = torch.full((B,), L) if lengths is None else lengths.long().cpu()
        sel = range(state.num_views) if views is None else views
        self.token_rows += int(n.sum()) * len(list(sel))
        f0 = self.forward_count
        out = super().step(state, tokens, lengths, views)
        self.step_forwards += self.forward_count - f0
        return out


def timed(method, requests, backend, n):
    f0, r0 = backend.step_forwards, backend.token_rows
    t0 = time.perf_counter()
    outs = generate(method, requests, backend, max_new_tokens=n, ignore_eos=True)
    return time.perf_counter() - t0, backend.step_forwards - f0, backend.token_rows - r0, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--draft-tokens", default="1,2,4,6")
    ap.add_argument("--schedules", default="lockstep,block")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model(args.model, dtype="float32")
    be = CountingBackend(lm.model, lm.tokenizer)
    B, n = args.batch_size, args.max_new_tokens
    reqs = [Request(prompt=BENCH_PROMPTS[i % len(BENCH_PROMPTS)], preference=BENCH_PREFERENCES[i % 6])
            for i in range(B)]
    runs = {"base": get_method("base")()}
    for lam in [int(x) for x in args.draft_tokens.split(",")]:
        for alt in (True, False):
            for sched in args.schedules.split(","):
                runs[(lam, alt, sched)] = get_method("persona_judge")(
                    second_preference=BENCH_PREFERENCES[4], draft_tokens=lam, alternate=alt, schedule=sched)
    for m in runs.values():  # warm-up
        timed(m, reqs, be, 8)
    times: dict = {k: [] for k in runs}
    last: dict = {}
    for _ in range(args.repeats):
        for k, m in runs.items():
            t, f, rows, outs = timed(m, reqs, be, n)
            times[k].append(t)
            last[k] = (f, rows, outs)
    t_base = statistics.median(times["base"])
    print(f"model: {args.model}; B={B}; {n} new tokens; greedy; base: {1000 * t_base / n:.1f} ms/token; "
          f"median of {args.repeats}. Forwards and token-rows are per emitted token after a row's first "
          f"(which comes from the prefill), i.e. divided by {n - 1} (token-rows also by B).")
    print("| method | λ | roles | schedule | acceptance | tokens / round | forwards / token | token-rows / token | "
          "time / base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in runs:
        f, rows, outs = last[k]
        per = f"{f / (n - 1):.2f} | {rows / (B * (n - 1)):.2f} | {statistics.median(times[k]) / t_base:.2f} |"
        if k == "base":
            print(f"| base | | | | | | {per}")
            continue
        lam, alt, sched = k
        acc = statistics.mean(o.stats["acceptance_rate"] for o in outs)
        tpr = statistics.mean(o.stats["emitted"] / o.stats["rounds"] for o in outs)
        print(f"| persona_judge | {lam} | {'alternating' if alt else 'fixed'} | {sched} | {acc:.3f} | {tpr:.2f} | "
              f"{per}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
