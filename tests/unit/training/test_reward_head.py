"""The linear Bradley–Terry reward head: the convex fit's optimality, save -> load as a
sequence-classification model -> the same rewards, and ARGS reading it with the preference."""

from __future__ import annotations

import torch

from personalign.methods.args import ARGSConfig, ARGSMethod
from personalign.personas.prompts import build_prompt_ids
from personalign.training.reward_head import (
    fit_reward_head,
    reward_features,
    reward_input_ids,
    save_reward_classifier,
)
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.reward import load_reward_scorer
from tests.numerics import assert_close_forward


def test_fit_is_the_penalized_bradley_terry_optimum():
    """At the returned w the gradient of mean softplus(−d·w) + l2‖w‖² vanishes (convex: the optimum),
    and separable data are fitted."""
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(6, generator=g)
    x = torch.randn(300, 6, generator=g)
    d = x * torch.sign(x @ true_w)[:, None]  # every pair agrees with true_w
    res = fit_reward_head(d[:200], d[200:], l2=1e-2)
    w = res.weight.double().requires_grad_(True)
    loss = torch.nn.functional.softplus(-(d[:200].double() @ w)).mean() + 1e-2 * (w @ w)
    (grad,) = torch.autograd.grad(loss, w)
    assert float(grad.norm()) < 1e-5
    assert (res.n_train, res.n_eval) == (200, 100)
    assert res.train_accuracy > 0.95 and res.eval_accuracy > 0.9
    assert float(torch.cosine_similarity(res.weight, true_w, dim=0)) > 0.9
    # contradictory pairs (each with its mirror) give w = 0: no preference is learnable
    mirror = fit_reward_head(torch.cat([d, -d]), l2=1e-3)
    assert float(mirror.weight.norm()) < 1e-6


def test_saved_classifier_scores_w_dot_h_and_serves_args_with_the_preference(tiny_lm, tiny_chat_tokenizer, tmp_path):
    tok = tiny_chat_tokenizer
    seqs = [reward_input_ids(tok, "tell me a story", "the cat was happy", "be kind"),
            reward_input_ids(tok, "tell me a story", "the dog", None)]
    assert seqs[0][:len(build_prompt_ids(tok, "tell me a story", system="be kind"))] == list(
        build_prompt_ids(tok, "tell me a story", system="be kind"))
    h = reward_features(tiny_lm, tok, seqs, batch_size=1)
    # padding-free: batched (padded) features are the lone ones up to float32 reordering of the forward
    assert_close_forward(reward_features(tiny_lm, tok, seqs, batch_size=2), h, tiny_lm)
    w = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(1))
    out = save_reward_classifier(tiny_lm, tok, w, tmp_path / "rm", meta={"note": "test"})
    assert (out / "reward_head.json").exists()
    scorer = load_reward_scorer(str(out))
    with torch.no_grad():
        for q, expect in zip(seqs, (h @ w).tolist()):
            r = scorer.model(input_ids=torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long))
            assert abs(float(r.logits[0, 0]) - expect) < 1e-4
    # ARGS, cached reward views holding the preference as their system message
    from personalign.views.reward import RewardLMView

    backend = HFBackend(tiny_lm, tok)
    backend.add_model("reward", RewardLMView.from_classifier(scorer.model, backend.vocab_size), scorer.tokenizer)
    method = ARGSMethod(ARGSConfig(k=3, reward_preference=True), reward_key="reward")
    req = Request(prompt="tell me a story", preference="be kind")
    views = method.build_views(req, method.config_for(req), backend, True)
    assert views[1].prompt_ids == build_prompt_ids(tok, "tell me a story", system="be kind")
    assert views[0].prompt_ids == build_prompt_ids(tok, "tell me a story")
    import pytest

    with pytest.raises(ValueError, match="preference"):
        method.build_views(Request(prompt="x"), method.config, backend, True)
    with pytest.raises(ValueError, match="cached reward path"):
        ARGSMethod(ARGSConfig(reward_preference=True), scorer=scorer).build_views(req, ARGSConfig(reward_preference=True),
                                                                                  backend, True)


def test_train_rm_cli_writes_a_loadable_reward_model_and_names_bad_lines(tiny_lm, tiny_chat_tokenizer, tmp_path, capsys):
    import json

    from personalign.cli.main import main

    model_dir = tmp_path / "lm"
    tiny_lm.save_pretrained(model_dir)
    tiny_chat_tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"question {i}", "chosen": "the cat was happy", "rejected": "the dog", "preference": "be kind"}
            for i in range(10)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "rm", "--pairs", str(pairs), "--model", str(model_dir), "--out", str(tmp_path / "rm"),
               "--preference-in-prompt", "--no-progress", "--eval-fraction", "0.2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_train"], report["n_eval"]) == (8, 2)
    assert report["train_accuracy"] == 1.0 and report["eval_accuracy"] == 1.0  # one answer always wins
    assert load_reward_scorer(str(tmp_path / "rm")).model.config.num_labels == 1
    del rows[3]["preference"]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "rm", "--pairs", str(pairs), "--model", str(model_dir), "--out", str(tmp_path / "rm2"),
               "--preference-in-prompt", "--no-progress"])
    assert rc == 2 and "pairs.jsonl:4" in capsys.readouterr().err and not (tmp_path / "rm2").exists()
    # --lora: the linear fit, then the fine-tune from it; bad settings are refused before any loading
    rows[3]["preference"] = "be kind"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "rm", "--pairs", str(pairs), "--model", str(model_dir), "--out", str(tmp_path / "rm3"),
               "--preference-in-prompt", "--no-progress", "--lora", "--epochs", "1", "--pairs-per-step", "4"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["linear"]["train_accuracy"] == 1.0 and report["lora"]["epochs"] == 1
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert report["history"][0]["eval_accuracy"] == report["linear"]["eval_accuracy"]  # starts at the linear fit
    assert load_reward_scorer(str(tmp_path / "rm3")).model.config.num_labels == 1
    rc = main(["train", "rm", "--pairs", str(pairs), "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "rm4"),
               "--lora", "--epochs", "0"])
    assert rc == 2 and "`epochs` must be an integer >= 1" in capsys.readouterr().err


def test_lora_fine_tune_learns_from_zero_leaves_the_model_alone_and_saves_what_it_scores(tiny_lm, tiny_chat_tokenizer,
                                                                                        tmp_path):
    """From a zero head, the LoRA fine-tune learns a consistent preference (train and held-out); the
    input model is untouched; the saved classifier scores exactly w·h of the merged model."""
    import pytest

    from personalign.training.reward_head import RewardLoRAConfig, train_reward_lora

    tok = tiny_chat_tokenizer
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    pairs = [(reward_input_ids(tok, f"question {i}", "the cat was happy"), reward_input_ids(tok, f"question {i}", "the dog"))
             for i in range(12)]
    cfg = RewardLoRAConfig(epochs=4, lr=5e-3, head_lr=5e-2, batch_size=4, seed=0)
    out = train_reward_lora(tiny_lm, tok, pairs[:9], pairs[9:], cfg, progress=False)
    assert [h["epoch"] for h in out.history] == [0, 1, 2, 3, 4]
    assert out.history[0]["eval_accuracy"] == 0.0  # zero head: no margin, no correct pair
    assert out.train_accuracy == 1.0 and out.eval_accuracy == 1.0
    assert out.history[-1]["train_loss"] < out.history[1]["train_loss"]
    assert all(torch.equal(v, tiny_lm.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, out.model.state_dict()[k]) for k, v in before.items())  # the adapter was merged
    save_reward_classifier(out.model, tok, out.weight, tmp_path / "rm")
    scorer = load_reward_scorer(str(tmp_path / "rm"))
    seqs = [q for p in pairs for q in p][:4]
    expect = reward_features(out.model, tok, seqs) @ out.weight
    with torch.no_grad():
        for q, e in zip(seqs, expect.tolist()):
            r = scorer.model(input_ids=torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long))
            assert abs(float(r.logits[0, 0]) - e) < 1e-4
    with pytest.raises(ValueError, match="`epochs` must be an integer >= 1"):
        RewardLoRAConfig(epochs=0)
    with pytest.raises(ValueError, match="`lr` must be a finite number > 0"):
        RewardLoRAConfig(lr=0)
    with pytest.raises(ValueError, match="init_weight"):
        train_reward_lora(tiny_lm, tok, pairs, [], cfg, init_weight=torch.zeros(3), progress=False)
