"""Simulated users: does each learner move a user's answers toward what they keep choosing, and how fast?

Each simulated user has a *hidden* preference that a programmatic judge measures (``_judges``): a
reply's word count (``concise``), its Flesch-Kincaid grade (``elementary``), its VADER sentiment
(``friendly``), a trade-off of two metrics (``upbeat_brief``: sentiment minus words / 50), two users
whose preference no attribute of the Drift pool names (``listy``: list items; ``second_person``: the
share of words addressing the reader, "you" and "your"), and a ``random`` control whose choices are
coin flips. They talk to a **live** ``personalign serve`` (a subprocess on 127.0.0.1) through the
official ``openai`` client, and no learner is told the answer:

* ``drift``: the user's Drift profile over the **server's default pool** (whatever ``serve`` gives a
  new user; its size and seed are recorded in ``results.md``). ``drift_oracle`` (off by default,
  ``"oracle_pool": true``) gives the user a pool picked by hand to match the judges: it is labelled
  "oracle pool" wherever it appears and is never a learner's result;
* ``pdpo``: the user's own P-DPO embedding, fitted from their choices (a checkpoint trained once on
  DSP pairs, the four domains as users; the simulated users are not among them);
* ``drift_explore`` (not in the default run): ``drift`` whose two alternatives are the estimate and a
  draw of it (``alternatives: explore``), against two samples of one estimate;
* ``incontext_examples``, ``incontext_hypothesis``, ``incontext_both``: the ``incontext`` learner
  (``learners.incontext``) in each form, decoding with ``preference_prompting`` from what it learned.

Round after round: a training prompt (koala_eval_50), a request with ``n = 2`` sampled choices decoded
by the learner, the user's choice by its hidden judge, ``POST /v1/feedback`` with ``completion_id`` and
``chosen_index`` (folded before the next round). At each of ``evals`` (0, 2, 4, 8 and 16 choices)
the learner's greedy replies to the **held-out** prompts (the first of
``personal_preference_eval_preference_data.json``, a different source: none is used for training)
are scored on the hidden metric. References, once: ``base`` (knows nothing) and
``preference_prompting`` given the hidden preference in words (what stating it would give). Before a
user's first choice Drift and the in-context learner have nothing to go on: their alternatives and
0-choice replies are ``base``'s.

Statistics are paired per held-out prompt: for each prompt, the learner's metric (the mean over seeds)
minus base's on the same prompt, and minus the stated preference's, oriented so that positive is
better for the user; the mean over prompts with a 95 % bootstrap interval (``scipy.stats.bootstrap``,
10,000 resamples). For the random control the raw difference in words, which should stay near 0.

Outputs under ``--out``: ``state.json`` (every reply; a rerun resumes where it stopped: rounds whose
feedback is stored are not redone), ``server.db`` and ``server.log``, the P-DPO checkpoint,
``results.md`` (the tables) and ``curves.png`` (metric vs choices).

Run: ``OMP_NUM_THREADS=2 python benchmarks/simulate.py --out runs/simulate`` (the default config,
``DEFAULT``; ``--config FILE.json`` overrides any of its keys; ``--quick`` is a 2-round smoke run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from personalign.environment import cpu_name
from personalign.eval.style_metrics import words_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

DEFAULT: dict[str, Any] = {
    "model": "smollm2",
    "users": ["concise", "elementary", "friendly", "upbeat_brief", "listy", "second_person", "random"],
    "learners": ["drift", "pdpo", "incontext_examples", "incontext_hypothesis", "incontext_both"],
    "oracle_pool": False,  # also run `drift_oracle`: a hand-picked pool matching the judges (labelled so)
    "rounds": 16,  # choices per user
    "evals": [0, 2, 4, 8, 16],  # choices after which the held-out prompts are answered
    "seeds": [0, 1, 2],
    "train_prompts": 16,  # cycled through the rounds (koala_eval_50, the first ones)
    "heldout_prompts": 30,  # the first of personal_preference_eval_preference_data.json
    "max_tokens": 48,
    "temperature": 1.0,  # the n = 2 alternatives
    "top_p": 0.95,
    "min_words": 3,  # a reply shorter than this is never kept over one that is not (see `choose`)
    "pdpo_train": {"pairs": 200, "max_steps": 10, "batch_size": 4, "lr": 1e-4, "max_response_tokens": 96},
    "fit_steps": 3,
    "fit_pairs": 4,
    "fold_share": 1.0,  # the server's --fold-share: folds may take as long as the decoding beside them
    "serve_flags": [],  # extra `personalign serve` flags (none: the server's defaults)
}

# the hand-picked pool of `drift_oracle`: chosen to match the judges, so never a learner's result
ORACLE_POOL = ["concise", "detailed", "easy_words", "academic", "humorous", "optimistic"]

# learner -> (the profile it gets, the method its replies decode with)
LEARNERS: dict[str, tuple[dict[str, Any], str]] = {
    "drift": ({"method": "drift", "learner": "drift"}, "drift"),
    # Drift whose two alternatives are the estimate and a draw of it (``alternatives: explore``)
    "drift_explore": ({"method": "drift", "learner": "drift"}, "drift"),
    "drift_oracle": ({"method": "drift", "learner": "drift"}, "drift"),  # + the oracle pool (``create_profile``)
    "pdpo": ({"method": "pdpo", "learner": "pdpo"}, "pdpo"),
    **{f"incontext_{form}": ({"method": "preference_prompting", "learner": "incontext",
                              "learner_params": {"form": form}}, "preference_prompting")
       for form in ("examples", "hypothesis", "both")},
}
NOTHING_AT_FIRST = ("drift", "drift_explore", "drift_oracle", "incontext_examples", "incontext_hypothesis", "incontext_both")

PREFERENCES = {  # the hidden preference in words, for the reference (P-SOUPS profiles; seed 001 Table 7)
    "concise": "Generate a response that is concise and to the point, without being verbose.",
    "elementary": "Generate a response that can be easily understood by an elementary school student.",
    "friendly": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "upbeat_brief": "Generate a response that is cheerful and positive, and keep it short.",
    "listy": "Generate a response organized as a list of short points.",
    "second_person": "Generate a response that speaks directly to the reader, addressing them as \"you\".",
    "random": None,
}


def _judges() -> dict[str, tuple[str, Any, int]]:
    from personalign.eval.style_metrics import fk_grade, sentiment

    return {  # name -> (the metric reported, the metric, its direction: +1 the user prefers it higher)
        "concise": ("words", lambda t: len(words_of(t)), -1),
        "elementary": ("fk_grade", fk_grade, -1),
        "friendly": ("sentiment", sentiment, +1),
        "upbeat_brief": ("sentiment - words/50", lambda t: sentiment(t) - len(words_of(t)) / 50, +1),
        "listy": ("list items", list_items, +1),
        "second_person": ("you-words share", you_share, +1),
        "random": ("words", lambda t: len(words_of(t)), 0),
    }


_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)


def list_items(text: str) -> int:
    """Lines that start a list item (``-``, ``*``, ``•`` or ``1.``/``1)``)."""
    return len(_ITEM.findall(text))


def you_share(text: str) -> float:
    """The share of words that address the reader: you, your, yours, yourself, yourselves."""
    words = [w.lower() for w in words_of(text)]
    return sum(w in ("you", "your", "yours", "yourself", "yourselves") for w in words) / max(1, len(words))


def choose(scores: list[float], words: list[int], direction: int, rng: random.Random, min_words: int) -> int:
    """The simulated user's choice between two replies: never one of fewer than ``min_words`` words
    when the other has enough (no real user keeps an empty answer, whatever the hidden metric says of
    it); else the better one on the hidden metric; a coin on a tie and for the random control."""
    usable = [w >= min_words for w in words]
    if usable[0] != usable[1]:
        return usable.index(True)
    if direction == 0 or scores[0] == scores[1]:
        return rng.randrange(2)
    return max(range(2), key=lambda i: direction * scores[i])


def prompts(cfg: dict) -> tuple[list[str], list[str]]:
    """Training prompts (koala_eval_50) and held-out ones (personal_preference_eval): two sources."""
    rows = json.loads((SHARED / "data" / "prompts" / "koala_eval_50.json").read_text())
    train = [r["prompt"] for r in rows if len(r["prompt"]) < 300][: cfg["train_prompts"]]
    rows = json.loads((SHARED / "data" / "prompts" / "personal_preference_eval_preference_data.json").read_text())
    heldout = [r["question"].strip() for r in rows][: cfg["heldout_prompts"]]
    assert not set(train) & set(heldout)
    return train, heldout


# ----------------------------------------------------------------------------- set-up
def ensure_checkpoint(cfg: dict, out: Path) -> Path:
    ckpt = out / "pdpo_checkpoint"
    if (ckpt / "user_model.json").is_file() and (ckpt / "config.json").is_file():
        return ckpt
    t = cfg["pdpo_train"]
    rows = json.loads((SHARED / "data" / "dsp" / "domain_specific_preference.json").read_text())
    rng, domains = random.Random(0), ["academy", "business", "entertainment", "literature"]
    with (out / "dsp_pairs.jsonl").open("w") as f:
        for i, r in enumerate(rows[: t["pairs"]]):
            u = domains[i % 4]
            other = rng.choice([d for d in domains if d != u])
            f.write(json.dumps({"prompt": r["query"], "chosen": r["responses"][u], "rejected": r["responses"][other],
                                "user_id": u}) + "\n")
    print(f"training the P-DPO checkpoint ({t['max_steps']} steps on DSP pairs, the four domains as users)",
          file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "personalign", "train", "pdpo", "--model", cfg["model"], "--pairs",
                    str(out / "dsp_pairs.jsonl"), "--out", str(ckpt), "--max-steps", str(t["max_steps"]),
                    "--batch-size", str(t["batch_size"]), "--lr", str(t["lr"]), "--max-response-tokens",
                    str(t["max_response_tokens"]), "--max-prompt-tokens", "64"], check=True)
    return ckpt


def start_server(cfg: dict, ckpt: Path | None, out: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PERSONALIGN_ADMIN_KEY": "simulate-admin"}
    log = (out / "server.log").open("a")
    served = ["--checkpoint", str(ckpt)] if ckpt is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "personalign", "serve", "--model", cfg["model"], *served,
                             "--db", f"sqlite:///{out / 'server.db'}", "--port", str(port),
                             "--max-batch", "16", "--model-id", "m", "--fit-steps", str(cfg["fit_steps"]), "--fit-pairs",
                             str(cfg["fit_pairs"]), "--fold-share", str(cfg["fold_share"]), *cfg["serve_flags"]],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the server stopped (exit {proc.returncode}); see {out / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start in 10 minutes")


# ----------------------------------------------------------------------------- the loop
class Sim:
    def __init__(self, cfg: dict, out: Path, url: str) -> None:
        import httpx
        import openai

        self.cfg, self.out = cfg, out
        self.state_path = out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.lock = threading.Lock()
        self.t0, self.wall0 = time.perf_counter(), float(self.state.get("wall_s", 0.0))  # summed over resumes
        if "key" not in self.state:
            r = httpx.post(f"{url}/v1/keys", json={"name": "simulate"},
                           headers={"Authorization": "Bearer simulate-admin"})
            r.raise_for_status()
            self.state["key"] = r.json()["key"]
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.state['key']}"}, timeout=3600)
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=self.state["key"], max_retries=5, timeout=3600)
        self.judges = _judges()
        self.train, self.heldout = prompts(cfg)
        self.bar = None

    def save(self) -> None:
        with self.lock:
            self.state["wall_s"] = self.wall0 + time.perf_counter() - self.t0
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.replace(self.state_path)

    def tick(self, k: int = 1) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(k)

    def chat(self, prompt: str, user: str | None, personalization: dict, *, n: int = 1, seed: int | None = None,
             greedy: bool = False) -> Any:
        return self.client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], n=n, max_tokens=self.cfg["max_tokens"],
            temperature=0.0 if greedy else self.cfg["temperature"], top_p=1.0 if greedy else self.cfg["top_p"],
            seed=seed, user=user, extra_body={"personalization": personalization})

    def evaluate(self, user: str | None, personalization: dict) -> list[str]:
        """Greedy replies to every held-out prompt, sent at once (the engine batches them)."""
        with concurrent.futures.ThreadPoolExecutor(min(len(self.heldout), 8)) as pool:
            replies = list(pool.map(lambda p: self.chat(p, user, personalization, greedy=True)
                                    .choices[0].message.content, self.heldout))
        self.tick(len(self.heldout))
        return replies

    def scores(self, judge: str, replies: list[str]) -> list[float]:
        return [float(self.judges[judge][1](t)) for t in replies]

    # -- references
    def references(self) -> None:
        ref = self.state.setdefault("references", {})
        if "base" not in ref:
            ref["base"] = self.evaluate(None, {"method": "base"})
            self.save()
        for judge in self.cfg["users"]:
            key = f"preference_prompting/{judge}"
            if PREFERENCES[judge] is not None and key not in ref:
                ref[key] = self.evaluate(None, {"method": "preference_prompting", "preference": PREFERENCES[judge]})
                self.save()

    # -- one learner-user
    def user_id(self, learner: str, judge: str, seed: int) -> str:
        return f"{learner}-{judge}-s{seed}"

    def create_profile(self, uid: str, learner: str) -> None:
        if self.http.get(f"/v1/profiles/{uid}").status_code == 200:
            return
        body: dict[str, Any] = {"user": uid, **LEARNERS[learner][0]}
        if learner == "drift_oracle":
            body["drift_profile"] = self.oracle_drift
        r = self.http.post("/v1/profiles", json=body)
        r.raise_for_status()

    def run_user(self, learner: str, judge: str, seed: int) -> None:
        uid = self.user_id(learner, judge, seed)
        rec = self.state.setdefault("users", {}).setdefault(uid, {"learner": learner, "judge": judge, "seed": seed,
                                                                 "evals": {}, "choices": []})
        self.create_profile(uid, learner)
        rng = random.Random(f"{uid}")
        direction = self.judges[judge][2]
        method = LEARNERS[learner][1]
        for rnd in range(self.cfg["rounds"] + 1):
            if rnd in self.cfg["evals"] and str(rnd) not in rec["evals"]:
                if learner in NOTHING_AT_FIRST and rnd == 0:  # nothing learned yet: base's replies
                    rec["evals"]["0"] = list(self.state["references"]["base"])
                    self.tick(len(self.heldout))
                else:
                    rec["evals"][str(rnd)] = self.evaluate(uid, {"method": method})
                self.save()
            if rnd == self.cfg["rounds"]:
                break
            fid = f"{uid}-r{rnd}"
            if self.http.get(f"/v1/feedback/{fid}").status_code == 200:
                continue  # done before a restart
            use = {"method": "base" if learner in NOTHING_AT_FIRST and rnd == 0 else method}
            if learner == "drift_explore" and rnd > 0:
                use["alternatives"] = "explore"
            prompt = self.train[rnd % len(self.train)]
            for attempt in range(5):  # identical alternatives cannot be compared: sample again
                comp = self.chat(prompt, uid, use, n=2, seed=1000 * seed + 10 * rnd + attempt)
                texts = [c.message.content for c in comp.choices]
                if texts[0].strip() != texts[1].strip():
                    break
            s = self.scores(judge, texts)
            pick = choose(s, [len(words_of(t)) for t in texts], direction, rng, self.cfg["min_words"])
            r = self.http.post("/v1/feedback", json={"id": fid, "completion_id": comp.id, "chosen_index": pick})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"feedback {fid}: {r.status_code} {r.text[:300]}")
            rec["choices"].append({"round": rnd, "chosen": pick, "scores": s})
            self.tick()
            self.save()

    def run(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        health = self.http.get("/health").json()
        self.state["server"] = {"learners": health.get("learners"), "methods": health.get("methods")}
        if cfg["oracle_pool"]:
            from personalign.personas.attributes import default_pool
            from personalign.personas.drift import DriftProfile
            from personalign.personas.identity import steer_identity
            from personalign.views import load_model

            lm = load_model(cfg["model"], dtype="float32")
            self.oracle_drift = DriftProfile.empty(steer_identity(lm.model, lm.tokenizer),
                                                   default_pool().select(ORACLE_POOL),
                                                   chat_template=lm.tokenizer.chat_template is not None).to_dict()
            del lm
        learners = [*cfg["learners"], *(["drift_oracle"] if cfg["oracle_pool"] else [])]
        jobs = [(le, j, s) for s in cfg["seeds"] for le in learners for j in cfg["users"]]
        n_refs = 1 + sum(PREFERENCES[j] is not None for j in cfg["users"])
        total = n_refs * len(self.heldout) + len(jobs) * (cfg["rounds"] + len(cfg["evals"]) * len(self.heldout))
        done = len(self.state.get("references", {})) * len(self.heldout) + sum(  # this config's part only
            len(u["choices"]) + sum(str(r) in u["evals"] for r in cfg["evals"]) * len(self.heldout)
            for u in self.state.get("users", {}).values() if u["learner"] in learners)
        self.bar = tqdm(total=total, initial=done, desc="simulate (requests)", unit="req", smoothing=0.05)
        self.references()
        # users talk at once: 6 of them, each with up to 8 requests in flight, stay under the server's
        # connections per client (64)
        with concurrent.futures.ThreadPoolExecutor(min(len(jobs), 6)) as pool:
            for f in concurrent.futures.as_completed([pool.submit(self.run_user, *j) for j in jobs]):
                f.result()
        self.bar.close()
        pool_info = self.http.get(f"/v1/profiles/{self.user_id('drift', cfg['users'][0], cfg['seeds'][0])}")
        if "drift" in cfg["learners"] and pool_info.status_code == 200:
            dp = pool_info.json().get("drift_profile") or {}
            self.state["drift_pool"] = sorted(dp.get("weights") or {})
        self.save()


# ----------------------------------------------------------------------------- report
def paired(diffs: list[float]) -> tuple[float, float, float]:
    """The mean of per-prompt differences and its 95 % bootstrap interval (percentile, 10,000 resamples)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(diffs, dtype=float)
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean()), float(x.mean())
    ci = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=10_000, method="percentile",
                         random_state=0).confidence_interval
    return float(x.mean()), float(ci.low), float(ci.high)


def _fmt(m: float, lo: float, hi: float) -> str:
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{m:+.3g} [{lo:+.3g}, {hi:+.3g}]{mark}"


def per_prompt(state: dict, fn: Any, learner: str, judge: str, rnd: int) -> list[float] | None:
    """The learner's metric on each held-out prompt after ``rnd`` choices, the mean over seeds."""
    runs = [u["evals"][str(rnd)] for u in state["users"].values()
            if u["learner"] == learner and u["judge"] == judge and str(rnd) in u["evals"]]
    if not runs:
        return None
    return [statistics.fmean(fn(r[i]) for r in runs) for i in range(len(runs[0]))]


def report(cfg: dict, out: Path, wall: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    state = json.loads((out / "state.json").read_text())
    judges = _judges()
    refs = state["references"]
    learners = [*cfg["learners"], *(["drift_oracle"] if cfg["oracle_pool"] else [])]
    label = {le: (f"{le} (oracle pool)" if le == "drift_oracle" else le) for le in learners}
    pool = state.get("drift_pool")
    lines = [f"device: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; model {cfg['model']}; "
             f"{len(cfg['seeds'])} seed(s), {cfg['heldout_prompts']} held-out prompts, {cfg['rounds']} choices per "
             f"user; wall time {state.get('wall_s', wall) / 60:.1f} min (the loop, summed over resumes)",
             f"drift pool (the server's default for a new user): {len(pool)} attributes: {', '.join(pool)}" if pool
             else "drift pool: —", "",
             "Per held-out prompt, the learner minus the reference, oriented so that + is better for the user "
             "(random: the raw difference in words); mean [95 % bootstrap interval]; * the interval excludes 0.", "",
             "| user (hidden metric) | learner | " + " | ".join(f"− base, {r} choices" for r in cfg["evals"][1:]) +
             "".join(f" | − stated, {r} choices" for r in _stated_at(cfg)) + " |",
             "|---|---|" + "---|" * (len(cfg["evals"]) - 1) + "---|" * len(_stated_at(cfg))]
    beats_base: dict[str, dict] = {}  # directed user -> learner -> (mean, lo, hi) vs base at 8 choices
    matches: dict[str, dict] = {}  # ... vs the stated preference
    random_ok: dict[str, dict] = {}  # the random control's change
    fig, axes = plt.subplots(1, len(cfg["users"]), figsize=(4.2 * len(cfg["users"]), 3.6), squeeze=False)
    for ax, judge in zip(axes[0], cfg["users"]):
        metric, fn, direction = judges[judge]
        sign = direction or 1
        base = [fn(t) for t in refs["base"]]
        ref = refs.get(f"preference_prompting/{judge}")
        stated = [fn(t) for t in ref] if ref else None
        ax.axhline(statistics.fmean(base), color="gray", ls="--", label="base")
        if stated is not None:
            ax.axhline(statistics.fmean(stated), color="black", ls=":", label="stated preference")
        for learner in learners:
            cells, xs, ms = [], [], []
            for rnd in cfg["evals"]:
                v = per_prompt(state, fn, learner, judge, rnd)
                if v is not None:
                    xs.append(rnd)
                    ms.append(statistics.fmean(v))
                if rnd == 0:
                    continue
                if v is None:
                    cells.append("—")
                    continue
                got = paired([sign * (a - b) for a, b in zip(v, base)])
                cells.append(_fmt(*got))
                if rnd == _at(cfg, 8) and learner != "drift_oracle":
                    (random_ok if direction == 0 else beats_base).setdefault(judge, {})[learner] = got
            vs_stated = []
            for rnd in _stated_at(cfg):
                v = per_prompt(state, fn, learner, judge, rnd)
                if v is None or stated is None:
                    vs_stated.append("—")
                    continue
                got = paired([sign * (a - b) for a, b in zip(v, stated)])
                vs_stated.append(_fmt(*got))
                if rnd == _at(cfg, 8) and learner != "drift_oracle":
                    matches.setdefault(judge, {})[learner] = got
            if xs:
                ax.plot(xs, ms, marker="o", label=label[learner])
            better = {-1: "lower", 1: "higher", 0: "random choices"}[direction]
            lines.append(f"| {judge} ({metric}, {better}) | {label[learner]} | " + " | ".join(cells) + " | " +
                         " | ".join(vs_stated) + " |")
        ax.set_title(f"{judge}: {metric}")
        ax.set_xlabel("choices")
        ax.legend(fontsize=6)
    at = _at(cfg, 8)
    directed = [j for j in cfg["users"] if judges[j][2] != 0]
    better = {j: sorted(le for le, (_, lo, _) in beats_base.get(j, {}).items() if lo > 0) for j in directed}
    level = {j: sorted(le for le, (_, _, hi) in matches.get(j, {}).items() if hi >= 0) for j in directed}
    lines += ["", f"Targets, after {at} choices (the oracle pool never counts):",
              f"- some learner better than base (interval above 0): {sum(bool(v) for v in better.values())} of "
              f"{len(directed)} directed users (" + "; ".join(f"{j}: {', '.join(v) or 'none'}" for j, v in better.items())
              + ")",
              f"- some learner matching or beating the stated preference (interval of learner − stated not below 0): "
              f"{sum(bool(v) for v in level.values())} of {len(directed)} (" +
              "; ".join(f"{j}: {', '.join(v) or 'none'}" for j, v in level.items()) + ")"]
    for j, per in random_ok.items():
        inside = sorted(le for le, (_, lo, hi) in per.items() if lo <= 0 <= hi)
        lines.append(f"- the {j} control's change in words within an interval around 0: {len(inside)} of {len(per)} "
                     f"learners ({', '.join(inside) or 'none'})")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def _stated_at(cfg: dict) -> list[int]:
    """The evaluation points compared with the stated preference: 8 choices and the last."""
    return sorted({_at(cfg, 8), cfg["evals"][-1]})


def _at(cfg: dict, n: int) -> int:
    """The evaluation point nearest ``n`` choices (the targets are read at 8)."""
    return min(cfg["evals"], key=lambda r: abs(r - n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/simulate", help="output directory (a rerun resumes from its state)")
    ap.add_argument("--config", help="JSON file overriding keys of the default config")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 3 held-out prompts, 2 users")
    ap.add_argument("--model", help="the served model (default: the config's)")
    a = ap.parse_args()
    cfg = json.loads(json.dumps(DEFAULT))
    if a.quick:
        cfg.update(rounds=2, evals=[0, 2], heldout_prompts=3, train_prompts=2, users=["concise", "random"], seeds=[0],
                   learners=["drift", "pdpo", "incontext_both"], max_tokens=12,
                   pdpo_train={**cfg["pdpo_train"], "pairs": 8, "max_steps": 1, "batch_size": 2,
                               "max_response_tokens": 16})
    if a.config:
        extra = json.loads(Path(a.config).read_text())
        unknown = sorted(set(extra) - set(DEFAULT))
        if unknown:
            ap.error(f"unknown config keys {unknown}; valid: {sorted(DEFAULT)}")
        cfg.update(extra)
    if a.model:
        cfg["model"] = a.model
    for u in cfg["users"]:
        if u not in PREFERENCES:
            ap.error(f"unknown simulated user {u!r}; valid: {sorted(PREFERENCES)}")
    for le in cfg["learners"]:
        if le not in LEARNERS or le == "drift_oracle":
            ap.error(f"unknown learner {le!r}; valid: {sorted(set(LEARNERS) - {'drift_oracle'})} (the oracle pool: "
                     "\"oracle_pool\": true)")
    if sorted(set(cfg["evals"])) != cfg["evals"] or cfg["evals"][0] != 0 or cfg["evals"][-1] != cfg["rounds"]:
        ap.error("`evals` must rise from 0 to `rounds`")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    t0 = time.perf_counter()
    ckpt = ensure_checkpoint(cfg, out) if "pdpo" in cfg["learners"] else None  # trained only where it is used
    proc, url = start_server(cfg, ckpt, out)
    try:
        Sim(cfg, out, url).run()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(report(cfg, out, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
