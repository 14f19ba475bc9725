"""Pairwise judges and win rates.

A ``Judge`` compares two answers to one prompt under a user's preference: ``judge(items) ->
verdicts`` with ``winner`` in ``{"A", "B", "tie", "invalid"}``. Two judges:

* ``HTTPJudge``: any OpenAI-compatible ``/chat/completions`` endpoint (base URL, model, API key
  from an environment variable). The request has the shape of the papers' GPT-4 judge (seed 000,
  Appendix B.2, after Khanov et al. 2024): a system message stating the task and the user's
  preference, a user message with the question and the two answers between start/end markers, and
  a first output line holding two 1–10 scores. Higher score wins; equal scores are a tie. Failed
  requests (network errors, HTTP 408/409/429/5xx) are retried with exponential backoff; answers are
  cached on disk by a hash of the request, so a re-run sends nothing it has sent before.
* ``LocalJudge``: a local causal LM through our backend. Given the same messages, asking for the
  single letter of the better answer, it compares ``log p("A")`` and ``log p("B")`` for the
  first answer token (one batched forward per batch of items); ``|margin| <= tie_margin`` is a tie.

Position bias. ``judge_pairs`` asks every comparison in both orders and combines them. A judge
with ``combine = "vote"`` (HTTP): with ``s1 = +1/0/-1`` when the candidate wins/ties/loses shown
first and ``s2`` likewise shown second, the pair is a win if ``s1 + s2 > 0``, a loss if ``< 0`` and
a tie otherwise (two contradicting orders are a tie). A judge with ``combine = "margin"`` (local):
the candidate's score advantage averaged over both orders,
``d = ((a1 - b1) + (b2 - a2)) / 2`` (candidate is A in order 1, B in order 2), is a win if
``d > tie_margin``, a loss if ``d < -tie_margin``; a constant bias towards one position cancels
exactly in ``d``, which a vote cannot achieve when the bias flips every discrete verdict. ``aggregate`` counts wins, ties and losses separately and reports
``win_rate = (wins + ties / 2) / n`` with a 95% normal-approximation CI over the per-pair scores
(1, 1/2, 0); pairs with an invalid verdict are counted apart and excluded from ``n``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from personalign.eval.metrics import mean_ci
from personalign.personas.prompts import build_prompt_ids
from personalign.types import ViewSpec
from personalign.views.base import Backend

__all__ = ["Judge", "JudgeItem", "Verdict", "PairOutcome", "WinRate", "HTTPJudge", "LocalJudge", "judge_messages",
           "combine_orders", "judge_pairs", "aggregate", "parse_scores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeItem:
    """Two answers to one prompt; ``preference`` is the user's stated preference (or None)."""

    prompt: str
    response_a: str
    response_b: str
    preference: str | None = None


@dataclass
class Verdict:
    winner: str  # "A" | "B" | "tie" | "invalid"
    score_a: float = float("nan")
    score_b: float = float("nan")
    raw: str = ""


@runtime_checkable
class Judge(Protocol):
    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        ...


# ----------------------------------------------------------------------------- prompt
def judge_messages(item: JudgeItem, *, labels: tuple[str, str] = ("1", "2"), output: str = "scores") -> list[dict]:
    """System + user messages of a pairwise comparison.

    ``output="scores"`` asks for two 1–10 scores on the first line; ``"choice"`` for the single label
    of the better answer (the local judge reads the probability of each label).
    """
    a, b = labels
    focus = (f'The user stated this preference, and how well each answer follows it matters most: "{item.preference}". '
             "Also weigh helpfulness, harmlessness, accuracy and level of detail."
             if item.preference else
             "Weigh helpfulness, harmlessness, relevance, accuracy, depth and level of detail.")
    if output == "scores":
        task = (f"Rate each answer from 1 to 10, where 10 serves the user best. On the first line write only the two "
                f"scores, Assistant {a}'s then Assistant {b}'s, separated by one space. From the second line on, "
                "explain the ratings.")
    elif output == "choice":
        task = f"Reply with a single character: {a} if Assistant {a}'s answer is better, {b} if Assistant {b}'s is."
    else:
        raise ValueError(f"`output` must be 'scores' or 'choice', got {output!r}.")
    system = ("You are a careful, impartial judge of answers written by AI assistants. You will read a user's "
              f"question and the answers of two assistants. {focus} {task} The order in which the answers appear "
              "must not influence your judgement.")
    user = (f"[Question]\n{item.prompt}\n\n"
            f"[The Start of Assistant {a}'s Answer]\n{item.response_a}\n[The End of Assistant {a}'s Answer]\n\n"
            f"[The Start of Assistant {b}'s Answer]\n{item.response_b}\n[The End of Assistant {b}'s Answer]")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_SCORES = re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\s*[,/ \t]\s*(\d+(?:\.\d+)?)")


def parse_scores(text: str) -> Verdict:
    """The verdict of a ``scores`` answer: two numbers on its first non-empty line."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    m = _SCORES.match(first)
    if not m:
        return Verdict("invalid", raw=text)
    sa, sb = float(m.group(1)), float(m.group(2))
    return Verdict("A" if sa > sb else "B" if sb > sa else "tie", sa, sb, raw=text)


# ----------------------------------------------------------------------------- HTTP judge
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class HTTPJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint (orders combined by vote).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the judge model's name.
        api_key_env: environment variable holding the API key (``None``: send no key).
        temperature, max_tokens: sampling of the judge.
        timeout: seconds per request. retries: attempts after the first; backoff: first wait in
            seconds, doubled each retry (capped by ``max_backoff``; a numeric ``Retry-After`` wins).
        cache_dir: directory of cached answers (``None``: no cache).
        concurrency: requests in flight at once.
    """

    combine = "vote"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 256, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 30.0, cache_dir: str | Path | None = None,
                 concurrency: int = 4) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must start with http:// or https://, got {base_url!r}.")
        if not model:
            raise ValueError("`model` must name the judge model.")
        if retries < 0 or backoff < 0 or timeout <= 0 or concurrency < 1 or max_tokens < 1:
            raise ValueError("`retries`, `backoff` must be >= 0; `timeout` > 0; `concurrency`, `max_tokens` >= 1.")
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"the judge's API key must be in the environment variable {api_key_env!r}, "
                                 "which is unset or empty (set `api_key_env: null` for an endpoint without a key).")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.concurrency = concurrency
        self.requests_sent = 0  # HTTP requests actually sent (retries included)

    def payload(self, item: JudgeItem) -> dict[str, Any]:
        return {"model": self.model, "messages": judge_messages(item), "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def _cache_path(self, payload: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.url, payload], sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def complete(self, payload: dict[str, Any]) -> str:
        """The answer text for one request (from the cache when it has it)."""
        path = self._cache_path(payload)
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["content"]
            except (ValueError, KeyError):
                logger.warning("ignoring corrupt judge cache entry %s", path)
        content = self._post(payload)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"request": payload, "content": content}, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        return content

    def _post(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.requests_sent += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200]
                if e.code not in _RETRY_STATUS:
                    raise ValueError(f"judge endpoint {self.url} answered HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra and ra.replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff, float(ra))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"malformed response ({type(e).__name__}: {e})"
            if attempt < self.retries:
                logger.warning("judge request failed (%s); retry %d/%d in %.2fs", last, attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise ValueError(f"judge endpoint {self.url} failed after {self.retries + 1} attempts; last error: {last}")

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        payloads = [self.payload(it) for it in items]
        if self.concurrency == 1 or len(payloads) <= 1:
            texts = [self.complete(p) for p in payloads]
        else:
            with ThreadPoolExecutor(self.concurrency) as pool:
                texts = list(pool.map(self.complete, payloads))
        return [parse_scores(t) for t in texts]


# ----------------------------------------------------------------------------- local judge
class LocalJudge:
    """A local causal LM as judge: compares the log-probabilities of the two answer labels.

    Both orders are combined by margin (``combine = "margin"``): the label log-prob difference
    averaged over the two orders, so the model's preference for a position cancels.

    Args:
        backend: an ``HFBackend``; ``model`` is the key of the judge model in it.
        labels: the two labels; each must encode to exactly one token.
        tie_margin: ``|log p(A) - log p(B)| <= tie_margin`` is a tie.
        batch_size: items per forward.
        chat_template: render with the tokenizer's chat template when it has one.
    """

    combine = "margin"

    def __init__(self, backend: Backend, *, model: str = "main", labels: tuple[str, str] = ("A", "B"),
                 tie_margin: float = 0.0, batch_size: int = 8, chat_template: bool = True) -> None:
        if tie_margin < 0 or batch_size < 1:
            raise ValueError(f"`tie_margin` must be >= 0 and `batch_size` >= 1, got {tie_margin}, {batch_size}.")
        self.backend, self.model, self.labels = backend, model, labels
        self.tie_margin, self.batch_size, self.chat_template = tie_margin, batch_size, chat_template
        tok = backend.tokenizer(model)
        ids = [tok.encode(lab, add_special_tokens=False) for lab in labels]
        if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"`labels` {labels} must each encode to one distinct token, got {ids}.")
        self.label_ids = (ids[0][0], ids[1][0])

    def prompt_ids(self, item: JudgeItem) -> tuple[int, ...]:
        system, user = judge_messages(item, labels=self.labels, output="choice")
        a, b = self.labels
        question = f"{user['content']}\n\nWhich answer is better, {a} or {b}?"
        return build_prompt_ids(self.backend.tokenizer(self.model), question, system=system["content"],
                                chat_template=self.chat_template)

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        out: list[Verdict] = []
        ia, ib = self.label_ids
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            views = [[ViewSpec(prompt_ids=self.prompt_ids(it), model=self.model, role="judge")] for it in chunk]
            lp = self.backend.prefill(views).last_logprobs[:, 0]  # float32 [b, V]
            for row in lp:
                la, lb = float(row[ia]), float(row[ib])
                d = la - lb
                out.append(Verdict("tie" if abs(d) <= self.tie_margin else "A" if d > 0 else "B", la, lb))
        return out


# ----------------------------------------------------------------------------- aggregation
@dataclass
class PairOutcome:
    """One comparison asked in both orders. ``result`` is from the candidate's side."""

    result: str  # "win" | "tie" | "loss" | "invalid"
    candidate_first: Verdict
    candidate_second: Verdict

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "candidate_first": asdict(self.candidate_first),
                "candidate_second": asdict(self.candidate_second)}


def combine_orders(candidate_first: Verdict, candidate_second: Verdict, mode: str = "vote",
                   tie_margin: float = 0.0) -> str:
    """Win/tie/loss of the candidate from its verdicts shown first (as A) and second (as B)."""
    if "invalid" in (candidate_first.winner, candidate_second.winner):
        return "invalid"
    if mode == "margin":
        d = ((candidate_first.score_a - candidate_first.score_b)
             + (candidate_second.score_b - candidate_second.score_a)) / 2
        if d != d:
            return "invalid"
        return "win" if d > tie_margin else "loss" if d < -tie_margin else "tie"
    if mode != "vote":
        raise ValueError(f"`mode` must be 'vote' or 'margin', got {mode!r}.")
    s1 = {"A": 1, "B": -1, "tie": 0}[candidate_first.winner]
    s2 = {"B": 1, "A": -1, "tie": 0}[candidate_second.winner]
    s = s1 + s2
    return "win" if s > 0 else "loss" if s < 0 else "tie"


def judge_pairs(judge: Judge, prompts: Sequence[str], candidates: Sequence[str], references: Sequence[str],
                preferences: Sequence[str | None]) -> list[PairOutcome]:
    """Judge each candidate against its reference in both orders (2N judge calls, one batch)."""
    n = len(prompts)
    if not (len(candidates) == len(references) == len(preferences) == n):
        raise ValueError("`prompts`, `candidates`, `references` and `preferences` must have the same length.")
    items = [JudgeItem(p, c, r, pref) for p, c, r, pref in zip(prompts, candidates, references, preferences)]
    items += [JudgeItem(p, r, c, pref) for p, c, r, pref in zip(prompts, candidates, references, preferences)]
    verdicts = judge.judge(items)
    if len(verdicts) != 2 * n:
        raise ValueError(f"the judge returned {len(verdicts)} verdicts for {2 * n} items.")
    mode, margin = getattr(judge, "combine", "vote"), float(getattr(judge, "tie_margin", 0.0))
    return [PairOutcome(combine_orders(verdicts[i], verdicts[n + i], mode, margin), verdicts[i], verdicts[n + i])
            for i in range(n)]


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int
    invalid: int
    win_rate: float  # (wins + ties / 2) / n
    ci: float  # half-width of the 95% CI of win_rate

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def aggregate(results: Sequence[str | PairOutcome]) -> WinRate:
    """Counts and the tie-as-half win rate of pair results ("win" / "tie" / "loss" / "invalid")."""
    res = [r.result if isinstance(r, PairOutcome) else r for r in results]
    bad = sorted({r for r in res if r not in ("win", "tie", "loss", "invalid")})
    if bad:
        raise ValueError(f"pair results must be win, tie, loss or invalid, got {bad}.")
    scores = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[r] for r in res if r != "invalid"]
    m, half, _ = mean_ci(scores)
    return WinRate(res.count("win"), res.count("tie"), res.count("loss"), res.count("invalid"), m, half)
