"""P-DPO on a model: ln 2 at the start, alpha = 1 + empty uniform == vanilla DPO, gradient locality,
save -> load -> same log-probs, bad input. Tiny fixed-init Llama (fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from personalign.training.pdpo.checkpoint import load_checkpoint
from personalign.training.pdpo.data import PreferencePair, read_training_pairs, tokenize_pairs, write_pairs
from personalign.training.pdpo.loss import dpo_loss, pdpo_loss, personalized_rm_loss
from personalign.training.pdpo.model import PersonalizedLM, PersonalizedRewardModel
from personalign.training.pdpo.train import PDPOTrainConfig, train_pdpo
from personalign.training.user_model import UserIndex, UserModel
from personalign.views.loading import LoadedModel
from tests.conftest import make_tiny_lm
from tests.numerics import assert_close_forward, forward_atol

LONG, SHORT = "the cat is very happy and the dog is very sad", "the cat"


def make_pairs(n: int = 12, users: int = 3) -> list[PreferencePair]:
    out = []
    for i in range(n):
        u = str(1 + i % users)
        c, r = (SHORT, LONG) if u == str(users) else (LONG, SHORT)
        out.append(PreferencePair(prompt="tell me a story" if i % 2 else "a happy story about a dog", chosen=c,
                                  rejected=r, user_id=u, group="minority" if u == str(users) else "majority"))
    return out


def tokenized(tok, pairs):
    return tokenize_pairs(pairs, tok, max_prompt_tokens=32, max_response_tokens=32)


def lora(model, seed: int = 0, perturb: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    if perturb:  # make the policy differ from the reference (lora_B starts at 0)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn_like(p))
    return lm


def naive_logp(model, prompt, response, prefix=None) -> torch.Tensor:
    """Unbatched teacher forcing with input ids (or [prefix | embeds] when a prefix is given)."""
    ids = torch.tensor([list(prompt) + list(response)])
    if prefix is None:
        logits = model(input_ids=ids).logits
    else:
        emb = model.get_input_embeddings()(ids)
        logits = model(inputs_embeds=torch.cat([prefix[None], emb], 1)).logits[:, prefix.shape[0]:]
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    return lp[torch.arange(len(tgt)), tgt][len(prompt) - 1:].sum()


def test_initial_loss_is_ln2(tiny_tokenizer):
    """At start the LoRA update is 0 and the empty uniform user model adds nothing: policy = reference."""
    lm = lora(make_tiny_lm(len(tiny_tokenizer)))
    policy = PersonalizedLM(lm, UserModel.for_model(lm, kind="uniform", user_tokens=0, num_users=3))
    batch = tokenized(tiny_tokenizer, make_pairs(6))
    o = policy(batch, torch.tensor([1, 2, 3, 1, 2, 3]), generic=True)
    for alpha in (0.0, 0.5, 1.0):
        loss = pdpo_loss(o["user_chosen"], o["user_rejected"], o["generic_chosen"], o["generic_rejected"],
                         o["reference_chosen"], o["reference_rejected"], beta=0.5, alpha=alpha)
        # −log σ(β·m) at m = 0: the margin m is a difference of sequence log-probs from separately
        # batched forwards (float32 bound each), and the loss moves by at most β/2 per unit of m
        atol = 0.5 * 0.5 * 4 * forward_atol(lm, o["reference_chosen"])
        assert float((loss - math.log(2.0)).abs().max()) <= atol


def test_alpha_one_empty_uniform_is_vanilla_dpo(tiny_tokenizer):
    """P-DPO(alpha=1, empty uniform) through the batched soft-prompt path == DPO from plain unbatched forwards."""
    lm = lora(make_tiny_lm(len(tiny_tokenizer)), perturb=True)
    policy = PersonalizedLM(lm, UserModel.for_model(lm, kind="uniform", user_tokens=0, num_users=3))
    batch = tokenized(tiny_tokenizer, make_pairs(6))
    o = policy(batch, torch.tensor([1, 2, 3, 1, 2, 3]), generic=False)
    got = pdpo_loss(o["user_chosen"], o["user_rejected"], None, None, o["reference_chosen"],
                    o["reference_rejected"], beta=0.5, alpha=1.0)
    with torch.no_grad():
        pc = torch.stack([naive_logp(lm, p.prompt_ids, p.chosen_ids) for p in batch])
        pr = torch.stack([naive_logp(lm, p.prompt_ids, p.rejected_ids) for p in batch])
        with lm.disable_adapter():
            rc = torch.stack([naive_logp(lm, p.prompt_ids, p.chosen_ids) for p in batch])
            rr = torch.stack([naive_logp(lm, p.prompt_ids, p.rejected_ids) for p in batch])
    want = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert not torch.allclose(pc, rc)  # the adapter matters, so the check is not vacuous
    # batched soft-prompt forwards against unbatched ones: 4 sequence log-probs, each to the float32
    # bound, enter the margin; the DPO loss moves by at most β/2 per unit of margin
    atol = 0.5 * 0.5 * 4 * forward_atol(lm, torch.cat([pc, pr]))
    assert float((got - want).abs().max()) <= atol


def test_soft_prompt_logps_match_naive(tiny_tokenizer):
    lm = lora(make_tiny_lm(len(tiny_tokenizer)), perturb=True)
    users = UserModel.for_model(lm, kind="individual", num_users=3, user_tokens=2)
    with torch.no_grad():
        users.offsets.copy_(0.3 * torch.randn_like(users.offsets))
    policy = PersonalizedLM(lm, users)
    batch = tokenized(tiny_tokenizer, make_pairs(3))
    rows = torch.tensor([1, 2, 3])
    got = policy.user_logps(batch, rows)
    with torch.no_grad():
        pre = users.implicit(rows)
        want = torch.stack([naive_logp(lm, p.prompt_ids, p.chosen_ids, pre[i]) for i, p in enumerate(batch)]
                           + [naive_logp(lm, p.prompt_ids, p.rejected_ids, pre[i]) for i, p in enumerate(batch)])
    assert_close_forward(got, want, lm)  # sequence log-probs, batched against one at a time


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_gradients_reach_only_batch_users_and_generic(tiny_tokenizer, kind):
    lm = lora(make_tiny_lm(len(tiny_tokenizer)), perturb=True)
    users = UserModel.for_model(lm, kind=kind, num_users=5, user_tokens=2, clusters=3)
    policy = PersonalizedLM(lm, users)
    batch = tokenized(tiny_tokenizer, make_pairs(2, users=3))  # users "1", "2"
    rows = torch.tensor([1, 3])  # map them to rows 1 and 3
    o = policy(batch, rows, generic=True)
    pdpo_loss(o["user_chosen"], o["user_rejected"], o["generic_chosen"], o["generic_rejected"],
              o["reference_chosen"], o["reference_rejected"], beta=0.5, alpha=0.5).mean().backward()
    if kind == "individual":
        assert float(users.generic.grad.abs().sum()) > 0  # e_0
        assert (users.offsets.grad.abs().sum((1, 2)) > 0).tolist() == [True, False, True, False, False]
    else:
        assert float(users.centers.grad.abs().sum()) > 0
        assert (users.weights.grad.abs().sum(1) > 0).tolist() == [True, True, False, True, False, False]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in lm.named_parameters() if "lora" in n)
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora" not in n)  # the base stays frozen


def test_train_save_load_same_logprobs(tiny_tokenizer, tmp_path):
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    cfg = PDPOTrainConfig(user_model="individual", user_tokens=2, learning_rate=5e-2, batch_size=4, grad_accum=2,
                          epochs=2, max_prompt_tokens=32, max_response_tokens=32)
    pairs = make_pairs(16)
    eval_pairs = make_pairs(6) + [PreferencePair(prompt="tell me a story", chosen=LONG, rejected=SHORT, user_id="new")]
    res = train_pdpo(base, pairs, cfg, eval_pairs=eval_pairs, out=tmp_path / "ck", progress=False)
    assert res.history[-1]["step"] == 4  # 16 pairs / (4 x 2 accumulated) x 2 epochs
    assert res.history[-1]["n_generic"] == 1 and res.history[-1]["n_top"] == 6
    assert {"accuracy_top", "accuracy_generic", "accuracy_avg/majority", "accuracy_avg/minority"} <= set(res.history[-1])
    record = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert record["objective"] == "pdpo" and record["base_model"]["name"] == "tiny"
    assert record["train"]["user_tokens"] == 2
    assert (tmp_path / "ck" / "adapter").is_dir() and (tmp_path / "ck" / "metrics.jsonl").is_file()

    batch = tokenized(tiny_tokenizer, make_pairs(3))
    rows = res.index.rows([p.user_id for p in batch], strict=True)
    res.model.eval()
    with torch.no_grad():
        want = res.model.user_logps(batch, rows)
        ref = res.model.reference_logps([p.prompt_ids for p in batch], [p.chosen_ids for p in batch])
    assert float(res.model.users.offsets.detach().abs().sum()) > 0  # trained: the check is not vacuous
    for merge in (False, True):
        # unmerged: the same weights and ops on the same batch, bit for bit; merged: W + s·BA is
        # rounded into new weights, so the forwards agree to the float32 bound
        ck = load_checkpoint(tmp_path / "ck", make_tiny_lm(len(tiny_tokenizer)), name="tiny", merge=merge)
        assert ck.index.ids == res.index.ids
        with torch.no_grad():
            got = PersonalizedLM(ck.lm, ck.users).user_logps(batch, rows)
        if merge:
            assert_close_forward(got, want, ck.lm)
        else:
            assert torch.equal(got, want)
    ck = load_checkpoint(tmp_path / "ck", make_tiny_lm(len(tiny_tokenizer)), name="tiny")
    with torch.no_grad():
        assert torch.equal(PersonalizedLM(ck.lm, ck.users).reference_logps(
            [p.prompt_ids for p in batch], [p.chosen_ids for p in batch]), ref)


def test_mismatched_base_model(tiny_tokenizer, tmp_path):
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    train_pdpo(base, make_pairs(4), PDPOTrainConfig(user_tokens=1, batch_size=4, epochs=1), out=tmp_path / "ck",
               progress=False)
    other = make_tiny_lm(len(tiny_tokenizer))
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.01)
    with pytest.raises(ValueError, match="was trained on base model 'tiny'.*embedding_sha256"):
        load_checkpoint(tmp_path / "ck", other, name="other")
    with pytest.raises(ValueError, match="hidden_size"):
        load_checkpoint(tmp_path / "ck", make_tiny_lm(len(tiny_tokenizer), hidden=16), name="small")


def test_unknown_user_at_training_is_an_error(tiny_tokenizer):
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    with pytest.raises(ValueError, match="`user_id` '3' is not in the user index"):
        train_pdpo(base, make_pairs(6), PDPOTrainConfig(user_tokens=1), user_ids=["1", "2"], progress=False)
    no_user = [PreferencePair(prompt="a story", chosen=LONG, rejected=SHORT, user_id=None)]
    with pytest.raises(ValueError, match="`user_id` is required"):
        train_pdpo(base, no_user, PDPOTrainConfig(user_tokens=1), progress=False)


def test_reward_model_soft_prompt_starts_at_ln2_and_linear_head(tiny_tokenizer):
    lm = lora(make_tiny_lm(len(tiny_tokenizer)))
    users = UserModel.for_model(lm, kind="individual", num_users=3, user_tokens=2)
    rm = PersonalizedRewardModel(lm, users, head="soft_prompt")
    batch = tokenized(tiny_tokenizer, make_pairs(3))
    rows = torch.tensor([1, 2, 3])
    prompts, chosen, rejected = [p.prompt_ids for p in batch], [p.chosen_ids for p in batch], [p.rejected_ids for p in batch]
    loss = personalized_rm_loss(rm(prompts, chosen, rows), rm(prompts, rejected, rows), None, None, alpha=1.0)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))  # zero value head: r = 0
    lin = PersonalizedRewardModel(lm, UserModel.for_model(lm, kind="individual", num_users=3, user_tokens=1), "linear")
    r = lin(prompts, chosen, rows)
    with torch.no_grad():
        out = lm(input_ids=torch.tensor([list(prompts[0]) + list(chosen[0])]), output_hidden_states=True)
        want = (out.hidden_states[-1][0, -1] * lin.users.implicit(torch.tensor([1]))[0, 0]).sum()
    assert float(r[0].detach()) == pytest.approx(float(want), abs=1e-5)
    with pytest.raises(ValueError, match="`user_tokens` must be 1"):
        PersonalizedRewardModel(lm, users, head="linear")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(alpha=1.5), "`alpha` must be a number in \\[0, 1\\]"),
        (dict(alpha=-0.1), "`alpha` must be a number in \\[0, 1\\]"),
        (dict(beta=0.0), "`beta` must be a finite number > 0"),
        (dict(beta=-2.0), "`beta` must be a finite number > 0"),
        (dict(user_model="individual", user_tokens=0), "`user_tokens` \\(T_u\\) must be >= 1 for a 'individual'"),
        (dict(user_model="cluster", user_tokens=0), "`user_tokens` \\(T_u\\) must be >= 1 for a 'cluster'"),
        (dict(user_model="cluster", clusters=0), "`clusters` must be an integer >= 1"),
        (dict(loss="kto"), "`loss` must be one of dpo, ipo"),
        (dict(batch_size=0), "`batch_size` must be an integer >= 1"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        PDPOTrainConfig(**fields)


def test_pairs_file_errors(tmp_path):
    p = tmp_path / "pairs.jsonl"
    write_pairs(make_pairs(2), p)
    assert read_training_pairs(p)[0].user_id == "1"
    p.write_text('{"prompt": "x", "chosen": "a", "rejected": "b", "user_id": 3}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2: `chosen` must be a non-empty string"):
        read_training_pairs(p)
    p.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1: `user_id` is required"):
        read_training_pairs(p)
    assert read_training_pairs(p, require_user=False)[0].user_id is None
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1: not valid JSON"):
        read_training_pairs(p)
    p.write_text('{"prompt": "x", "chosen": "a", "rejected": "b", "user_id": 1, "score": 3}\n')
    with pytest.raises(ValueError, match="unknown field"):
        read_training_pairs(p)
    # the TRL layout of eval.datasets (preference text included) is read; `preference` is not used
    p.write_text('{"prompt": "x", "chosen": "a", "rejected": "b", "user_id": "P1A", "user_text": "t", "preference": "t"}\n')
    assert read_training_pairs(p) == [PreferencePair(prompt="x", chosen="a", rejected="b", user_id="P1A", user_text="t")]
    with pytest.raises(ValueError, match="does not exist"):
        read_training_pairs(tmp_path / "missing.jsonl")


def test_index_of_training_users_is_first_appearance_order(tiny_tokenizer):
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    res = train_pdpo(base, make_pairs(6)[::-1], PDPOTrainConfig(user_tokens=1, batch_size=6, epochs=1), progress=False)
    assert isinstance(res.index, UserIndex) and res.index.ids == ["3", "2", "1"]


def test_end_token(tiny_tokenizer, tmp_path):
    """Responses end with the tokenizer's EOS, or `end_token_id`, which then also stops generation."""
    pairs = make_pairs(2)
    eos = tiny_tokenizer.eos_token_id
    assert tokenized(tiny_tokenizer, pairs)[0].chosen_ids[-1] == eos
    t = tokenize_pairs(pairs, tiny_tokenizer, max_prompt_tokens=32, max_response_tokens=32, end_token_id=7)
    assert t[0].chosen_ids[-1] == 7 and t[0].rejected_ids[-1] == 7
    base = LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, name="tiny")
    train_pdpo(base, pairs, PDPOTrainConfig(user_tokens=1, batch_size=2, epochs=1, end_token_id=7),
               out=tmp_path / "ck", progress=False)
    from personalign.assembly import Resources, build_backend
    from personalign.decoding.stopping import eos_ids_of

    backend = build_backend(Resources(model=LoadedModel(model=make_tiny_lm(len(tiny_tokenizer)), tokenizer=tiny_tokenizer,
                                                        name="tiny"), pdpo_checkpoint=str(tmp_path / "ck")), ["pdpo"])
    assert {eos, 7} <= eos_ids_of(tiny_tokenizer, backend.models["main"])
    with pytest.raises(ValueError, match="`end_token_id` must be a token id <"):
        train_pdpo(base, pairs, PDPOTrainConfig(user_tokens=1, end_token_id=10_000), progress=False)
