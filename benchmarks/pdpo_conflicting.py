"""The P-RLHF controlled conflicting-preference experiment (paper Section 5.1, App. C.3, Table 4) on real text.

Data: Anthropic HH pairs from ``../shared/data/dsp/{helpful,harmless}.test.json``; the prompt is the
dialogue up to the last ``Assistant:`` turn, the two responses are the two final assistant turns.
Only pairs whose two responses differ clearly in length are kept (longer >= 1.5 x shorter and >= 8
tokens longer, both <= 80 tokens), so "longer" and "shorter" are well defined. The human labels are
replaced by simulated users, as in the paper: 10 seen users (ids 1..10), users 4, 5, 6 prefer the
shorter response (minority) and the other 7 the longer one (majority); 10 unseen users (11..20, again
7 majority / 3 minority) annotate held-out pairs for accuracy-generic.

Models: vanilla DPO (empty uniform user model, alpha = 1), P-DPO individual and P-DPO cluster (K = 5),
both with T_u = 10 and alpha = 0.5 as in the paper, beta = 0.5, on stories260k (LoRA + user model).
Metrics: accuracy-top, accuracy-generic, per-user accuracy averaged over the majority and minority
groups (mean +- standard error); and, for minority vs majority users on held-out prompts decoded
through the ``pdpo`` method with all users in one batch (sampled at temperature 1, a seed per row),
the mean generated length (tokens, end token included), the share of generations that ended, and
the mean log-probability of the end token over the generated positions (the quantity that sets the
length). The end token is BOS: llama2.c story models end every text with BOS (they never saw EOS),
so responses are trained to end with it (``end_token_id``) and generation stops at it.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/pdpo_conflicting.py --out runs/pdpo_conflicting
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
from personalign.decoding.sampling import SamplingConfig
from personalign.methods.pdpo import PDPOMethod
from personalign.training.pdpo.data import PreferencePair
from personalign.training.pdpo.model import pack_rows
from personalign.training.pdpo.train import PDPOTrainConfig, train_pdpo
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.loading import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSONALIGN_SHARED", REPO.parent / "shared"))
MINORITY_SEEN = {"4", "5", "6"}
MINORITY_UNSEEN = {"18", "19", "20"}


def hh_length_pairs(tokenizer, max_response_tokens: int = 80) -> list[tuple[str, str, str]]:
    """(prompt, longer, shorter) triples from the HH test pairs, in file order."""
    out = []
    for name in ("helpful", "harmless"):
        for rec in json.loads((SHARED / "data" / "dsp" / f"{name}.test.json").read_text()):
            a, b = rec["text"]
            ia, ib = a.rfind("\n\nAssistant:"), b.rfind("\n\nAssistant:")
            if ia < 0 or a[:ia] != b[:ib]:
                continue
            prompt = a[: ia + len("\n\nAssistant:")].strip()
            ra, rb = a[ia + 12:].strip(), b[ib + 12:].strip()
            if not ra or not rb:
                continue
            la, lb = (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in (ra, rb))
            (ls, short), (ll, long) = sorted([(la, ra), (lb, rb)], key=lambda t: t[0])
            if ll <= max_response_tokens and ll >= 1.5 * ls and ll - ls >= 8:
                out.append((prompt, long, short))
    return out


def simulate(triples, users: list[str], minority: set[str], group: bool) -> list[PreferencePair]:
    pairs = []
    for i, (prompt, long, short) in enumerate(triples):
        u = users[i % len(users)]
        chosen, rejected = (short, long) if u in minority else (long, short)
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, user_id=u,
                                    group=("minority" if u in minority else "majority") if group else None))
    return pairs


@torch.no_grad()
def end_logprob(method: PDPOMethod, backend: HFBackend, reqs: list[Request], outs: list) -> list[float]:
    """Mean log-prob of the end token over each sampled continuation, under its user's soft prompt."""
    model, tok = backend.models["main"], backend.tokenizer()
    res = []
    for r, o in zip(reqs, outs):
        row = method.index.row(r.user, strict=False)
        prefix = method.user_prefix(row, (), backend)
        ids = list(tok(r.prompt)["input_ids"]) + list(o.token_ids)
        end = tok.bos_token_id  # the end token the responses were trained with
        embeds, mask, pos = pack_rows(model.get_input_embeddings(), [prefix], [ids])
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                       logits_to_keep=len(o.token_ids) + 1).logits[0, :-1]
        res.append(float(torch.log_softmax(logits.float(), -1)[:, end].mean()))
    return res


def generation_stats(ckpt: Path, prompts: list[str], seen: list[str], max_new_tokens: int) -> dict[str, dict[str, float]]:
    """Mean generated length and mean end-token log-prob per group; every (user, prompt) in one batch via ``pdpo``."""
    lm = load_model(str(SHARED / "models" / "stories260k"), dtype="float32")
    lm.name = "stories260k"
    resources = Resources(model=lm, pdpo_checkpoint=str(ckpt))
    backend = build_backend(resources, ["pdpo"])
    method = build_method("pdpo", {}, backend, resources)
    # sampled at temperature 1 (each row its own seed): greedy decoding of a 260K-parameter model
    # loops and never ends, so it would hide the end-of-response probability the users disagree on
    reqs = [Request(prompt=p, user=u, seed=1000 * int(u) + j) for u in seen for j, p in enumerate(prompts)]
    outs = generate(method, reqs, backend, max_new_tokens=max_new_tokens, chat_template=False,
                    sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(0))
    ends = end_logprob(method, backend, reqs, outs)
    stats: dict[str, dict[str, float]] = {}
    for g in ("majority", "minority"):
        rows = [i for i, r in enumerate(reqs) if (r.user in MINORITY_SEEN) == (g == "minority")]
        stats[g] = {"mean_tokens": sum(len(outs[i].token_ids) for i in rows) / len(rows),
                    "ended": sum(outs[i].finish_reason == "stop" for i in rows) / len(rows),
                    "mean_end_logprob": sum(ends[i] for i in rows) / len(rows)}
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for pairs, checkpoints and results.json")
    ap.add_argument("--train-per-user", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--user-lr", type=float, default=3e-2)
    ap.add_argument("--gen-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--models", default="dpo,individual,cluster")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --out (no training)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(str(SHARED / "models" / "stories260k"), dtype="float32")
    triples = hh_length_pairs(lm.tokenizer)
    random.Random(0).shuffle(triples)
    seen = [str(i) for i in range(1, 11)]
    unseen = [str(i) for i in range(11, 21)]
    n_train = args.train_per_user * len(seen)
    held = triples[n_train:]
    n_eval_seen = len(held) // 2
    train = simulate(triples[:n_train], seen, MINORITY_SEEN, group=True)
    eval_seen = simulate(held[:n_eval_seen], seen, MINORITY_SEEN, group=True)
    eval_unseen = simulate(held[n_eval_seen:], unseen, MINORITY_UNSEEN, group=False)
    # held-out prompts short enough to need no truncation (training kept the last 64 prompt tokens)
    gen_prompts = [t[0] for t in held if len(lm.tokenizer(t[0])["input_ids"]) <= 64][: args.gen_prompts]
    print(f"pairs: {len(triples)} usable; train {len(train)}, eval seen {len(eval_seen)}, unseen {len(eval_unseen)}",
          file=sys.stderr)
    common = dict(beta=0.5, learning_rate=args.lr, user_learning_rate=args.user_lr, epochs=args.epochs,
                  batch_size=8, warmup_steps=10, max_prompt_tokens=64, max_response_tokens=81,
                  chat_template=False, lora_r=8, lora_alpha=16.0, lora_dropout=0.05, seed=0,
                  end_token_id=lm.tokenizer.bos_token_id)  # llama2.c story models end a text with BOS
    configs = {
        "dpo": ("Vanilla DPO", PDPOTrainConfig(user_model="uniform", user_tokens=0, alpha=1.0, **common)),
        "individual": ("P-DPO Individual", PDPOTrainConfig(user_model="individual", user_tokens=10, alpha=0.5,
                                                           **common)),
        "cluster": ("P-DPO Cluster K=5", PDPOTrainConfig(user_model="cluster", clusters=5, user_tokens=10,
                                                         alpha=0.5, **common)),
    }
    results = {}
    for key in args.models.split(","):
        label, cfg = configs[key]
        t0 = time.time()
        done = out / key / "metrics.jsonl"
        if args.reuse and done.is_file():  # evaluate the checkpoint of an earlier run again
            m = json.loads(done.read_text().splitlines()[-1])
        else:
            base = load_model(str(SHARED / "models" / "stories260k"), dtype="float32")
            base.name = "stories260k"
            m = train_pdpo(base, train, cfg, eval_pairs=eval_seen + eval_unseen, out=out / key,
                           progress=False).final_metrics
        gen = generation_stats(out / key, gen_prompts, seen, args.max_new_tokens)
        results[key] = {"label": label, "seconds": round(time.time() - t0, 1), "metrics": m, "generation": gen}
        print(f"{label}: {json.dumps(results[key])}", file=sys.stderr)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("| Model | Accuracy-top | Accuracy-generic | Accuracy-average Majority | Accuracy-average Minority |")
    print("|---|---|---|---|---|")
    for r in results.values():
        m = r["metrics"]
        print(f"| {r['label']} | {100 * m['accuracy_top']:.2f} | {100 * m['accuracy_generic']:.2f} "
              f"| {100 * m['accuracy_avg/majority']:.2f} ± {100 * m['accuracy_se/majority']:.2f} "
              f"| {100 * m['accuracy_avg/minority']:.2f} ± {100 * m['accuracy_se/minority']:.2f} |")
    print()
    print("| Model | Users | Mean generated tokens | Ended (end token) | Mean log p(end) per position |")
    print("|---|---|---|---|---|")
    for r in results.values():
        for g in ("majority", "minority"):
            x = r["generation"][g]
            print(f"| {r['label']} | {g} | {x['mean_tokens']:.1f} | {100 * x['ended']:.0f}% "
                  f"| {x['mean_end_logprob']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
