"""PAD on real preference data: the DSP domains (Cheng et al. 2023) as four users.

Data: ``../shared/data/dsp/domain_specific_preference.json`` — 500 queries, each answered in five
styles (academy, business, entertainment, literature, normal). Each of the four domains is a
preference, described by a sentence (``PREFERENCES``). A pair is (query, chosen = the domain's
answer, rejected = one of the other four answers, drawn at random).

1. Split the queries 80/20 (seed 0). ``--unseen`` (default: literature) is left out of training
   entirely: its pairs appear only in the held-out set, described only by its preference text.
2. Train the PersRM (``personalign.training.persrm``, the same code as ``personalign train pad``):
   stage 1 (LoRA, w_p = 1) and stage 2 (value head). Held-out preference accuracy per domain.
3. A per-domain scorer trained on the training split: TF-IDF (word 1-2 grams) + multinomial
   logistic regression over the five response styles, on each response cut to its first
   ``--scorer-words`` words (the length of our generations). score_d(text) = P(style = d | text).
4. Generation for held-out queries, greedy, ``--max-new-tokens``: base vs preference prompting vs
   PAD (Eq. 13) vs PAD (released rule), each response scored by the domain's scorer.

Prints Markdown tables and writes every number and generation to ``--out`` (JSON).
Example: ``nice -n 10 python benchmarks/pad_dsp.py --model ../shared/models/stories260k``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from personalign.assembly import Resources, build_backend, build_method
from personalign.decoding.loop import generate
from personalign.environment import environment_record
from personalign.methods import get_method
from personalign.records import PreferencePair
from personalign.training.persrm import PersRM
from personalign.training.persrm.train import PersRMTrainConfig, kept_stage2, train_persrm
from personalign.types import Request
from personalign.views.loading import LoadedModel, load_model

DOMAINS = ["academy", "business", "entertainment", "literature"]
STYLES = DOMAINS + ["normal"]
PREFERENCES = {
    "academy": "Answer like a scholar: rigorous, technical and precise, with academic vocabulary.",
    "business": "Answer like a business professional: practical, focused on value, customers, costs and strategy.",
    "entertainment": "Answer in an entertaining way: casual, playful and fun, like a show host talking to fans.",
    "literature": "Answer in a literary style: poetic, vivid and imaginative, like a novelist or a poet.",
}
_REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSONALIGN_SHARED") or next(
    (str(p) for p in (_REPO.parent / "shared", _REPO.parents[1] / "shared") if p.is_dir()), _REPO.parent / "shared"))
DEFAULT_DATA = SHARED / "data" / "dsp" / "domain_specific_preference.json"


def make_pairs(rows: list[dict], domains: list[str], rng: random.Random) -> list[PreferencePair]:
    out = []
    for r in rows:
        for d in domains:
            other = rng.choice([s for s in STYLES if s != d])
            out.append(PreferencePair(prompt=r["query"], chosen=r["responses"][d], rejected=r["responses"][other],
                                      preference=PREFERENCES[d]))
    return out


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def train_scorer(rows: list[dict], words: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    X = [first_words(r["responses"][s], words) for r in rows for s in STYLES]
    y = [s for _ in rows for s in STYLES]
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                        LogisticRegression(max_iter=2000, C=4.0))
    return clf.fit(X, y)


def domain_probs(clf, texts: list[str]) -> list[dict[str, float]]:
    probs = clf.predict_proba(texts)
    return [dict(zip(clf.classes_, map(float, p))) for p in probs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_DATA.parents[2] / "models" / "stories260k"))
    ap.add_argument("--gguf-file")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--unseen", default="literature", choices=DOMAINS)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--train-queries", type=int, default=0, help="cap on training queries (0 = all)")
    ap.add_argument("--eval-queries", type=int, default=0, help="cap on held-out queries for accuracy (0 = all)")
    ap.add_argument("--gen-queries", type=int, default=20, help="held-out queries for the generation table")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--head-select", default="best", choices=["best", "last"],
                    help="stage-2 head kept: lowest held-out loss (epoch 0 = before stage 2 included) or the last")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--max-response-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--scorer-words", type=int, default=30)
    ap.add_argument("--beta", type=float, default=1.0, help="β of PAD decoding")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/pad_dsp/results.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    rows = json.loads(Path(args.data).read_text())
    rng = random.Random(args.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_held = int(round(args.heldout_fraction * len(rows)))
    held_rows = [rows[i] for i in order[:n_held]]
    train_rows = [rows[i] for i in order[n_held:]]
    train_domains = [d for d in DOMAINS if d != args.unseen]
    tr = train_rows[: args.train_queries or None]
    ev = held_rows[: args.eval_queries or None]
    train_pairs = make_pairs(tr, train_domains, rng)
    eval_pairs = make_pairs(ev, DOMAINS, rng)
    print(f"{len(train_pairs)} training pairs ({len(tr)} queries x {train_domains}); "
          f"{len(eval_pairs)} held-out pairs ({len(ev)} queries x {DOMAINS}); unseen: {args.unseen}", file=sys.stderr)

    lm = load_model(args.model, gguf_file=args.gguf_file, dtype="float32")
    rm = PersRM.create(lm.model, lm.tokenizer, name=args.model, gguf_file=lm.gguf_file, lora_r=args.lora_r)
    cfg = PersRMTrainConfig(epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, lr=args.lr,
                            head_lr=args.head_lr, head_select=args.head_select, max_prompt_tokens=args.max_prompt_tokens,
                            max_response_tokens=args.max_response_tokens, seed=args.seed)
    hist = train_persrm(rm, train_pairs, eval_pairs, cfg, out_dir=str(Path(args.out).parent / "persrm"),
                        progress=False, log=lambda s: print(s, file=sys.stderr, flush=True))
    t_train = time.time() - t0

    by_pref = {v: k for k, v in PREFERENCES.items()}
    acc_rows = []
    for stage in ("stage1", "stage2"):
        if not hist[stage]:
            continue
        kept = kept_stage2(hist) if stage == "stage2" else hist[stage][-1]  # stage 2: the head PAD decodes with
        acc_rows.append((stage, {by_pref[p]: v["accuracy"] for p, v in kept["per_preference"].items()}, kept["accuracy"]))

    # ---- scorer on the training split
    clf = train_scorer(train_rows, args.scorer_words)
    held_texts = [first_words(r["responses"][s], args.scorer_words) for r in held_rows for s in STYLES]
    held_y = [s for _ in held_rows for s in STYLES]
    scorer_acc = float((clf.predict(held_texts) == __import__("numpy").array(held_y)).mean())

    # ---- generation on held-out queries
    res = Resources(model=LoadedModel(model=rm.base_lm, tokenizer=lm.tokenizer, name=lm.name), persrm=rm)
    backend = build_backend(res, ["base", "preference_prompting", "pad"])  # PAD's views attached once
    gen_rows = held_rows[: args.gen_queries]
    methods = {
        "base": get_method("base")(),
        "preference_prompting": get_method("preference_prompting")(),
        "pad (eq13)": build_method("pad", {"k": args.k, "beta": args.beta}, backend, res),
        "pad (released)": build_method("pad", {"k": args.k, "beta": args.beta, "mode": "released"}, backend, res),
    }
    gens: dict[str, dict[str, list[str]]] = {}
    for name, method in methods.items():
        gens[name] = {}
        for d in DOMAINS:
            if name == "base" and gens[name]:
                gens[name][d] = next(iter(gens[name].values()))  # base ignores the preference
                continue
            reqs = [Request(prompt=r["query"], preference=PREFERENCES[d]) for r in gen_rows]
            outs = []
            for s in range(0, len(reqs), 10):
                outs += generate(method, reqs[s: s + 10], backend, max_new_tokens=args.max_new_tokens)
            gens[name][d] = [o.text for o in outs]
        print(f"generated {name} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    gen_table = {}
    for name, per in gens.items():
        gen_table[name] = {}
        for d, texts in per.items():
            ps = domain_probs(clf, [first_words(t, args.scorer_words) or "." for t in texts])
            gen_table[name][d] = {"p_domain": sum(p[d] for p in ps) / len(ps),
                                  "top1": sum(max(p, key=p.get) == d for p in ps) / len(ps)}
    elapsed = time.time() - t0

    # ---- report
    print(f"\nmodel: {args.model}; train {t_train:.0f} s, total {elapsed:.0f} s; unseen domain: {args.unseen}\n")
    print("| PersRM | " + " | ".join(f"{d}{' (unseen)' if d == args.unseen else ''}" for d in DOMAINS) + " | all |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for stage, per, allacc in acc_rows:
        name = "stage 1 (w_p = 1)" if stage == "stage1" else f"stage 2 (w_p = head(p)), kept epoch {hist.get('stage2_selected')}"
        print(f"| {name} | " + " | ".join(f"{per.get(d, float('nan')):.3f}" for d in DOMAINS) + f" | {allacc:.3f} |")
    print(f"\nscorer (TF-IDF + logistic regression, 5 styles, first {args.scorer_words} words): "
          f"held-out accuracy {scorer_acc:.3f}\n")
    print("| method | " + " | ".join(DOMAINS) + " | mean |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for name, per in gen_table.items():
        vals = [per[d]["p_domain"] for d in DOMAINS]
        cells = [f"{per[d]['p_domain']:.3f} ({per[d]['top1']:.2f})" for d in DOMAINS]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(vals) / len(vals):.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "history": hist, "scorer_accuracy": scorer_acc,
                               "generation": gen_table, "texts": gens, "seconds": elapsed,
                               "environment": environment_record(rm.base_lm)}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
