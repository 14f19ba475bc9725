"""Drift approximation (seed 002, Algorithm 1, Eq. 6): rewards, closed form, solvers, profile, online updates."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.numerics import drift_weights_atol

from personalign.personas.attributes import Attribute, AttributePool
from personalign.personas.drift import (
    DriftProfile,
    PreferencePair,
    closed_form_weights,
    fit_pairs,
    fit_profile,
    logistic_weights,
    pair_rewards,
    select_top,
)
from personalign.personas.prompts import build_prompt_ids
from personalign.views import HFBackend

POOL = AttributePool("you are a friend", (
    Attribute("formal", "you are a formal friend"),
    Attribute("concise", "you are a concise friend"),
    Attribute("funny", "you are a funny friend"),
    Attribute("sad", "you are a sad friend"),
))
PAIRS = [
    PreferencePair("tell me a story", "once upon a time there was a happy cat .", "the dog was sad ."),
    PreferencePair("why is the sky blue ?", "the sun and the sky !", "no ."),
    PreferencePair("tell me about the moon", "the moon is big and old .", "the moon is a small red fish"),
]


@pytest.fixture()
def backend(tiny_lm, tiny_chat_tokenizer):
    return HFBackend(tiny_lm, tiny_chat_tokenizer)


def _seq_logprob(model, tok, prompt, system, response) -> float:
    """log π(y | x, s) by the chain rule, one unbatched, unpadded, uncached forward."""
    p = list(build_prompt_ids(tok, prompt, system=system))
    y = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + y])).logits[0].double(), -1)
    return float(sum(lp[len(p) - 1 + t, tok_id] for t, tok_id in enumerate(y)))


def test_w_minus_l_matches_hand_derivation(backend, tiny_lm, tiny_chat_tokenizer):
    """W[j,i] − L[j,i] = [log π(y_w|x,s_i) − log π(y_w|x,s_0)] − [log π(y_l|x,s_i) − log π(y_l|x,s_0)].

    Each of the four terms is computed alone (chain rule over the response tokens, float64 softmax),
    so the batched, left-padded, logits_to_keep path must reproduce them.
    """
    wins, losses = pair_rewards(backend, PAIRS, POOL)
    assert wins.shape == losses.shape == (len(PAIRS), len(POOL))
    tok = tiny_chat_tokenizer
    for j, pair in enumerate(PAIRS):
        w0 = _seq_logprob(tiny_lm, tok, pair.prompt, POOL.base, pair.chosen)
        l0 = _seq_logprob(tiny_lm, tok, pair.prompt, POOL.base, pair.rejected)
        for i, attr in enumerate(POOL.attributes):
            wi = _seq_logprob(tiny_lm, tok, pair.prompt, attr.prompt, pair.chosen)
            li = _seq_logprob(tiny_lm, tok, pair.prompt, attr.prompt, pair.rejected)
            assert float(wins[j, i]) == pytest.approx(wi - w0, abs=2e-4)
            assert float(losses[j, i]) == pytest.approx(li - l0, abs=2e-4)
            assert float(wins[j, i] - losses[j, i]) == pytest.approx((wi - w0) - (li - l0), abs=4e-4)


def test_one_batched_forward_per_pair(backend):
    before = backend.forward_count
    pair_rewards(backend, PAIRS, POOL)
    assert backend.forward_count - before == len(PAIRS)


def test_truncated_responses_score_only_a_prefix(backend, tiny_lm, tiny_chat_tokenizer):
    w, _ = pair_rewards(backend, PAIRS[:1], POOL, max_response_tokens=3)
    prefix = " ".join(PAIRS[0].chosen.split()[:3])
    ref = _seq_logprob(tiny_lm, tiny_chat_tokenizer, PAIRS[0].prompt, POOL.attributes[0].prompt, prefix) - \
        _seq_logprob(tiny_lm, tiny_chat_tokenizer, PAIRS[0].prompt, POOL.base, prefix)
    assert float(w[0, 0]) == pytest.approx(ref, abs=2e-4)


def test_an_empty_answer_is_scored_as_its_end_token(backend, tiny_lm, tiny_chat_tokenizer):
    """A model that stopped at once answered "": the pair is still a pair, the empty side scored as EOS."""
    tok = tiny_chat_tokenizer
    pair = PreferencePair(PAIRS[0].prompt, PAIRS[0].chosen, "")
    _, losses = pair_rewards(backend, [pair], POOL)
    for i, attr in enumerate(POOL.attributes):
        p_i = list(build_prompt_ids(tok, pair.prompt, system=attr.prompt))
        p_0 = list(build_prompt_ids(tok, pair.prompt, system=POOL.base))
        with torch.no_grad():
            li = torch.log_softmax(tiny_lm(torch.tensor([p_i])).logits[0, -1].double(), -1)[tok.eos_token_id]
            l0 = torch.log_softmax(tiny_lm(torch.tensor([p_0])).logits[0, -1].double(), -1)[tok.eos_token_id]
        assert float(losses[0, i]) == pytest.approx(float(li - l0), abs=2e-4)


finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=12).flatmap(
    lambda v: st.tuples(st.just(v), st.lists(st.lists(finite, min_size=len(v), max_size=len(v)), min_size=1, max_size=5))))
def test_closed_form_maximizes_linear_objective_on_unit_sphere(data):
    """p* = v/‖v‖ is the argmax of vᵀp over ‖p‖ = 1 (Cauchy–Schwarz): no random unit vector beats it."""
    v_list, others = data
    diffs = torch.tensor([v_list], dtype=torch.float64)
    v = diffs.sum(0)
    p = closed_form_weights(diffs).double()
    if torch.linalg.vector_norm(v) == 0:
        assert torch.equal(p, torch.zeros_like(p))  # documented default: no steering
        return
    assert float(torch.linalg.vector_norm(p)) == pytest.approx(1.0, abs=1e-5)
    best = float(v @ p)
    assert best == pytest.approx(float(torch.linalg.vector_norm(v)), rel=1e-5, abs=1e-5)
    for u in others:
        u = torch.tensor(u, dtype=torch.float64)
        if torch.linalg.vector_norm(u) == 0:
            continue
        u = u / torch.linalg.vector_norm(u)
        assert float(v @ u) <= best + 1e-4 * (1 + abs(best))


def test_closed_form_sums_over_pairs_and_zero_default():
    d = torch.tensor([[3.0, 0.0], [1.0, -4.0]])  # v = (4, -4)
    assert torch.allclose(closed_form_weights(d), torch.tensor([1.0, -1.0]) / 2**0.5)
    assert torch.equal(closed_form_weights(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.zeros(2))
    assert torch.equal(closed_form_weights(torch.zeros(0, 3)), torch.zeros(3))


def test_select_top_by_absolute_weight():
    p = torch.tensor([0.1, -0.7, 0.0, 0.5, -0.5])
    assert select_top(p, 3) == [1, 3, 4]  # |−0.7| first; tie 0.5/−0.5 broken by index
    assert select_top(p, 10) == [1, 3, 4, 0]  # zero weights never selected


def test_logistic_solver_unit_norm_and_direction():
    g = torch.Generator().manual_seed(0)
    wins = torch.randn(40, 3, generator=g) + torch.tensor([2.0, 0.0, -1.0])
    losses = torch.randn(40, 3, generator=g)
    p = logistic_weights(wins, losses)
    assert float(torch.linalg.vector_norm(p)) == pytest.approx(1.0, abs=1e-5)
    assert p[0] > 0.5 and p[2] < -0.2 and abs(float(p[1])) < 0.4


def test_fit_profile_and_accuracy(backend):
    prof = fit_profile(backend, PAIRS, POOL, top_m=2)
    assert prof.num_pairs == 3 and len(prof.selected()) == 2
    p = prof.weights
    assert torch.allclose(p, closed_form_weights(prof.diffs))
    idx = select_top(p, 2)
    manual = ((prof.diffs[:, idx] @ p[idx]) > 0).float().mean()
    assert prof.accuracy(prof.wins, prof.losses) == pytest.approx(float(manual))
    assert prof.stats["train_accuracy"] == pytest.approx(float(manual))
    assert prof.stats["forwards"] == len(PAIRS)
    assert prof.evaluate(backend, PAIRS) == pytest.approx(float(manual))
    with pytest.raises(ValueError, match="top_m"):
        fit_profile(backend, PAIRS, POOL, top_m=5)


def test_online_add_and_remove_match_batch_fit(backend):
    full = fit_profile(backend, PAIRS, POOL, top_m=2)
    online = fit_profile(backend, PAIRS[:1], POOL, top_m=2)
    before = backend.forward_count
    assert online.add_pairs(backend, PAIRS[1:]) == 2
    assert backend.forward_count - before == 2  # the old pair is not rescored
    # the pairs were scored in other batches (1 + 2 against 3): float32 rounding of the forwards
    atol = drift_weights_atol(backend, PAIRS, float(full.v.norm()))
    assert float((online.weights - full.weights).abs().max()) <= atol < 0.05
    assert online.pair_ids == full.pair_ids
    assert online.add_pairs(backend, PAIRS[:1]) == 0  # already known: skipped
    online.remove_pair(PAIRS[2])
    two = fit_profile(backend, PAIRS[:2], POOL, top_m=2)
    assert float((online.weights - two.weights).abs().max()) <= drift_weights_atol(backend, PAIRS[:2],
                                                                                  float(two.v.norm()))
    online.remove_pair(0)
    assert online.pair_ids == [PAIRS[1].pair_id]
    with pytest.raises(ValueError, match="not in this profile"):
        online.remove_pair(PAIRS[0].pair_id)


def test_profile_round_trip(tmp_path, backend):
    prof = fit_profile(backend, PAIRS, POOL, top_m=3, solver="logistic")
    path = prof.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["num_pairs"] == 3 and data["steer_model"]["tokenizer_fingerprint"]
    back = DriftProfile.load(path)
    assert torch.equal(back.weights, prof.weights)  # the same W and L (JSON keeps float32 exactly), same solver
    assert [n for n, _, _ in back.selected()] == [n for n, _, _ in prof.selected()]
    assert back.pool == prof.pool and back.solver == "logistic"
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        DriftProfile.load(path)


def test_profile_from_another_model_is_rejected(backend, tiny_chat_tokenizer, stories):
    from tests.conftest import make_tiny_lm

    prof = fit_profile(backend, PAIRS[:1], POOL, top_m=2)
    other = make_tiny_lm(len(tiny_chat_tokenizer), hidden=16)
    with pytest.raises(ValueError, match="fitted with steering model"):
        prof.check_model(other, tiny_chat_tokenizer)
    with pytest.raises(ValueError, match="tokenizer differs"):
        prof.check_model(stories.model, stories.tokenizer)
    scaled = make_tiny_lm(len(tiny_chat_tokenizer))
    with torch.no_grad():
        scaled.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ValueError, match="weights differ"):
        prof.add_pairs(HFBackend(scaled, tiny_chat_tokenizer), PAIRS[1:])


def test_report_text_and_chart(tmp_path, backend):
    prof = fit_profile(backend, PAIRS, POOL, top_m=2)
    text = prof.report_text(n=2)
    u = prof.unit_preference()
    assert torch.allclose(u, prof.diffs.mean(0))
    top = POOL.names[int(u.argmax())]
    assert text.split("most preferred")[1].splitlines()[1].split()[0] == top
    png = prof.plot(tmp_path / "chart.png")
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _write(tmp_path, lines):
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return f


def test_fit_pairs_errors_name_the_line(tmp_path, caplog):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: missing field `rejected`"):
        fit_pairs(_write(tmp_path, [ok, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: field `chosen` must be a non-empty text"):
        fit_pairs(_write(tmp_path, [ok, ok, {"prompt": "p", "chosen": " ", "rejected": "b"}]))
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: not valid JSON"):
        fit_pairs(_write(tmp_path, ["{oops"]))
    pairs, skipped = fit_pairs(_write(tmp_path, [ok, {"prompt": "p", "chosen": "same", "rejected": "same"}, ok]))
    assert len(pairs) == 2 and skipped == 1
    assert "pairs.jsonl:2: chosen == rejected" in caplog.text
    with pytest.raises(ValueError, match="no usable pair"):
        fit_pairs(_write(tmp_path, [{"prompt": "p", "chosen": "x", "rejected": "x"}]))


def test_steer_identity_probe_on_a_large_embedding(tiny_tokenizer):
    """The probe's last index is numel − 1 exactly (a float32 linspace rounds 28311551 up, out of range)."""
    from personalign.personas.drift import steer_identity

    weight = torch.arange(28311552, dtype=torch.float32)  # SmolLM2's 49152 x 576 table, flattened

    class Stub:
        config = type("Cfg", (), {"_name_or_path": "stub", "model_type": "llama"})()

        def get_input_embeddings(self):
            return type("E", (), {"weight": weight.view(49152, 576)})()

    probe = steer_identity(Stub(), tiny_tokenizer)["embedding_probe"]
    assert len(probe) == 16 and probe[0] == 0.0 and probe[-1] == float(weight[-1])


def test_progress_and_a_long_fit_is_announced(backend, monkeypatch, caplog, capsys):
    """The bar counts pairs (with the time left); a fit whose first pair projects past the limit says
    how long it will take and what shortens it; the result is the same as without them."""
    import logging

    from personalign.personas import drift as drift_mod

    quiet = fit_profile(backend, PAIRS, POOL, top_m=2)
    monkeypatch.setattr(drift_mod, "LONG_FIT_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="personalign.personas.drift"):
        shown = fit_profile(backend, PAIRS, POOL, top_m=2, progress=True)
    err = capsys.readouterr().err
    assert f"{len(PAIRS)}/{len(PAIRS)}" in err and "pair" in err
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"fitting {len(PAIRS)} pairs over {len(POOL)} attributes will take about" in msg
    assert "--max-response-tokens" in msg
    assert torch.equal(shown.wins, quiet.wins) and torch.equal(shown.losses, quiet.losses)
