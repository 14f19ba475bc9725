"""Judges: order combination and win-rate aggregation (golden), the HTTP judge against a fake
OpenAI-compatible server on 127.0.0.1, and the local log-likelihood judge on the tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from personalign.eval.judge import (
    HTTPJudge,
    JudgeItem,
    LocalJudge,
    Verdict,
    aggregate,
    combine_orders,
    judge_messages,
    judge_pairs,
    parse_scores,
)
from tests.numerics import assert_close_forward


@pytest.mark.parametrize(("first", "second", "result"), [
    ("A", "B", "win"),    # candidate wins in both orders
    ("B", "A", "loss"),
    ("A", "A", "tie"),    # position bias: 'first shown' wins both times -> cancels
    ("B", "B", "tie"),
    ("A", "tie", "win"),
    ("tie", "A", "loss"),
    ("tie", "tie", "tie"),
    ("invalid", "B", "invalid"),
])
def test_combine_orders_vote(first, second, result):
    assert combine_orders(Verdict(first), Verdict(second)) == result


def test_combine_orders_margin_cancels_constant_position_bias():
    """Judge adds +3 to whichever answer is shown first; the candidate is truly 0.5 better.
    Order 1 (candidate A): a=0.5+3, b=0 -> a-b=3.5. Order 2 (candidate B): a=3, b=0.5 -> b-a=-2.5.
    d = (3.5 - 2.5)/2 = 0.5 > 0: a win, though a vote would call both orders for position A (a tie)."""
    v1, v2 = Verdict("A", 3.5, 0.0), Verdict("A", 3.0, 0.5)
    assert combine_orders(v1, v2, "margin") == "win"
    assert combine_orders(v1, v2, "vote") == "tie"
    assert combine_orders(v1, v2, "margin", tie_margin=0.6) == "tie"
    assert combine_orders(Verdict("B", 0.0, 1.0), Verdict("A", 1.0, 0.0), "margin") == "loss"


def test_aggregate_golden():
    """3 wins, 2 ties, 1 loss, 1 invalid: n = 6, rate = (3 + 2/2)/6 = 2/3; per-pair scores
    [1,1,1,.5,.5,0] have s^2 = (3*(1/3)^2 + 2*(1/6)^2 + (2/3)^2)/5 = 1/6, half = 1.96*sqrt(1/36)."""
    w = aggregate(["win", "win", "tie", "loss", "win", "tie", "invalid"])
    assert (w.wins, w.ties, w.losses, w.invalid, w.n) == (3, 2, 1, 1, 6)
    assert w.win_rate == pytest.approx(2 / 3)
    assert w.ci == pytest.approx(1.959964 / 6)
    with pytest.raises(ValueError, match="win, tie, loss or invalid"):
        aggregate(["won"])


def test_parse_scores():
    assert parse_scores("8 6\nbecause").winner == "A"
    assert parse_scores("\n7.5, 9\n").winner == "B"
    v = parse_scores("5 5")
    assert (v.winner, v.score_a, v.score_b) == ("tie", 5.0, 5.0)
    assert parse_scores("I think assistant 1").winner == "invalid"


def test_judge_messages_shape():
    sys_msg, user = judge_messages(JudgeItem("Why?", "ans one", "ans two", "be concise"))
    assert sys_msg["role"] == "system" and user["role"] == "user"
    assert '"be concise"' in sys_msg["content"] and "first line" in sys_msg["content"]
    assert user["content"].index("[Question]\nWhy?") < user["content"].index("Assistant 1's Answer]\nans one") \
        < user["content"].index("Assistant 2's Answer]\nans two")


# ----------------------------------------------------------------------------- fake server
class _FakeOpenAI:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that prefers the longer answer.

    It fails the first ``fail_first`` requests with HTTP 503, and answers 401 without the right key.
    """

    def __init__(self, fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer sk-test":
                    self._send(401, {"error": "bad key or path"})
                    return
                fake.requests.append(body)
                if len(fake.requests) <= fake.fail_first:
                    self._send(503, {"error": "busy"})
                    return
                user = body["messages"][1]["content"]
                a = user.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
                b = user.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
                sa, sb = (8, 4) if len(a) > len(b) else (4, 8) if len(b) > len(a) else (6, 6)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"{sa} {sb}\nreasons"}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_http_judge_both_orders_cache_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    prompts, cands, refs = ["q1", "q2", "q3"], ["a long answer", "no", "same"], ["short", "a long answer", "SAME"]
    with _FakeOpenAI(fail_first=2) as srv:
        judge = HTTPJudge(srv.url, "judge-model", api_key_env="JUDGE_KEY", cache_dir=tmp_path / "cache",
                          backoff=0.01, concurrency=1)
        outs = judge_pairs(judge, prompts, cands, refs, ["be thorough"] * 3)
        assert [o.result for o in outs] == ["win", "loss", "tie"]
        assert len(srv.requests) == 2 + 6  # two 503s retried, then 3 pairs x 2 orders
        first = srv.requests[2]
        assert first["model"] == "judge-model" and first["temperature"] == 0.0
        assert "be thorough" in first["messages"][0]["content"]
        # both orders were asked: the candidate appears once as Assistant 1 and once as Assistant 2
        users = [r["messages"][1]["content"] for r in srv.requests[2:]]
        assert sum("Assistant 1's Answer]\na long answer" in u for u in users) == 2  # q1 cand first, q2 ref first
        # a second judge with the same cache sends nothing
        again = HTTPJudge(srv.url, "judge-model", api_key_env="JUDGE_KEY", cache_dir=tmp_path / "cache", concurrency=3)
        assert [o.result for o in judge_pairs(again, prompts, cands, refs, ["be thorough"] * 3)] == ["win", "loss", "tie"]
        assert len(srv.requests) == 8 and again.requests_sent == 0
        assert aggregate(outs).win_rate == pytest.approx(0.5)


def test_http_judge_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY"):
        HTTPJudge("http://127.0.0.1:1/v1", "m", api_key_env="NO_SUCH_KEY")
    with pytest.raises(ValueError, match="base_url"):
        HTTPJudge("127.0.0.1/v1", "m", api_key_env=None)
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with _FakeOpenAI() as srv:
        j = HTTPJudge(srv.url, "m", api_key_env="JUDGE_KEY", backoff=0.0)
        with pytest.raises(ValueError, match="HTTP 401"):
            j.judge([JudgeItem("q", "a", "b")])
        assert j.requests_sent == 1  # not retried
    with _FakeOpenAI(fail_first=10) as srv:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        j = HTTPJudge(srv.url, "m", api_key_env="JUDGE_KEY", retries=2, backoff=0.0)
        with pytest.raises(ValueError, match="after 3 attempts; last error: HTTP 503"):
            j.judge([JudgeItem("q", "a", "b")])


# ----------------------------------------------------------------------------- local judge
def test_local_judge_matches_direct_logprobs(tiny_lm, tiny_chat_tokenizer):
    """Each verdict's scores are log p(label | judge prompt) computed by teacher forcing."""
    from personalign.views import HFBackend

    tok = tiny_chat_tokenizer
    be = HFBackend(tiny_lm, tok)
    judge = LocalJudge(be, labels=("yes", "no"), batch_size=2)
    items = [JudgeItem("why", "the cat", "a dog is happy", "funny"), JudgeItem("how", "run", "the sun", None),
             JudgeItem("what", "sad", "big", "kind")]
    verdicts = judge.judge(items)
    ids = [tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]
    for it, v in zip(items, verdicts):
        p = judge.prompt_ids(it)
        la, lb = (float(be.sequence_logprobs([p], [[i]])[0][0]) for i in ids)
        assert_close_forward(torch.tensor([v.score_a, v.score_b]), torch.tensor([la, lb]), tiny_lm)
        assert v.winner == ("A" if la > lb else "B")
    with pytest.raises(ValueError, match="one distinct token"):
        LocalJudge(be, labels=("yes", "yes"))


def test_local_judge_both_orders_antisymmetric(tiny_lm, tiny_chat_tokenizer):
    """Swapping candidate and reference flips the margin's sign: win <-> loss."""
    from personalign.views import HFBackend

    judge = LocalJudge(HFBackend(tiny_lm, tiny_chat_tokenizer), labels=("yes", "no"))
    fwd = judge_pairs(judge, ["why", "how"], ["the cat", "run fast"], ["a dog", "the sun"], ["funny", None])
    rev = judge_pairs(judge, ["why", "how"], ["a dog", "the sun"], ["the cat", "run fast"], ["funny", None])
    flip = {"win": "loss", "loss": "win", "tie": "tie"}
    assert [flip[o.result] for o in fwd] == [o.result for o in rev]
    assert torch.isfinite(torch.tensor([fwd[0].candidate_first.score_a]))


def test_http_judge_through_the_eval_config(tmp_path, monkeypatch, tiny_lm, tiny_chat_tokenizer):
    """`judge: {kind: http}` in an eval config: every (candidate, reference) pair is asked in both orders,
    answers land in <output_dir>/judge_cache, and the fake judge's rule (longer answer wins) is what the
    win rate reports."""
    from personalign.eval.config import parse_eval_config
    from personalign.eval.harness import run_eval
    from personalign.views import LoadedModel

    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    (tmp_path / "p.json").write_text(json.dumps(["tell me a story", "why is the sky blue"]))
    with _FakeOpenAI() as srv:
        cfg = parse_eval_config({
            "name": "h", "output_dir": str(tmp_path / "out"), "models": [{"name": "tiny", "path": str(tmp_path)}],
            "prompts": str(tmp_path / "p.json"), "preferences": {"F": "be funny"},
            "methods": ["base", "preference_prompting"], "generation": {"max_new_tokens": 4, "batch_size": 2},
            "metrics": ["length"], "plots": {"bars": [], "tradeoff": None},
            "judge": {"kind": "http", "base_url": srv.url, "judge_model": "fake", "api_key_env": "JUDGE_KEY",
                      "reference": "preference_prompting", "concurrency": 1}})
        res = run_eval(cfg, models={"tiny": LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")})
        assert len(srv.requests) == 4 and len(res.judgments) == 2
    assert any((tmp_path / "out" / "judge_cache").rglob("*.json"))
    by = {(g["method"], g["prompt_id"]): g["text"] for g in res.generations}
    for j in res.judgments:
        cand, ref = by[("base", j["prompt_id"])], by[("preference_prompting", j["prompt_id"])]
        assert j["result"] == ("win" if len(cand) > len(ref) else "loss" if len(cand) < len(ref) else "tie")
