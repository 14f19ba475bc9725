"""Simulated users: proof that answers move toward what a user keeps choosing, and how many choices it takes.

Each simulated user has a *hidden* preference that a programmatic judge measures (``JUDGES``): a
reply's word count (``concise``), its Flesch-Kincaid grade (``elementary``), its VADER sentiment
(``friendly``), a trade-off of two metrics (``upbeat_brief``: sentiment minus words / 50, a judge no
single surface metric captures), and a ``random`` control whose choices are coin flips. They talk to a
**live** ``personalign serve`` (a subprocess on 127.0.0.1) through the official ``openai`` client.

For each learner (``drift``: the user's Drift profile, learnt from feedback; ``pdpo``: the user's
own P-DPO embedding, fitted from feedback for a user the checkpoint never saw) and each user, round
after round: a training prompt, a request with ``n = 2`` sampled choices decoded by that learner,
the user's choice by its hidden judge, ``POST /v1/feedback`` with ``completion_id`` and
``chosen_index`` (folded before the next round). Every ``eval_every`` rounds (and at 0) the
learner's greedy replies to the **held-out** prompts are scored on the hidden metric. References,
once per user: ``base`` (knows nothing) and ``preference_prompting`` given the hidden preference
in words (what the user would get by stating it).

Before the first choice a Drift user has no pairs to steer with: its alternatives and its 0-choice
replies are ``base``'s. A P-DPO user starts at the checkpoint's generic embedding ``e_0``.

Outputs under ``--out``: ``state.json`` (every reply's score; a rerun resumes where it stopped: rounds
whose feedback is stored are not redone), ``server.db`` and ``server.log``, the P-DPO checkpoint
(trained once by ``personalign train pdpo`` on DSP pairs, the four domains as users), and
``results.md`` (the table) and ``curves.png`` (metric vs choices, mean and 95% CI over held-out
prompts and seeds).

Run: ``OMP_NUM_THREADS=2 python benchmarks/simulate.py --out runs/simulate`` (the default config,
``DEFAULT``; ``--config FILE.json`` overrides any of its keys; ``--quick`` is a 2-round smoke run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from personalign.eval.style_metrics import words_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

DEFAULT: dict[str, Any] = {
    "model": "smollm2",
    "users": ["concise", "elementary", "friendly", "upbeat_brief", "random"],
    "learners": ["drift", "pdpo"],
    "rounds": 8,  # choices per user
    "eval_every": 4,
    "seeds": [0],
    "train_prompts": 8,  # cycled through the rounds (koala_eval_50, the first ones)
    "heldout_prompts": 6,  # the last prompts of koala_eval_50
    "max_tokens": 32,
    "temperature": 1.0,  # the n = 2 alternatives
    "top_p": 0.95,
    "min_words": 3,  # a reply shorter than this is never kept over one that is not (see `choose`)
    # the Drift attribute pool of the simulated users' profiles (a subset of the default 48, so that a
    # choice folds in seconds on 2 CPU cores; docs/performance.md has the cost with all 48)
    "drift_pool": ["concise", "detailed", "easy_words", "academic", "humorous", "optimistic"],
    "pdpo_train": {"pairs": 200, "max_steps": 10, "batch_size": 4, "lr": 1e-4, "max_response_tokens": 96},
    "fit_steps": 3,
    "fit_pairs": 4,
    "fold_share": 1.0,  # the server's --fold-share: folds may take as long as the decoding beside them
}

PREFERENCES = {  # the hidden preference in words (P-SOUPS profiles; seed 001 Table 7), for the reference
    "concise": "Generate a response that is concise and to the point, without being verbose.",
    "elementary": "Generate a response that can be easily understood by an elementary school student.",
    "friendly": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "upbeat_brief": "Generate a response that is cheerful and positive, and keep it short.",
    "random": None,
}


def _judges() -> dict[str, tuple[str, Any, int]]:
    from personalign.eval.style_metrics import fk_grade, sentiment

    return {  # name -> (the metric reported, the metric, its direction: +1 the user prefers it higher)
        "concise": ("words", lambda t: len(words_of(t)), -1),
        "elementary": ("fk_grade", fk_grade, -1),
        "friendly": ("sentiment", sentiment, +1),
        "upbeat_brief": ("sentiment - words/50", lambda t: sentiment(t) - len(words_of(t)) / 50, +1),
        "random": ("words", lambda t: len(words_of(t)), 0),
    }


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
    rows = json.loads((SHARED / "data" / "prompts" / "koala_eval_50.json").read_text())
    allp = [r["prompt"] for r in rows if len(r["prompt"]) < 300]
    return allp[: cfg["train_prompts"]], allp[-cfg["heldout_prompts"]:]


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


def start_server(cfg: dict, ckpt: Path, out: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PERSONALIGN_ADMIN_KEY": "simulate-admin"}
    log = (out / "server.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "personalign", "serve", "--model", cfg["model"], "--checkpoint",
                             str(ckpt), "--db", f"sqlite:///{out / 'server.db'}", "--port", str(port),
                             "--max-batch", "16", "--model-id", "m", "--fit-steps", str(cfg["fit_steps"]), "--fit-pairs",
                             str(cfg["fit_pairs"]), "--fold-share", str(cfg["fold_share"])], env=env, stdout=log, stderr=subprocess.STDOUT)
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
        with concurrent.futures.ThreadPoolExecutor(len(self.heldout)) as pool:
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
        # every choice folds into the user's Drift profile (the server always learns it); the pool is set
        body: dict[str, Any] = {"user": uid, "method": learner, "drift_profile": self.empty_drift}
        r = self.http.post("/v1/profiles", json=body)
        r.raise_for_status()

    def run_user(self, learner: str, judge: str, seed: int) -> None:
        uid = self.user_id(learner, judge, seed)
        rec = self.state.setdefault("users", {}).setdefault(uid, {"learner": learner, "judge": judge, "seed": seed,
                                                                 "evals": {}, "choices": []})
        self.create_profile(uid, learner)
        rng = random.Random(f"{uid}")
        direction = self.judges[judge][2]
        for rnd in range(self.cfg["rounds"] + 1):
            if rnd % self.cfg["eval_every"] == 0 and str(rnd) not in rec["evals"]:
                if learner == "drift" and rnd == 0:  # no pair yet: Drift has nothing to steer with
                    rec["evals"]["0"] = list(self.state["references"]["base"])
                    self.tick(len(self.heldout))
                else:
                    rec["evals"][str(rnd)] = self.evaluate(uid, {"method": learner})
                self.save()
            if rnd == self.cfg["rounds"]:
                break
            fid = f"{uid}-r{rnd}"
            if self.http.get(f"/v1/feedback/{fid}").status_code == 200:
                continue  # done before a restart
            method = "base" if learner == "drift" and rnd == 0 else learner
            prompt = self.train[rnd % len(self.train)]
            for attempt in range(5):  # identical alternatives cannot be compared: sample again
                comp = self.chat(prompt, uid, {"method": method}, n=2, seed=1000 * seed + 10 * rnd + attempt)
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

        from personalign.personas.attributes import default_pool
        from personalign.personas.drift import DriftProfile
        from personalign.personas.identity import steer_identity
        from personalign.views import load_model

        lm = load_model(self.cfg["model"], dtype="float32")
        self.empty_drift = DriftProfile.empty(steer_identity(lm.model, lm.tokenizer),
                                              default_pool().select(self.cfg["drift_pool"]),
                                              chat_template=lm.tokenizer.chat_template is not None).to_dict()
        del lm
        cfg = self.cfg
        jobs = [(le, j, s) for s in cfg["seeds"] for le in cfg["learners"] for j in cfg["users"]]
        evals = len(range(0, cfg["rounds"] + 1, cfg["eval_every"]))
        n_refs = 1 + sum(PREFERENCES[j] is not None for j in cfg["users"])
        total = n_refs * len(self.heldout) + len(jobs) * (cfg["rounds"] + evals * len(self.heldout))
        done = len(self.state.get("references", {})) * len(self.heldout) + sum(
            len(u["choices"]) + len(u["evals"]) * len(self.heldout) for u in self.state.get("users", {}).values())
        self.bar = tqdm(total=total, initial=done, desc="simulate (requests)", unit="req", smoothing=0.05)
        self.references()
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # users talk at once
            for f in concurrent.futures.as_completed([pool.submit(self.run_user, *j) for j in jobs]):
                f.result()
        self.bar.close()


# ----------------------------------------------------------------------------- report
def ci95(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    from scipy import stats

    return m, float(stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def report(cfg: dict, out: Path, wall: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    state = json.loads((out / "state.json").read_text())
    judges = _judges()
    refs = state["references"]
    rounds = list(range(0, cfg["rounds"] + 1, cfg["eval_every"]))
    last = str(rounds[-1])
    lines = [f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__}; model {cfg['model']}; "
             f"{len(cfg['seeds'])} seed(s), {cfg['heldout_prompts']} held-out prompts, {cfg['rounds']} choices per "
             f"user; wall time {state.get('wall_s', wall) / 60:.1f} min (the loop, summed over resumes)", "",
             f"| user (hidden metric, better) | base | stated preference | learner | 0 choices | {last} choices | "
             "share of the way base → stated (at the end) |", "|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(cfg["users"]), figsize=(4.2 * len(cfg["users"]), 3.6), squeeze=False)
    for ax, judge in zip(axes[0], cfg["users"]):
        metric, fn, direction = judges[judge]
        base = [fn(t) for t in refs["base"]]
        b_m, b_h = ci95(base)
        ref = refs.get(f"preference_prompting/{judge}")
        r_m = ci95([fn(t) for t in ref])[0] if ref else None
        ax.axhline(b_m, color="gray", ls="--", label="base")
        if r_m is not None:
            ax.axhline(r_m, color="black", ls=":", label="stated preference")
        for learner in cfg["learners"]:
            per_round = {r: [] for r in rounds}
            for u in state["users"].values():
                if u["learner"] == learner and u["judge"] == judge:
                    for r in rounds:
                        per_round[r] += [fn(t) for t in u["evals"].get(str(r), [])]
            pts = [(r, *ci95(v)) for r, v in per_round.items() if v]
            if not pts:
                continue
            xs, ms, hs = zip(*pts)
            ax.errorbar(xs, ms, yerr=hs, marker="o", capsize=3, label=learner)
            m0, m_end = ms[0], ms[-1]
            if r_m is None:
                share = "—"
            elif abs(r_m - b_m) <= b_h:  # stating the preference did not move the metric out of base's CI
                share = f"— (stated within base's CI; {'beyond' if direction * (m_end - r_m) > 0 else 'short of'} it)"
            else:
                share = f"{100 * (m_end - b_m) / (r_m - b_m):+.0f} %"
            h_end = hs[-1]
            better = {-1: "lower", 1: "higher", 0: "random choices"}[direction]
            lines.append(f"| {judge} ({metric}, {better}) | {b_m:.3g} ± {b_h:.2g} | "
                         f"{'—' if r_m is None else f'{r_m:.3g}'} | {learner} | {m0:.3g} | {m_end:.3g} ± {h_end:.2g} | "
                         f"{share} |")
        ax.set_title(f"{judge}: {metric}")
        ax.set_xlabel("choices")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/simulate", help="output directory (a rerun resumes from its state)")
    ap.add_argument("--config", help="JSON file overriding keys of the default config")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 2 held-out prompts, 2 users")
    ap.add_argument("--model", help="the served model (default: the config's)")
    a = ap.parse_args()
    cfg = json.loads(json.dumps(DEFAULT))
    if a.quick:
        cfg.update(rounds=2, eval_every=2, heldout_prompts=2, train_prompts=2, users=["concise", "random"],
                   max_tokens=12, pdpo_train={**cfg["pdpo_train"], "pairs": 8, "max_steps": 1, "batch_size": 2,
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    t0 = time.perf_counter()
    ckpt = ensure_checkpoint(cfg, out)
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
