"""Any Hugging Face causal LM: the architecture battery (``tests/architectures.py``) through the engine.

For each architecture, a tiny fixed-seed model built in-process:

* greedy ``base`` on a batch of three prompts of different lengths (one shorter than the sliding
  window, two running past it) equals ``model.generate`` on each prompt alone, token for token (up to
  a near-tie, ``tests.numerics.assert_greedy_matches``);
* every registered method runs a few steps and returns valid ids;
* the LoRA targets cover every attention and MLP projection the architecture has (fused ones too);
* a reward model trained on it (``save_reward_classifier``) loads, scores, and serves the cached
  reward views of ``args``.

Per layer type (full, sliding, hybrid), a multi-view method whose caches roll back (Persona-judge's
block schedule) and the server's cross-batch merge (``step_many``) equal fresh prefills. Layer types
the engine cannot mask per row are refused at load time with an error naming them.
"""

from __future__ import annotations

import logging

import pytest
import torch

from personalign import METHODS, HFBackend, LoadedModel, Request, SamplingConfig, generate, get_method
from personalign.eval.bench import bench_method
from personalign.personas.prompts import build_prompt_ids
from personalign.training.lora import lora_targets, projection_names
from personalign.types import ViewSpec
from tests.architectures import WINDOW, battery, unsupported
from tests.conftest import make_tokenizer
from tests.numerics import assert_close_logprobs, assert_greedy_matches, forward_atol

ARCHS = {a.name: a for a in battery()}
PROMPTS = ["the sun", "tell me a story about a cat and a dog", "once upon a time there was a little girl and a boy ."]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def models(tok):
    built: dict[str, object] = {}

    def get(name):
        if name not in built:
            built[name] = ARCHS[name].make(len(tok))
        return built[name]
    return get


def _generate_alone(model, ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    lps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    margins = [float(t[0] - t[1]) for t in (lp.topk(2).values for lp in lps)]
    atol = 2 * max(forward_atol(model, lp, tokens=len(ids) + n) for lp in lps)
    return out.sequences[0, len(ids):].tolist(), margins, atol


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_base_equals_generate_past_the_window(name, tok, models):
    model = models(name)
    n = 10
    outs = generate(get_method("base")(), [Request(prompt=p) for p in PROMPTS], HFBackend(model, tok),
                    max_new_tokens=n, chat_template=False)
    lengths = []
    for p, o in zip(PROMPTS, outs):
        ids = list(build_prompt_ids(tok, p, chat_template=False))
        lengths.append(len(ids))
        ref, margins, atol = _generate_alone(model, ids, n)
        assert o.prompt_token_ids == ids
        assert_greedy_matches(o.token_ids, ref, margins, atol)
    # one prompt starts inside the window and runs past it while decoding; another starts past it
    assert min(lengths) < WINDOW < max(lengths)


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_method_runs_and_returns_valid_ids(name, tok, models):
    main = LoadedModel(model=models(name), tokenizer=tok, name=name)
    reqs = [Request(prompt="tell me a story about a cat and a dog and a bird", preference="very funny"),
            Request(prompt="why ?", preference="formal and concise")]
    for method_name in METHODS.names():
        method, backend, _ = bench_method(method_name, main, HFBackend(main.model, tok))
        outs = generate(method, reqs, backend, max_new_tokens=4, ignore_eos=True,
                        sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(0))
        for o in outs:
            assert len(o.token_ids) == 4 and all(0 <= t < len(tok) for t in o.token_ids), (method_name, o)


# Projections each architecture must get LoRA on (fused ones included); nothing else.
EXPECTED_PROJECTIONS = {
    "Llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "Phi-3 (sliding window)": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "GPT-2": {"c_attn", "c_proj", "c_fc"},
    "GPT-NeoX": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "Falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "OPT": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "BLOOM": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "Mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},  # experts are fused 3-D weights; the router is left out
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_lora_targets_are_the_architectures_projections(name, models, caplog):
    model = models(name)
    with caplog.at_level(logging.INFO, logger="personalign.training.lora"):
        targets = lora_targets(model)
    assert targets and "lm_head" not in targets
    assert any("LoRA targets" in r.message for r in caplog.records)  # the choice is logged
    if name in EXPECTED_PROJECTIONS:
        assert set(targets) == EXPECTED_PROJECTIONS[name], targets
    with pytest.raises(ValueError, match=r"are not projections of .*its projections are"):
        lora_targets(model, [targets[0], "not_a_module"])  # a partial match is an error, never silent


# the architectures whose trainers failed or silently covered part of the model with Llama's names
TRAINED = ["Phi-3 (sliding window)", "OLMo-2", "Cohere", "Granite", "GPT-2", "GPT-NeoX", "Falcon", "OPT", "Gemma-3"]


@pytest.mark.parametrize("name", TRAINED)
def test_trainers_put_lora_on_every_projection_and_store_them(name, tok, models, tmp_path):
    """PAD's PersRM (``train pad``), P-DPO (``train pdpo``) and the reward LoRA (``train rm --lora``) train
    one step on each architecture, with LoRA on exactly its projections (fused ones too), stored with
    the PersRM and the P-DPO checkpoint."""
    import copy
    import json

    from personalign.training.pdpo.data import PreferencePair
    from personalign.training.pdpo.train import PDPOTrainConfig, train_pdpo
    from personalign.training.persrm import PersRM
    from personalign.training.persrm.train import PersRMTrainConfig, train_persrm
    from personalign.training.reward_head import RewardLoRAConfig, reward_input_ids, train_reward_lora

    model = models(name)
    want = set(projection_names(model))
    if name in EXPECTED_PROJECTIONS:
        assert want == EXPECTED_PROJECTIONS[name]
    rm = PersRM.create(copy.deepcopy(model), tok, name=name)
    assert set(rm.config.target_modules) == want
    assert {n.rsplit(".", 2)[-2] for n, _ in rm.lm.named_modules() if n.endswith("lora_A")} == want
    pairs = [PreferencePair(prompt="tell me a story", chosen="the cat was happy .", rejected="no .", preference=p)
             for p in ("happy", "concise")]
    train_persrm(rm, pairs, [], PersRMTrainConfig(epochs=1, head_epochs=1, batch_size=2, max_prompt_tokens=16,
                                                  max_response_tokens=8, chat_template=False), progress=False)
    rm.save(str(tmp_path / "persrm"))
    assert set(PersRM.read_config(str(tmp_path / "persrm")).target_modules) == want

    users = [PreferencePair(prompt="tell me a story", chosen="the cat was happy", rejected="no", user_id=u)
             for u in ("a", "b")] * 2
    base = LoadedModel(model=copy.deepcopy(model), tokenizer=tok, name=name)
    cfg = PDPOTrainConfig(user_tokens=2, batch_size=2, epochs=1, max_prompt_tokens=16, max_response_tokens=8)
    train_pdpo(base, users, cfg, out=tmp_path / "pdpo", progress=False)
    assert set(json.loads((tmp_path / "pdpo" / "config.json").read_text())["lora_targets"]) == want

    seqs = [(reward_input_ids(tok, "tell me", "the cat was happy ."), reward_input_ids(tok, "tell me", "no ."))]
    out = train_reward_lora(model, tok, seqs, [], RewardLoRAConfig(epochs=1, batch_size=1), progress=False)
    assert set(out.lora_targets) == want


@pytest.mark.parametrize("name", list(ARCHS))
def test_reward_model_saves_loads_scores_and_serves_cached_views(name, tok, models, tmp_path):
    from personalign.methods.args import ARGSConfig, ARGSMethod
    from personalign.training.reward_head import save_reward_classifier
    from personalign.views.reward import (
        BackboneRewardModel,
        HFRewardScorer,
        RewardLMView,
        load_reward_model,
    )

    model = models(name)
    w = torch.randn(model.get_input_embeddings().embedding_dim, generator=torch.Generator().manual_seed(0))
    save_reward_classifier(model, tok, w, tmp_path / "rm")
    rm, rm_tok = load_reward_model(str(tmp_path / "rm"))
    scorer = HFRewardScorer(rm, rm_tok)
    scores = scorer.score(["tell me", "why"], ["the cat was happy .", "no"])
    assert len(scores) == 2 and all(s == s for s in scores)
    if isinstance(rm, BackboneRewardModel):  # no sequence-classification class in transformers
        assert (tmp_path / "rm" / "reward_head.safetensors").is_file()
    backend = HFBackend(model, tok)
    backend.add_model("reward", RewardLMView.from_classifier(rm, backend.vocab_size), rm_tok)
    outs = generate(ARGSMethod(ARGSConfig(k=3), reward_key="reward"), [Request(prompt="tell me a story")], backend,
                    max_new_tokens=3, ignore_eos=True)
    assert len(outs[0].token_ids) == 3


LAYER_TYPES = {"full": "Llama", "sliding": "Mistral (sliding window)", "hybrid": "Gemma-3"}


@pytest.mark.parametrize("kind", list(LAYER_TYPES))
def test_rollback_caches_equal_fresh_prefill(kind, tok, models):
    """Drafted tokens rolled back (``truncate``, what Persona-judge's block schedule does) on every
    layer type: two requests x two views in one cache feed 3 tokens a round and keep a different number
    of them; after each round every view equals a fresh prefill of its kept text — past the window."""
    from personalign.methods.persona_judge import PersonaJudgeConfig, PersonaJudgeMethod

    model = models(LAYER_TYPES[kind])
    be = HFBackend(model, tok)
    prompts = [[tok("tell me a story")["input_ids"], tok("be kind . tell me a story")["input_ids"]],
               [tok("why is the sky blue ?")["input_ids"], tok("why ?")["input_ids"]]]
    state = be.prefill([[ViewSpec(prompt_ids=p) for p in views] for views in prompts])
    texts = [[list(p) for p in views] for views in prompts]
    g = torch.Generator().manual_seed(0)
    for r in range(6):
        fed0 = state.fed[:, 0].clone()
        draft = torch.randint(8, len(tok), (2, 3), generator=g)
        be.step(state, draft)
        n_kept = torch.tensor([r % 4, (r + 2) % 4])  # each request keeps 0..3 of its 3 drafted tokens
        be.truncate(state, fed0 + n_kept)
        nxt = torch.randint(8, len(tok), (2, 1), generator=g)
        be.step(state, nxt)
        for b in range(2):
            for k in range(2):
                texts[b][k] += draft[b, : int(n_kept[b])].tolist() + [int(nxt[b, 0])]
        fresh = be.prefill([[ViewSpec(prompt_ids=t) for t in views] for views in texts])
        assert_close_logprobs(state.last_logprobs, fresh.last_logprobs, model, tokens=64)
    assert min(len(t) for views in texts for t in views) > WINDOW  # every view ran past the window
    # and the method itself, block schedule (draft, judge, roll back), runs on this layer type
    method = PersonaJudgeMethod(PersonaJudgeConfig(second_preference="be formal", draft_tokens=3, schedule="block"))
    outs = generate(method, [Request(prompt="tell me a story", preference="funny")] * 2, be, max_new_tokens=12,
                    ignore_eos=True, sampling=SamplingConfig(temperature=1.0), generator=g)
    assert all(len(o.token_ids) == 12 for o in outs)


@pytest.mark.parametrize("kind", list(LAYER_TYPES))
def test_merged_batches_equal_separate_steps(kind, tok, models):
    """``step_many`` joins two batches' caches into one forward on every layer type (the server's
    rounds): each gets what its own ``step`` gives, and both equal an uncached forward of their text."""
    model = models(LAYER_TYPES[kind])
    be = HFBackend(model, tok)
    a_prompts = [tok("tell me a story about a cat")["input_ids"], tok("the sun")["input_ids"]]
    c_prompt = tok("once upon a time there was a little girl and a boy and a dog")["input_ids"]

    def states():
        return (be.prefill([[ViewSpec(prompt_ids=p)] for p in a_prompts]),
                be.prefill([[ViewSpec(prompt_ids=c_prompt)]]))
    (fa, fc), (sa, sc) = states(), states()
    seqs = [list(p) for p in a_prompts]
    for r in range(4):
        ta, tc = torch.tensor([[10 + r], [20 + r]]), torch.tensor([[30 + r, 31]])
        out_a, out_c = be.step_many([(fa, ta, None, None), (fc, tc, None, None)])
        assert_close_logprobs(out_a, be.step(sa, ta), model)
        assert_close_logprobs(out_c, be.step(sc, tc), model)
        for b, s in enumerate(seqs):
            s.append(int(ta[b, 0]))
            with torch.no_grad():
                want = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, -1, : len(tok)].float(), -1)
            assert_close_logprobs(fa.last_logprobs[b, 0], want, model)
    assert max(len(s) for s in seqs) > WINDOW


@pytest.mark.parametrize("arch", unsupported(), ids=lambda a: a.name)
def test_unsupported_layer_types_are_refused_with_their_name(arch, tok):
    model = arch.make(len(tok))
    with pytest.raises(ValueError, match=rf"{type(model).__name__}\) has layers of type '{arch.features[0].replace(' ', '_')}'"):
        HFBackend(model, tok)


def test_projection_names_leave_out_the_moe_router(models):
    names = projection_names(models("Qwen3-MoE"))
    assert "gate" not in names and {"q_proj", "o_proj"} <= set(names)
