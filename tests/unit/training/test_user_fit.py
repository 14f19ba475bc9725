"""A new user's P-DPO embedding fitted from feedback: the loss starts at ln 2, one step is Adam's step on
the P-DPO gradient computed from plain unbatched forwards, pieces of any size give the same fit, the
model is never touched, the fit learns the pair, and the stored form round-trips. Tiny fixed-init Llama."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.training.pdpo.data import PreferencePair, tokenize_pairs
from personalign.training.pdpo.loss import dpo_loss
from personalign.training.pdpo.user_fit import (
    EmbeddingFit,
    EmbeddingFitConfig,
    UserEmbedding,
    fit_user_embedding,
    generic_embedding,
)
from personalign.training.user_model import UserModel
from tests.conftest import make_tiny_lm
from tests.numerics import forward_atol
from tests.unit.training.test_pdpo_train import LONG, SHORT, naive_logp


def setup(tok, n_pairs: int = 3):
    lm = make_tiny_lm(len(tok))
    users = UserModel.for_model(lm, kind="individual", num_users=2, user_tokens=2)
    prompts = ["tell me a story", "a happy story about a dog", "the cat"]
    pairs = [PreferencePair(prompt=prompts[i % 3], chosen=SHORT, rejected=LONG) for i in range(n_pairs)]
    return lm, users, tokenize_pairs(pairs, tok, max_prompt_tokens=32, max_response_tokens=32)


def naive_loss(lm, pairs, e, e0, beta):
    """The fit's objective from one unbatched forward per sequence."""
    losses = []
    for p in pairs:
        pc, pr = naive_logp(lm, p.prompt_ids, p.chosen_ids, e), naive_logp(lm, p.prompt_ids, p.rejected_ids, e)
        with torch.no_grad():
            rc, rr = naive_logp(lm, p.prompt_ids, p.chosen_ids, e0), naive_logp(lm, p.prompt_ids, p.rejected_ids, e0)
        losses.append(dpo_loss(pc[None], pr[None], rc[None], rr[None], beta))
    return torch.cat(losses).mean()


def test_one_step_is_adams_step_on_the_pdpo_gradient(tiny_tokenizer):
    lm, users, pairs = setup(tiny_tokenizer)
    cfg = EmbeddingFitConfig(steps=1, lr=0.3)
    e0 = generic_embedding(users)
    emb, fit = fit_user_embedding(lm, users, pairs, config=cfg, tokens=1)  # one pair per piece
    # the loss before the step: policy = reference, so ln 2 (4 sequence log-probs enter each margin)
    assert abs(fit.losses[0] - math.log(2.0)) <= cfg.beta / 2 * 4 * forward_atol(lm, torch.tensor([30.0]))
    e = e0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(naive_loss(lm, pairs, e, e0, cfg.beta), [e])
    lr = cfg.lr * float(lm.get_input_embeddings().weight.detach().float().std())
    want = e0 - lr * g / (g.abs() + 1e-8)  # Adam's bias-corrected first step
    clear = g.abs() > 1e-3 * float(g.abs().max())  # coordinates whose gradient sign is not a rounding question
    assert clear.float().mean() > 0.9
    assert torch.allclose(emb.tensor[clear], want[clear], atol=1e-3 * lr)
    assert float((emb.tensor - e0).abs().max()) <= lr * (1 + 1e-5)


def test_pieces_of_any_size_give_the_same_fit(tiny_tokenizer):
    lm, users, pairs = setup(tiny_tokenizer, 4)
    cfg = EmbeddingFitConfig(steps=3, lr=0.3)
    _, whole = fit_user_embedding(lm, users, pairs, config=cfg)
    _, pieces = fit_user_embedding(lm, users, pairs, config=cfg, tokens=1)
    _, twos = fit_user_embedding(lm, users, pairs, config=cfg, tokens=2 * pieces.pair_tokens(0) + 1)
    assert whole.forwards == 1 + 3 and pieces.forwards == 4 * (1 + 3) and 1 + 3 < twos.forwards < pieces.forwards
    # each pair runs alone and the gradient is summed in pair order: the same arithmetic, bit for bit
    for other in (pieces, twos):
        assert other.losses == whole.losses
        assert torch.equal(other.e.detach(), whole.e.detach())


def test_fit_learns_the_pair_and_leaves_the_model_alone(tiny_tokenizer):
    lm, users, pairs = setup(tiny_tokenizer)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    emb, fit = fit_user_embedding(lm, users, pairs, config=EmbeddingFitConfig(steps=6, lr=0.5))
    assert fit.losses[-1] < fit.losses[0] - 0.05  # the user's choices became likelier than under e_0
    with torch.no_grad():
        final = float(naive_loss(lm, pairs, emb.tensor, generic_embedding(users), 0.5))
    assert final < math.log(2.0) - 0.05
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())  # frozen: same ops, same values
    assert all(p.grad is None for p in lm.parameters())
    assert emb.num_pairs == len(pairs) and emb.loss == fit.losses[-1]


def test_the_shift_from_e0_stays_in_its_trust_region(tiny_tokenizer):
    """A fit with a large step: every position's root-mean-square shift from ``e_0`` ends at most
    ``max_shift`` embedding stds away (the projection), where an unbounded fit goes further; inside the
    region nothing is projected (one small step equals the unbounded step)."""
    lm, users, pairs = setup(tiny_tokenizer)
    e0 = generic_embedding(users)
    std = float(lm.get_input_embeddings().weight.detach().float().std())

    def shift(cfg):
        emb, _ = fit_user_embedding(lm, users, pairs, config=cfg)
        return (emb.tensor - e0).pow(2).mean(-1).sqrt(), emb.tensor

    bounded, _ = shift(EmbeddingFitConfig(steps=8, lr=2.0, max_shift=0.5))
    free, _ = shift(EmbeddingFitConfig(steps=8, lr=2.0, max_shift=0))
    assert float(bounded.max()) <= 0.5 * std * (1 + 1e-5)
    assert float(free.max()) > 0.5 * std * 1.5  # the bound is what held it
    _, small = shift(EmbeddingFitConfig(steps=1, lr=0.1, max_shift=0.5))
    _, small_free = shift(EmbeddingFitConfig(steps=1, lr=0.1, max_shift=0))
    assert torch.equal(small, small_free)
    with pytest.raises(ValueError, match="max_shift"):
        EmbeddingFitConfig(max_shift=-1.0)


def test_user_embedding_round_trip_and_bad_input():
    t = torch.randn(3, 5)
    emb = UserEmbedding(t, num_pairs=4, loss=0.5)
    back = UserEmbedding.from_dict(emb.to_dict())
    assert torch.equal(back.tensor, t) and back.num_pairs == 4 and back.digest == emb.digest
    d = emb.to_dict()
    for bad, field in [({**d, "format": "x"}, "format"), ({**d, "shape": [3]}, "shape"),
                       ({**d, "data": "!!"}, "data"), ({**d, "shape": [2, 5]}, "data"),
                       ({**d, "num_pairs": -1}, "num_pairs"), ("text", "user_embedding")]:
        with pytest.raises(ValueError, match=field):
            UserEmbedding.from_dict(bad)
    nan = UserEmbedding(torch.full((1, 2), float("nan"))).to_dict()
    with pytest.raises(ValueError, match="not finite"):
        UserEmbedding.from_dict(nan)
    with pytest.raises(ValueError, match="steps"):
        EmbeddingFitConfig(steps=0)
    with pytest.raises(ValueError, match="at least one pair"):
        EmbeddingFit(make_tiny_lm(40), [], t, t)
