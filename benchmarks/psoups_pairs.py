"""P-SOUPS-style preference pairs from SmolLM2 itself, for training the benchmark's PersRM, P-DPO and Drift inputs.

This is how the P-SOUPS data was made (Jang et al. 2023): the policy answers each prompt under every
preference of a dimension; for preference X the answer written under X is *chosen* and the answer
written under the opposite preference of the same dimension (P1A <-> P1B, P2A <-> P2B, P3A <-> P3B)
is *rejected*. The answers come from ``preference_prompting`` (the preference as the system
message), greedy or seeded sampling, on TRAINING prompts that are not the Koala evaluation prompts
(default: the first 40 of HelpSteer_train.json; the CPU quality benchmark used the first 20).

Outputs (TRL layout, read back with ``personalign.eval.datasets.load_pairs``)::

    OUT/pairs.jsonl           every pair  {"prompt","chosen","rejected","preference","user_id","user_text"}
    OUT/pairs_<ID>.jsonl      the pairs of preference ID only (``personalign fit drift`` fits one profile each)
    OUT/answers.json          the raw answers, settings, environment and date

    PYTHONPATH=src OMP_NUM_THREADS=2 nice -n 10 python benchmarks/psoups_pairs.py \\
        --n-prompts 20 --max-new-tokens 48 --batch-size 120 --out runs/psoups
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from personalign.eval.datasets import PreferencePair, load_prompts, write_jsonl

SHARED = Path(os.environ.get("PERSONALIGN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def opposite(pid: str) -> str:
    """The P-SOUPS preference opposite to ``pid`` on the same dimension: ``P1A`` <-> ``P1B``."""
    if len(pid) < 2 or pid[-1] not in "AB":
        raise ValueError(f"a P-SOUPS preference id must end in 'A' or 'B' (e.g. 'P1A'), got {pid!r}.")
    return pid[:-1] + ("B" if pid[-1] == "A" else "A")


def build_pairs(prompts: Sequence[str], answers: Mapping[str, Sequence[str]],
                preferences: Mapping[str, str]) -> list[PreferencePair]:
    """One pair per (preference X, prompt): chosen = the answer under X, rejected = under opposite(X).

    Args:
        prompts: the N training prompts.
        answers: preference id -> the N answers written under it (same order as ``prompts``).
        preferences: preference id -> text; every id and its opposite must have answers.

    Pairs whose two answers are identical carry no preference signal and are dropped.
    Order: preference-major (all prompts of the first preference, then the next).
    """
    out: list[PreferencePair] = []
    for pid, text in preferences.items():
        opp = opposite(pid)
        for k in (pid, opp):
            if k not in answers:
                raise ValueError(f"`answers` lacks preference {k!r} (needed for {pid!r}).")
            if len(answers[k]) != len(prompts):
                raise ValueError(f"`answers[{k!r}]` has {len(answers[k])} answers for {len(prompts)} prompts.")
        for i, q in enumerate(prompts):
            chosen, rejected = answers[pid][i], answers[opp][i]
            if chosen.strip() == rejected.strip():
                continue
            out.append(PreferencePair(prompt=q, chosen=chosen, rejected=rejected, user_id=pid, user_text=text,
                                      preference=text))
    return out


def write_pairs(out_dir: str | Path, pairs: Sequence[PreferencePair]) -> dict[str, int]:
    """``pairs.jsonl`` plus one ``pairs_<ID>.jsonl`` per user id; returns {file name: pairs written}."""
    out_dir = Path(out_dir)
    counts = {"pairs.jsonl": write_jsonl(out_dir / "pairs.jsonl", (p.to_dict() for p in pairs))}
    for uid in dict.fromkeys(p.user_id for p in pairs):
        name = f"pairs_{uid}.jsonl"
        counts[name] = write_jsonl(out_dir / name, (p.to_dict() for p in pairs if p.user_id == uid))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", default=str(SHARED / "data/prompts/HelpSteer_train.json"),
                    help="training prompts (not the Koala evaluation prompts)")
    ap.add_argument("--preferences", default=str(SHARED / "data/prompts/psoups_preferences.json"))
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("runs/psoups"))
    args = ap.parse_args(argv)

    import torch

    from personalign.decoding.loop import generate
    from personalign.decoding.sampling import SamplingConfig
    from personalign.environment import environment_record
    from personalign.methods import get_method
    from personalign.types import Request
    from personalign.views import HFBackend
    from personalign.views.loading import load_model

    if args.n_prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        ap.error("--n-prompts, --max-new-tokens and --batch-size must be >= 1")
    prompts = [r.prompt.strip() for r in load_prompts(args.prompts, limit=args.n_prompts)]
    prefs = json.loads(Path(args.preferences).read_text(encoding="utf-8"))["preferences"]
    for pid in prefs:
        if opposite(pid) not in prefs:
            ap.error(f"preference {pid} has no opposite {opposite(pid)} in {args.preferences}")
    torch.manual_seed(args.seed)
    lm = load_model(args.model)
    backend = HFBackend(lm.model, lm.tokenizer)
    method = get_method("preference_prompting")()
    sampling = SamplingConfig(temperature=args.temperature)
    work = [(pid, i) for pid in prefs for i in range(len(prompts))]
    answers: dict[str, list[str]] = {pid: [""] * len(prompts) for pid in prefs}
    t0 = time.time()
    for s in range(0, len(work), args.batch_size):
        chunk = work[s : s + args.batch_size]
        reqs = [Request(prompt=prompts[i], preference=prefs[pid], seed=args.seed * 100003 + n + s)
                for n, (pid, i) in enumerate(chunk)]
        outs = generate(method, reqs, backend, max_new_tokens=args.max_new_tokens, sampling=sampling)
        for (pid, i), o in zip(chunk, outs):
            answers[pid][i] = o.text.strip()
        print(f"[{time.time() - t0:6.0f}s] {s + len(chunk)}/{len(work)} answers", file=sys.stderr, flush=True)
    pairs = build_pairs(prompts, answers, prefs)
    counts = write_pairs(args.out, pairs)
    (args.out / "answers.json").write_text(json.dumps({
        "config": {k: str(v) for k, v in vars(args).items()}, "environment": environment_record(lm.model),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(time.time() - t0, 1),
        "prompts": prompts, "preferences": prefs, "answers": answers, "counts": counts,
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
