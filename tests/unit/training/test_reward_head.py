"""The linear Bradley–Terry reward head: the convex fit's optimality, save -> load as a
sequence-classification model -> the same rewards, and ARGS reading it with the preference."""

from __future__ import annotations

import torch

from personalign.eval.reward import load_reward_scorer
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
    assert torch.allclose(h, reward_features(tiny_lm, tok, seqs, batch_size=2), atol=1e-5)  # padding-free
    w = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(1))
    out = save_reward_classifier(tiny_lm, tok, w, tmp_path / "rm", meta={"note": "test"})
    assert (out / "reward_head.json").exists()
    scorer = load_reward_scorer(str(out))
    with torch.no_grad():
        for q, expect in zip(seqs, (h @ w).tolist()):
            r = scorer.model(input_ids=torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long))
            assert abs(float(r.logits[0, 0]) - expect) < 1e-4
    # ARGS, cached reward views holding the preference as their system message
    from personalign.eval.reward import RewardLMView

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
