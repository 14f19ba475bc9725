"""PersRM: Eq. 9 golden values, the ln 2 identity, stage isolation, checkpoint round-trip, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from personalign.training.persrm import PersRM, persrm_loss, persrm_margins, token_features
from personalign.training.persrm.train import PersRMTrainConfig, read_pairs, train_persrm
from tests.conftest import make_tiny_lm
from tests.numerics import reduction_atol

PAIRS = [
    {"prompt": "tell me a story about a cat", "chosen": "the cat was happy .", "rejected": "the dog was sad .",
     "preference": "happy"},
    {"prompt": "tell me about the sea", "chosen": "the sea is blue and big .", "rejected": "the sea is cold .",
     "preference": "happy"},
    {"prompt": "what is the sun", "chosen": "a big star .", "rejected": "the sun is hot and red .",
     "preference": "concise"},
    {"prompt": "explain the moon", "chosen": "a small moon .", "rejected": "the moon is old and very small .",
     "preference": "concise"},
]


def _persrm(tok, seed: int | None = None) -> PersRM:
    rm = PersRM.create(make_tiny_lm(len(tok)), tok, name="tiny", lora_r=4)
    if seed is not None:  # move π_θ and the head away from their (identity) init
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in rm.named_parameters():
                if "lora_B" in n or n.startswith("head."):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return rm.eval()


def test_token_features_sum_to_log_ratio():
    """1ᵀφ = Δlog π for any Δh, W_a, Δlog π (the defining identity of our φ)."""
    g = torch.Generator().manual_seed(0)
    dh, W, dlp = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, generator=g)
    phi = token_features(dh, W, dlp)
    assert phi.shape == (3, 5, 16)
    # φ = c − (Σc − Δlog π)/D with c = Δh ⊙ W_a: two float32 sums of the D terms c, so the identity holds
    # to two reductions' rounding at the size of c
    atol = 2 * reduction_atol(16, float((dh * W).abs().max()))
    assert float((phi.sum(-1) - dlp).abs().max()) <= atol


def test_eq9_golden_hand_picked_logprobs():
    """Eq. 9 by hand. Chosen tokens: log π_θ = (−1, −2), log π_ref = (−1.5, −2.5) -> Σ log-ratio = 1.0.
    Rejected: log π_θ = (−3,), log π_ref = (−2,) -> −1.0. With w_p = 1 (stage 1), β = 0.5:
    margin = 0.5 (1 − (−1)) = 1, loss = ln(1 + e^−1) = 0.3132617.
    A second pair with D = 2 features Φ_w = (0.2, −0.4), Φ_l = (−0.1, 0.3), w_p = (2, −1), β = 0.5:
    margin = 0.5 (2·0.3 + (−1)(−0.7)) = 0.65; the batch loss is the mean of both."""
    D = 4
    g = torch.Generator().manual_seed(1)

    def phi_sum(lp_th, lp_ref):  # Σ_t φ(s_t, a_t) from the hand-picked log-probs (random Δh, W_a)
        dlp = torch.tensor(lp_th) - torch.tensor(lp_ref)
        return token_features(torch.randn(len(lp_th), D, generator=g), torch.randn(len(lp_th), D, generator=g),
                              dlp).sum(0)

    fw, fl = phi_sum([-1.0, -2.0], [-1.5, -2.5]), phi_sum([-3.0], [-2.0])
    loss = persrm_loss(torch.ones(1, D), fw[None], fl[None], beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert float(loss) == pytest.approx(0.3132617, abs=1e-6)
    w2 = torch.tensor([[2.0, -1.0]])
    m2 = persrm_margins(w2, torch.tensor([[0.2, -0.4]]), torch.tensor([[-0.1, 0.3]]), beta=0.5)
    assert float(m2) == pytest.approx(0.65, abs=1e-6)
    both = persrm_loss(torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([[0.5, 0.5], [0.2, -0.4]]),
                       torch.tensor([[-0.5, -0.5], [-0.1, 0.3]]), beta=0.5)
    assert float(both) == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.65))) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        persrm_loss(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), beta=-1.0)


def test_loss_is_ln2_when_policy_equals_reference(tiny_tokenizer):
    """A fresh LoRA adapter has B = 0, so π_θ = π_ref: every φ is 0 and L = ln 2 for any w_p."""
    rm = _persrm(tiny_tokenizer)
    tok = tiny_tokenizer
    prompts = [tok("tell me a story")["input_ids"], tok("the sun")["input_ids"]]
    resp = [tok("the cat was happy", add_special_tokens=False)["input_ids"], tok("hot", add_special_tokens=False)["input_ids"]]
    fw = rm.sequence_features(prompts, resp)
    fl = rm.sequence_features(prompts, resp[::-1])
    assert float(fw.detach().abs().max()) < 1e-5
    w = torch.randn(2, fw.shape[1])
    assert float(persrm_loss(w, fw, fl, beta=1.0)) == pytest.approx(math.log(2), abs=1e-6)


def test_sequence_features_match_teacher_forced_log_ratio(tiny_tokenizer):
    """With w_p = 1 the sequence reward is Σ_t log π_θ − log π_ref, computed by plain full forwards."""
    rm = _persrm(tiny_tokenizer, seed=3)
    tok = tiny_tokenizer
    p, r = tok("tell me a story")["input_ids"], tok("the cat was happy", add_special_tokens=False)["input_ids"]
    feats = rm.sequence_features([p], [r])
    ids = torch.tensor([p + r])

    def total(adapter: bool) -> float:
        if adapter:
            lp = torch.log_softmax(rm.lm(input_ids=ids).logits.float(), -1)
        else:
            with rm.lm.disable_adapter():
                lp = torch.log_softmax(rm.lm(input_ids=ids).logits.float(), -1)
        return sum(float(lp[0, len(p) + j - 1, a]) for j, a in enumerate(r))

    with torch.no_grad():
        expect = total(True) - total(False)
    assert abs(expect) > 1e-3
    assert float(feats.sum()) == pytest.approx(expect, abs=1e-4)


def _write_pairs(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_stage2_leaves_policy_untouched_and_stage1_leaves_backbone(tiny_tokenizer, tmp_path):
    rm = _persrm(tiny_tokenizer, seed=4)
    pairs = read_pairs(_write_pairs(tmp_path / "p.jsonl", PAIRS))
    lora0 = {n: p.detach().clone() for n, p in rm.lm.named_parameters() if "lora_" in n}
    base0 = {n: p.detach().clone() for n, p in rm.lm.named_parameters() if "lora_" not in n}
    head0 = {n: p.detach().clone() for n, p in rm.head.named_parameters()}
    cfg = PersRMTrainConfig(epochs=0, head_epochs=3, batch_size=2, head_lr=0.05, max_prompt_tokens=16,
                            max_response_tokens=8, chat_template=False)
    hist = train_persrm(rm, pairs, pairs[:2], cfg, progress=False)
    assert len(hist["stage2"]) == 3
    for n, p in rm.lm.named_parameters():
        ref = lora0.get(n, base0.get(n))
        assert torch.equal(p, ref), f"stage 2 changed {n}"
    assert any(not torch.equal(p, head0[n]) for n, p in rm.head.named_parameters()), "stage 2 did not train the head"
    # stage 1: LoRA moves, the backbone and the head do not
    head1 = {n: p.detach().clone() for n, p in rm.head.named_parameters()}
    cfg1 = PersRMTrainConfig(epochs=1, head_epochs=0, batch_size=2, lr=0.01, max_prompt_tokens=16,
                             max_response_tokens=8, chat_template=False)
    hist = train_persrm(rm, pairs, pairs[:2], cfg1, progress=False)
    assert len(hist["stage1"]) == 1 and 0.0 <= hist["stage1"][0]["accuracy"] <= 1.0
    assert any(not torch.equal(p, lora0[n]) for n, p in rm.lm.named_parameters() if "lora_" in n)
    for n, p in rm.lm.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base0[n]), f"stage 1 changed frozen {n}"
    for n, p in rm.head.named_parameters():
        assert torch.equal(p, head1[n])


def test_save_load_identical_rewards(tiny_tokenizer, tmp_path):
    rm = _persrm(tiny_tokenizer, seed=5)
    prompts, responses = ["tell me a story", "what is the sun"], ["the cat was happy .", "a big star ."]
    prefs = ["happy", "concise and very small"]
    before = rm.sequence_reward(prompts, responses, prefs, chat_template=False)
    rm.save(str(tmp_path / "ckpt"))
    loaded = PersRM.load(str(tmp_path / "ckpt"), make_tiny_lm(len(tiny_tokenizer)), tiny_tokenizer)
    after = loaded.sequence_reward(prompts, responses, prefs, chat_template=False)
    assert before == after
    assert max(abs(x) for x in before) > 1e-4
    torch.testing.assert_close(rm.preference_weights(prefs), loaded.preference_weights(prefs), atol=0, rtol=0)


def test_load_on_another_backbone_is_refused(tiny_tokenizer, tmp_path):
    rm = _persrm(tiny_tokenizer, seed=6)
    rm.save(str(tmp_path / "ckpt"))
    other = make_tiny_lm(len(tiny_tokenizer), hidden=48)
    with pytest.raises(ValueError, match="trained on backbone"):
        PersRM.load(str(tmp_path / "ckpt"), other, tiny_tokenizer)
    with pytest.raises(ValueError, match="not a PersRM checkpoint"):
        PersRM.load(str(tmp_path), other, tiny_tokenizer)


def test_pairs_without_preference_name_the_line(tmp_path):
    rows = [PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "preference"}]
    with pytest.raises(ValueError, match=r"p.jsonl:2: `preference` must be a non-empty string"):
        read_pairs(_write_pairs(tmp_path / "p.jsonl", rows))
    (tmp_path / "q.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: not valid JSON"):
        read_pairs(tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match="head_epochs"):
        PersRMTrainConfig(head_epochs=-1)


def test_gradient_accumulation_equals_a_larger_batch(tiny_tokenizer, tmp_path):
    """One optimizer step on 2 pairs: batch 2 ≡ batch 1 with 2 accumulation steps (mean loss)."""
    pairs = read_pairs(_write_pairs(tmp_path / "p.jsonl", PAIRS[:2]))
    params = []
    for bs, acc in ((2, 1), (1, 2)):
        rm = _persrm(tiny_tokenizer, seed=8)
        cfg = PersRMTrainConfig(epochs=1, head_epochs=0, batch_size=bs, grad_accum=acc, lr=0.01,
                                max_prompt_tokens=16, max_response_tokens=8, chat_template=False)
        train_persrm(rm, pairs, [], cfg, progress=False)
        params.append({n: p.detach().clone() for n, p in rm.lm.named_parameters() if "lora_" in n})
    moved = 0
    for n, p in params[0].items():
        # the two runs sum the same two pairs' gradients in another order (one batch against two
        # accumulated): the weights part by the float32 rounding of one AdamW step, ≲ lr · 1e-4
        torch.testing.assert_close(p, params[1][n], atol=0.01 * 1e-4, rtol=1e-5)
        moved += int(not torch.equal(p, _persrm(tiny_tokenizer, seed=8).lm.state_dict()[n]))
    assert moved > 0


@pytest.mark.parametrize("select", ["best", "last"])
def test_stage2_keeps_the_head_with_the_lowest_held_out_loss(tiny_tokenizer, tmp_path, select):
    """`best` keeps the head of the epoch with the lowest held-out loss (epoch 0 = before stage 2
    counts), `last` the last one's: the kept head reproduces that epoch's held-out loss."""
    from personalign.training.persrm.train import encode_pairs, evaluate_pairs

    rm = _persrm(tiny_tokenizer, seed=4)
    pairs = read_pairs(_write_pairs(tmp_path / "p.jsonl", PAIRS))
    cfg = PersRMTrainConfig(epochs=0, head_epochs=6, batch_size=2, head_lr=0.5, max_prompt_tokens=16,
                            max_response_tokens=8, chat_template=False, head_select=select)
    held = pairs[:2]
    hist = train_persrm(rm, pairs[2:], held, cfg, progress=False)
    losses = [e["loss"] for e in hist["stage2"]]
    final = evaluate_pairs(rm, encode_pairs(held, rm.tokenizer, cfg), stage=2, beta=cfg.beta)["loss"]
    if select == "best":
        all_losses = [hist["stage2_start"]["loss"], *losses]
        k = hist["stage2_selected"]
        assert all_losses[k] == min(all_losses) and k == all_losses.index(min(all_losses))
        assert final == pytest.approx(min(all_losses), abs=1e-5)
    else:
        assert hist["stage2_selected"] == 6 and "stage2_start" not in hist
        assert final == pytest.approx(losses[-1], abs=1e-5)
    from personalign.training.persrm.train import kept_stage2

    assert kept_stage2(hist)["loss"] == pytest.approx(final, abs=1e-5)  # what `train pad` reports
    with pytest.raises(ValueError, match="`head_select` must be"):
        PersRMTrainConfig(head_select="first")
