"""ARGS and best-of-N: engine ≡ naive per-candidate reference, reward-scorer protocol, bad input."""

from __future__ import annotations

import pytest
import torch

from personalign.decoding.loop import generate
from personalign.decoding.sampling import SamplingConfig
from personalign.methods.args import ARGSConfig, ARGSMethod
from personalign.methods.base import BaseMethod
from personalign.methods.best_of_n import BestOfNConfig, BestOfNMethod, pick_best
from personalign.methods.pad import PADConfig
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request
from personalign.views import HFBackend
from personalign.views.reward import (
    BackboneRewardModel,
    FunctionScorer,
    HFRewardScorer,
    RewardScorer,
)
from tests.numerics import assert_close_forward

PROMPTS = ["tell me a story about a cat", "what is the sun"]
LIKED = {"happy", "sun", "cat", "good", "friend"}


def liked_words(prompt: str, response: str) -> float:
    """+1 per liked word, −0.1 per word: prefers short, liked continuations."""
    words = response.split()
    return sum(w in LIKED for w in words) - 0.1 * len(words)


def test_scorers_follow_the_protocol(tiny_lm, tiny_tokenizer):
    fs = FunctionScorer(liked_words)
    assert isinstance(fs, RewardScorer)
    assert fs.score(["x", "y"], ["happy cat", "the"]) == pytest.approx([1.8, -0.1])
    hf = HFRewardScorer(BackboneRewardModel(tiny_lm.model, 32), tiny_tokenizer, batch_size=3)
    texts = ["the cat was happy .", "a", "the sun is a big star and the sky is blue ."]
    batched = hf.score(["tell me"] * 3, texts)
    alone = [hf.score(["tell me"], [t])[0] for t in texts]
    # padding does not change a row's reward (up to float32 reordering of the padded forward)
    assert_close_forward(torch.tensor(batched), torch.tensor(alone), tiny_lm)
    with pytest.raises(ValueError, match="same length"):
        fs.score(["x"], [])


@torch.no_grad()
def _naive_args(lm, tok, k: int, w: float, n_new: int, reward, prompts=PROMPTS) -> list[list[int]]:
    """Per prompt, per step: each of the k candidates scored alone by ``reward(i, prompt, text)``
    (``i``: the prompt's index) — no batch, no cache."""
    out = []
    for i, p in enumerate(prompts):
        ids, gen = list(build_prompt_ids(tok, p, chat_template=False)), []
        for _ in range(n_new):
            lp = torch.log_softmax(lm(input_ids=torch.tensor([ids + gen])).logits[0, -1].float(), -1)
            top = lp.topk(k).indices.tolist()
            scores = [float(lp[a]) + w * reward(i, p, tok.decode(gen + [a], skip_special_tokens=True)) for a in top]
            gen.append(top[max(range(k), key=lambda j: scores[j])])
        out.append(gen)
    return out


def test_args_engine_equals_naive(tiny_lm, tiny_tokenizer):
    backend = HFBackend(tiny_lm, tiny_tokenizer)
    method = ARGSMethod(ARGSConfig(k=4, w=3.0), scorer=FunctionScorer(liked_words))
    reqs = [Request(prompt=p) for p in PROMPTS]
    outs = generate(method, reqs, backend, max_new_tokens=5, chat_template=False, ignore_eos=True)
    expect = _naive_args(tiny_lm, tiny_tokenizer, 4, 3.0, 5, lambda i, p, text: liked_words(p, text))
    assert [o.token_ids for o in outs] == expect
    plain = generate(BaseMethod(), reqs, backend, max_new_tokens=5, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in plain] != expect
    # w = 0 is plain greedy decoding
    zero = generate(ARGSMethod(ARGSConfig(k=4, w=0.0), scorer=FunctionScorer(liked_words)), reqs, backend,
                    max_new_tokens=5, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in zero] == [o.token_ids for o in plain]


class _OtherTokenizer:
    def __len__(self) -> int:
        return 7

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(7)}


def test_args_reward_tokenizer_differs_is_reported(tiny_lm, tiny_tokenizer):
    scorer = FunctionScorer(liked_words)
    scorer.tokenizer = _OtherTokenizer()
    out = generate(ARGSMethod(scorer=scorer), [Request(prompt=PROMPTS[0])], HFBackend(tiny_lm, tiny_tokenizer),
                   max_new_tokens=2, chat_template=False)[0]
    assert "re-tokenized" in out.stats["args_note"]


def test_best_of_n_picks_the_best_sample(tiny_lm, tiny_tokenizer):
    backend = HFBackend(tiny_lm, tiny_tokenizer)
    scorer = FunctionScorer(lambda p, r: float(len(set(r.split()))))  # the most distinct words
    method = BestOfNMethod(BestOfNConfig(n=5, temperature=1.0), scorer=scorer)
    reqs = [Request(prompt=p, seed=i) for i, p in enumerate(PROMPTS)]
    outs = generate(method, reqs, backend, max_new_tokens=6, chat_template=False)
    for o in outs:
        st = o.stats["best_of_n"]
        assert len(st["scores"]) == 5 and st["chosen"] == pick_best(st["scores"], 5)[0]
        assert st["scores"][st["chosen"]] == max(st["scores"])
        assert scorer.score([""], [o.text])[0] == pytest.approx(max(st["scores"]))
    # a seeded request gives the same answer alone as in a batch
    alone = generate(method, reqs[1:], backend, max_new_tokens=6, chat_template=False)
    assert alone[0].token_ids == outs[1].token_ids
    # N = 1 at temperature 0 is plain greedy decoding
    one = generate(BestOfNMethod(BestOfNConfig(n=1, temperature=0.0), scorer=scorer), reqs, backend,
                   max_new_tokens=6, chat_template=False)
    plain = generate(BaseMethod(), reqs, backend, max_new_tokens=6, chat_template=False)
    assert [o.token_ids for o in one] == [o.token_ids for o in plain]


def test_best_of_n_continues_when_eos_is_ignored(tiny_lm, tiny_tokenizer):
    backend = HFBackend(tiny_lm, tiny_tokenizer)
    out = generate(BestOfNMethod(BestOfNConfig(n=2), scorer=FunctionScorer(liked_words)), [Request(prompt="the sun")],
                   backend, max_new_tokens=7, chat_template=False, ignore_eos=True,
                   sampling=SamplingConfig(temperature=0.0))[0]
    assert len(out.token_ids) == 7


@pytest.mark.parametrize(("cls", "kw", "field"), [
    (BestOfNConfig, {"n": 0}, "`n`"), (ARGSConfig, {"k": 0}, "`k`"), (ARGSConfig, {"w": -1.0}, "`w`"),
    (PADConfig, {"k": 0}, "`k`"), (PADConfig, {"beta": -0.5}, "`beta`"), (PADConfig, {"mode": "fast"}, "`mode`"),
])
def test_bad_config(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(**kw)


def test_methods_without_a_scorer_say_so(tiny_lm, tiny_tokenizer):
    backend = HFBackend(tiny_lm, tiny_tokenizer)
    for m in (ARGSMethod(), BestOfNMethod()):
        with pytest.raises(ValueError, match="needs a reward"):
            generate(m, [Request(prompt="the sun")], backend, max_new_tokens=2, chat_template=False)
    with pytest.raises(ValueError, match="`scorer` must have score"):
        ARGSMethod(scorer=object())


@torch.no_grad()
def _naive_args_rm(lm, rm, tok, k: int, w: float, n_new: int) -> list[list[int]]:
    """ARGS with the reward r = head(h_last) of a full uncached forward of each candidate text."""
    out = []
    for p in PROMPTS:
        ids, gen = list(build_prompt_ids(tok, p, chat_template=False)), []
        for _ in range(n_new):
            lp = torch.log_softmax(lm(input_ids=torch.tensor([ids + gen])).logits[0, -1].float(), -1)
            top = lp.topk(k).indices.tolist()
            r = [float(rm(torch.tensor([ids + gen + [a]]), torch.ones(1, len(ids) + len(gen) + 1)).logits[0, 0])
                 for a in top]
            gen.append(top[max(range(k), key=lambda j: float(lp[top[j]]) + w * r[j])])
        out.append(gen)
    return out


def test_args_cached_reward_views_equal_naive(tiny_lm, tiny_tokenizer):
    from personalign.views.reward import RewardLMView
    from tests.conftest import make_tiny_lm

    tok = tiny_tokenizer
    rm = BackboneRewardModel(make_tiny_lm(len(tok), layers=1).model, 32)
    with torch.no_grad():
        rm.score.weight.mul_(40.0)  # rewards large enough to change choices
    backend = HFBackend(tiny_lm, tok, share_prefix=False)  # exact forward count
    backend.add_model("reward", RewardLMView.from_classifier(rm, backend.vocab_size))
    method = ARGSMethod(ARGSConfig(k=4, w=1.0), reward_key="reward")
    reqs = [Request(prompt=p) for p in PROMPTS]
    f0 = backend.forward_count
    outs = generate(method, reqs, backend, max_new_tokens=5, chat_template=False, ignore_eos=True)
    # prefill: 1 base + 1 reward; step 1: 1 reward (base from prefill); steps 2-5: 1 base + 1 reward
    assert backend.forward_count - f0 == 2 + 1 + 2 * 4
    expect = _naive_args_rm(tiny_lm, rm, tok, 4, 1.0, 5)
    assert [o.token_ids for o in outs] == expect
    plain = generate(BaseMethod(), reqs, backend, max_new_tokens=5, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in plain] != expect


def test_best_of_n_with_the_persrm_reward_per_request_preference(tiny_tokenizer):
    from personalign.training.persrm import PersRM
    from personalign.training.persrm.scorer import PersRMScorer
    from tests.conftest import make_tiny_lm

    tok = tiny_tokenizer
    rm = PersRM.create(make_tiny_lm(len(tok)), tok, name="tiny", lora_r=4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    rm.eval()
    backend = HFBackend(make_tiny_lm(len(tok)), tok)
    scorer = PersRMScorer(rm, chat_template=False)
    reqs = [Request(prompt=PROMPTS[0], preference="happy", seed=1), Request(prompt=PROMPTS[0], preference="sad", seed=1)]
    outs = generate(BestOfNMethod(BestOfNConfig(n=3, temperature=1.0), scorer=scorer), reqs, backend,
                    max_new_tokens=5, chat_template=False)
    for o, r in zip(outs, reqs):
        st = o.stats["best_of_n"]
        expect = rm.sequence_reward([r.prompt], [o.text], [r.preference], chat_template=False)[0]
        # a sum of token rewards over other batch shapes: to the float32 bound at the sum's size
        assert_close_forward(torch.tensor(st["scores"][st["chosen"]]), torch.tensor(expect), rm.lm)
    # same samples (same seed), different preference -> different rewards
    assert outs[0].stats["best_of_n"]["scores"] != outs[1].stats["best_of_n"]["scores"]


def test_persrm_reward_without_preference_scores_each_request_preference(tiny_lm, tiny_tokenizer):
    """A PersRM as the reward (assembly with `persrm` alone, the evaluation harness's case, preferences
    mixed in a batch): the scorer has no fixed preference, so best_of_n and args pass each row's own."""
    from personalign.assembly import Resources, build_backend, build_method
    from personalign.training.persrm import PersRM
    from personalign.training.persrm.scorer import PersRMScorer
    from personalign.views.loading import LoadedModel

    class FakeRM(PersRM):
        def __init__(self):  # noqa: D107 - no weights: only the reward is called
            torch.nn.Module.__init__(self)
            self.tokenizer = tiny_tokenizer

        @property
        def base_lm(self):  # no backbone: not the main model's
            return None

        def sequence_reward(self, prompts, responses, prefs, chat_template=True):
            return [float(len(p)) for p in prefs]

    res = Resources(model=LoadedModel(model=tiny_lm, tokenizer=tiny_tokenizer, name="tiny"), persrm=FakeRM())
    backend = build_backend(res, ["best_of_n"])
    sc = build_method("best_of_n", {}, backend, res).scorer
    assert isinstance(sc, PersRMScorer) and sc.preference is None
    assert sc.score(["q", "q"], ["a", "b"], preferences=["xx", "yyyy"]) == [2.0, 4.0]
    assert PersRMScorer(FakeRM(), "zzz").score(["q"], ["a"]) == [3.0]


def liked_by_preference(prompt: str, response: str, preference: str) -> float:
    """+1 per word of the response that the preference text names, −0.1 per word."""
    words = response.split()
    return sum(w in preference.split() for w in words) - 0.1 * len(words)


def test_args_and_best_of_n_pass_each_requests_preference(tiny_lm, tiny_tokenizer):
    """A reward function with a `preference` parameter scores each row with its request's preference:
    ARGS in one batch of two preferences equals the naive per-candidate search of each alone."""
    backend = HFBackend(tiny_lm, tiny_tokenizer)
    prefs = ["happy cat good", "sun star sky"]
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, prefs)]
    method = ARGSMethod(ARGSConfig(k=4, w=3.0), scorer=FunctionScorer(liked_by_preference))
    outs = generate(method, reqs, backend, max_new_tokens=4, chat_template=False, ignore_eos=True)
    expect = _naive_args(tiny_lm, tiny_tokenizer, 4, 3.0, 4,
                         lambda i, p, text: liked_by_preference(p, text, prefs[i]))
    assert [o.token_ids for o in outs] == expect
    with pytest.raises(ValueError, match="needs a preference|`preference`"):
        generate(method, [Request(prompt=PROMPTS[0])], backend, max_new_tokens=2, chat_template=False)
    bon = BestOfNMethod(BestOfNConfig(n=3, temperature=1.0), scorer=FunctionScorer(liked_by_preference))
    for req, out in zip(reqs, generate(bon, [Request(prompt=r.prompt, preference=r.preference, seed=1) for r in reqs],
                                       backend, max_new_tokens=4, chat_template=False)):
        st = out.stats["best_of_n"]
        assert liked_by_preference(req.prompt, out.text, req.preference) == pytest.approx(max(st["scores"]))
