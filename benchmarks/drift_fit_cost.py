"""What a Drift fit costs (``personalign fit drift``): seconds and scored tokens per pair, per pair and
attribute, at several response lengths, with the default attribute pool, on DSP pairs.

Pairs: the first ``--pairs`` queries of ``../shared/data/dsp/domain_specific_preference.json``, the
``academy`` answer chosen over the ``business`` one (responses of 120–200 words). Each setting fits
the same pairs with ``fit_profile`` (one batched forward of ``2 (A + 1)`` sequences per pair, A = 48
attributes), after one warm-up pair. The projection for 50 pairs is 50 × the per-pair time.

    OMP_NUM_THREADS=2 python benchmarks/drift_fit_cost.py --pairs 3 --lengths full,128,64,32

``--accuracy`` measures what a shorter scored length costs in accuracy instead: for each length, a
profile fitted on the first ``--fit-pairs`` DSP queries (the ``academy`` answer chosen over another
domain's, the four others in turn; the default pool, top 7) and its preference accuracy on
``--heldout`` pairs built the same way from the last queries, scored at the profile's own length.

    OMP_NUM_THREADS=2 python benchmarks/drift_fit_cost.py --accuracy --fit-pairs 50 --heldout 40 --lengths full,64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from personalign.personas.attributes import default_pool
from personalign.personas.drift import fit_profile, score_rows
from personalign.records import PreferencePair
from personalign.views import HFBackend, load_model

SHARED = Path(os.environ.get("PERSONALIGN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--lengths", default="full,128,64,32", help="scored response tokens; full = the whole response")
    ap.add_argument("--accuracy", action="store_true", help="fit and evaluate instead of timing")
    ap.add_argument("--fit-pairs", type=int, default=50)
    ap.add_argument("--heldout", type=int, default=40)
    a = ap.parse_args()
    if a.accuracy:
        return accuracy(a)
    rows = json.loads((SHARED / "data" / "dsp" / "domain_specific_preference.json").read_text())[: a.pairs + 1]
    pairs = [PreferencePair(prompt=r["query"], chosen=r["responses"]["academy"], rejected=r["responses"]["business"])
             for r in rows]
    lm = load_model(a.model, dtype="float32")
    backend = HFBackend(lm.model, lm.tokenizer)
    pool = default_pool()
    A = len(pool)
    print(f"model {a.model}, {A} attributes, {a.pairs} DSP pairs per setting, torch threads "
          f"{__import__('torch').get_num_threads()}\n")
    print("| response tokens scored | forwards per pair | sequences per pair | tokens per pair | s per pair | "
          "ms per pair and attribute | 50 pairs (min, projected) |")
    print("|---|---|---|---|---|---|---|")
    for spec in a.lengths.split(","):
        n = None if spec == "full" else int(spec)
        fit_profile(backend, pairs[:1], pool, top_m=7, max_response_tokens=n)  # warm-up
        toks = sum(len(p) + len(c) for pair in pairs[1:] for p, c in
                   score_rows(lm.tokenizer, pair.prompt, [pair.chosen, pair.rejected], pool, max_response_tokens=n))
        t0, f0 = time.perf_counter(), backend.forward_count
        fit_profile(backend, pairs[1:], pool, top_m=7, max_response_tokens=n)
        dt = (time.perf_counter() - t0) / a.pairs
        print(f"| {spec} | {(backend.forward_count - f0) / a.pairs:g} | {2 * (A + 1)} | {toks / a.pairs:.0f} | "
              f"{dt:.1f} | {1000 * dt / A:.0f} | {50 * dt / 60:.1f} |", flush=True)
    return 0


def _dsp_pairs(rows: list[dict]) -> list[PreferencePair]:
    others = ["business", "entertainment", "literature", "normal"]
    return [PreferencePair(prompt=r["query"], chosen=r["responses"]["academy"], rejected=r["responses"][others[i % 4]])
            for i, r in enumerate(rows)]


def accuracy(a: argparse.Namespace) -> int:
    rows = json.loads((SHARED / "data" / "dsp" / "domain_specific_preference.json").read_text())
    train, held = _dsp_pairs(rows[: a.fit_pairs]), _dsp_pairs(rows[-a.heldout:])
    lm = load_model(a.model, dtype="float32")
    backend = HFBackend(lm.model, lm.tokenizer)
    print(f"model {a.model}, {len(default_pool())} attributes, top 7; {len(train)} DSP pairs fitted (academy over "
          f"the others), {len(held)} held-out pairs\n")
    print("| response tokens scored | fit (min) | train accuracy | held-out accuracy | selected attributes |")
    print("|---|---|---|---|---|")
    for spec in a.lengths.split(","):
        n = None if spec == "full" else int(spec)
        t0 = time.perf_counter()
        prof = fit_profile(backend, train, default_pool(), top_m=7, max_response_tokens=n, progress=True)
        fit_min = (time.perf_counter() - t0) / 60
        acc = prof.evaluate(backend, held)
        sel = ", ".join(f"{name} {w:+.2f}" for name, _, w in prof.selected())
        print(f"| {spec} | {fit_min:.1f} | {prof.stats['train_accuracy']:.3f} | {acc:.3f} | {sel} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
