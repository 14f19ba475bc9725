"""User models (paper Examples 1-3): formulas, explicit text embeddings, gradients, index, save/load."""

from __future__ import annotations

import logging

import pytest
import torch

from personalign.training.user_model import (
    UserIndex,
    UserModel,
    UserModelConfig,
    encode_user_text,
    load_user_model,
    save_user_model,
)
from tests.numerics import reduction_atol

D = 6


def make(kind: str, **kw) -> UserModel:
    fields = dict(kind=kind, num_users=4, hidden_size=D, user_tokens=3, init_std=0.1, seed=1)
    fields.update(kw)
    return UserModel(UserModelConfig(**fields))


def test_individual_is_generic_plus_offset():
    m = make("individual")
    with torch.no_grad():
        m.offsets.copy_(torch.randn_like(m.offsets))
    e = m.implicit(torch.tensor([0, 2, 4, 0]))
    assert e.shape == (4, 3, D)
    assert torch.equal(e[0], m.generic) and torch.equal(e[3], m.generic)
    assert torch.allclose(e[1], m.generic + m.offsets[1]) and torch.allclose(e[2], m.generic + m.offsets[3])


def test_individual_starts_at_generic():
    """Offsets start at 0: before training every user is the generic user."""
    m = make("individual")
    e = m.implicit(torch.arange(5))
    assert torch.equal(e, m.generic[None].expand(5, -1, -1))


@pytest.mark.parametrize("weighting", ["softmax", "linear"])
def test_cluster_formula(weighting):
    m = make("cluster", clusters=3, weighting=weighting)
    rows = torch.tensor([0, 1, 4])
    w = m.weights[rows]
    w = torch.softmax(w, -1) if weighting == "softmax" else w
    naive = torch.stack([sum(w[b, k] * m.centers[k] for k in range(3)) for b in range(3)])
    # a matrix product against a Python sum of the same 3 terms: one reduction's rounding
    assert float((m.implicit(rows) - naive).abs().max()) <= reduction_atol(3, float(naive.abs().max()))


def test_cluster_weightings_start_equal():
    a, b = make("cluster", weighting="softmax"), make("cluster", weighting="linear")
    want = b.implicit(torch.arange(5))
    assert float((a.implicit(torch.arange(5)) - want).abs().max()) <= reduction_atol(3, float(want.abs().max()))


def test_one_hot_cluster_weights_pick_a_center():
    m = make("cluster", clusters=3, weighting="linear")
    with torch.no_grad():
        m.weights.zero_()
        m.weights[2, 1] = 1.0
    assert torch.equal(m.implicit(torch.tensor([2]))[0], m.centers[1])


def test_uniform_same_for_all_and_may_be_empty():
    m = make("uniform")
    e = m.implicit(torch.arange(5))
    assert all(torch.equal(e[i], e[0]) for i in range(5))
    empty = make("uniform", user_tokens=0)
    assert empty.implicit(torch.arange(3)).shape == (3, 0, D)


def test_explicit_is_the_llm_input_embedding(tiny_lm, tiny_tokenizer):
    emb = tiny_lm.get_input_embeddings()
    m = UserModel.for_model(tiny_lm, kind="individual", num_users=2, user_tokens=2)
    ids = encode_user_text(tiny_tokenizer, "she is a little girl who likes the sea")
    assert ids == tuple(tiny_tokenizer("she is a little girl who likes the sea", add_special_tokens=False)["input_ids"])
    prefix = m.prefixes(torch.tensor([1, 0]), emb, [ids, ()])
    assert prefix[0].shape == (2 + len(ids), emb.weight.shape[1])
    assert torch.equal(prefix[0][:2], m.implicit(torch.tensor([1]))[0])  # concat(implicit, explicit)
    assert torch.equal(prefix[0][2:], emb.weight[list(ids)])
    assert prefix[1].shape == (2, emb.weight.shape[1])  # no text: implicit only
    assert encode_user_text(tiny_tokenizer, "  ") == () and encode_user_text(tiny_tokenizer, None) == ()


def test_for_model_matches_embedding_scale(tiny_lm):
    m = UserModel.for_model(tiny_lm, kind="uniform", user_tokens=200)
    std = float(tiny_lm.get_input_embeddings().weight.detach().std())
    assert m.config.hidden_size == tiny_lm.config.hidden_size
    assert float(m.shared.detach().std()) == pytest.approx(std, rel=0.1)


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_gradients_reach_only_batch_users_and_generic(kind):
    """A loss on users {2, 3} and user 0 moves e_0 / V and the rows 0, 2, 3 only."""
    m = make(kind, num_users=6)
    rows = torch.tensor([2, 3, 0, 0])
    (m.implicit(rows) ** 2).sum().backward()
    if kind == "individual":
        assert m.generic.grad is not None and float(m.generic.grad.abs().sum()) > 0
        touched = (m.offsets.grad.abs().sum((1, 2)) > 0).tolist()
        assert touched == [False, True, True, False, False, False]  # offsets of users 2, 3 (index row - 1)
    else:
        assert float(m.centers.grad.abs().sum()) > 0
        touched = (m.weights.grad.abs().sum(1) > 0).tolist()
        assert touched == [True, False, True, True, False, False, False]  # w_0, w_2, w_3


def test_row_out_of_range():
    with pytest.raises(ValueError, match="user rows must lie in 0..4"):
        make("individual").implicit(torch.tensor([5]))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(kind="individual", user_tokens=0), "`user_tokens` \\(T_u\\) must be >= 1 for a 'individual'"),
        (dict(kind="cluster", user_tokens=0), "`user_tokens` \\(T_u\\) must be >= 1 for a 'cluster'"),
        (dict(kind="uniform", user_tokens=-1), "`user_tokens` must be an integer >= 0 \\(T_u\\)"),
        (dict(kind="cluster", clusters=0), "`clusters` must be an integer >= 1 \\(K\\)"),
        (dict(kind="personal"), "`user_model` must be one of uniform, individual, cluster"),
        (dict(kind="cluster", weighting="max"), "`weighting` must be one of softmax, linear"),
        (dict(kind="uniform", hidden_size=0), "`hidden_size` must be an integer >= 1"),
    ],
)
def test_config_errors(fields, match):
    base = dict(kind="individual", num_users=2, hidden_size=D)
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        UserModelConfig(**base)


def test_index_strict_and_fallback(caplog):
    idx = UserIndex(["alice", "bob", 7])
    assert idx.row("bob", strict=True) == 2 and idx.row(7, strict=True) == 3 and idx.row("7", strict=True) == 3
    with pytest.raises(ValueError, match="`user_id` 'carol' is not in the user index"):
        idx.row("carol", strict=True)
    with caplog.at_level(logging.WARNING, logger="personalign.training.user_model"):
        assert idx.row("carol", strict=False) == 0
        assert idx.row("carol", strict=False) == 0
    assert sum("carol" in r.message for r in caplog.records) == 1  # logged once per id
    with pytest.raises(ValueError, match="must be unique"):
        UserIndex(["a", "a"])


def test_index_and_model_round_trip(tmp_path):
    idx = UserIndex(["x", "y"])
    idx.save(tmp_path / "users.json")
    again = UserIndex.load(tmp_path / "users.json")
    assert again.ids == ["x", "y"] and again.row("y", strict=True) == 2
    m = make("cluster")
    save_user_model(m, tmp_path)
    m2 = load_user_model(tmp_path)
    assert m2.config == m.config
    assert torch.equal(m2.implicit(torch.arange(5)), m.implicit(torch.arange(5)))
    with pytest.raises(ValueError, match="holds no user model"):
        load_user_model(tmp_path / "nope")
