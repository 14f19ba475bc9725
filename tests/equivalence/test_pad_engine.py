"""PAD through the engine (batched, cached, one mixed-adapter forward) ≡ the same rule computed
with separate, uncached full forwards of π_LM, π_ref and π_θ per request and step."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.assembly import attach_persrm
from personalign.decoding.loop import generate
from personalign.decoding.sampling import SamplingConfig
from personalign.methods.pad import PADConfig, PADMethod, pad_scores
from personalign.personas.prompts import build_prompt_ids
from personalign.training.persrm import PersRM
from personalign.training.persrm.model import persrm_prompt_ids, token_features
from personalign.types import Request
from personalign.views import HFBackend
from tests.conftest import make_tiny_lm
from tests.numerics import assert_close_forward, assert_close_logprobs, lowp_atol, reduction_atol

PROMPTS = ["tell me a story about a cat", "what is the sun"]
PREFS = ["happy and funny", "concise"]


def _persrm(tok, seed: int = 7) -> PersRM:
    rm = PersRM.create(make_tiny_lm(len(tok)), tok, name="tiny", lora_r=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return rm.eval()


def _pad_on(backend, rm, cfg=None):
    """A PAD method over ``backend`` with the PersRM's views attached first (what assembly does)."""
    return PADMethod(cfg, persrm=rm, shared=attach_persrm(backend, rm))


def _rule_token(base_lp, th_lp, ref_lp, dh, out_weight, w, beta: float, k: int, mode: str = "eq13") -> int:
    """Eq. 13 (or the released rule) for one row, straight from the definitions: φ from
    ``token_features`` over the base top-k, w_pᵀφ summed over the D features. Returns the argmax."""
    top_lp, top_ids = base_lp[0].topk(k)
    th = th_lp[0, top_ids]
    if mode == "eq13":
        phi = token_features(dh[0].float(), out_weight[top_ids].float(), th - ref_lp[0, top_ids])  # [k, D]
        score = top_lp + beta * (phi * w[0].float()).sum(-1)
    else:
        score = (1 - beta) * top_lp + beta * th
    return int(top_ids[score.argmax()])


@torch.no_grad()
def _naive(rm: PersRM, base_lm, tok, cfg: PADConfig, n_new: int) -> list[list[int]]:
    """Greedy PAD, one request at a time, full forwards of the whole text at every step."""
    out = []
    for prompt, pref in zip(PROMPTS, PREFS):
        base_ids = list(build_prompt_ids(tok, prompt, chat_template=False))
        rm_ids = list(persrm_prompt_ids(tok, prompt, pref, chat_template=False))
        w = rm.preference_weights([pref])
        gen: list[int] = []
        for _ in range(n_new):
            def run(ids, adapter, gen=gen):
                x = torch.tensor([ids + gen])
                if adapter:
                    h = rm._decoder()(input_ids=x).last_hidden_state[:, -1]
                else:
                    with rm.lm.disable_adapter():
                        h = rm._decoder()(input_ids=x).last_hidden_state[:, -1]
                lp = torch.log_softmax(rm.base_lm.lm_head(h).float(), -1)[:, : len(tok)]
                return h.float(), lp
            if base_lm is None:  # shared backbone: the base model is the adapter-free backbone
                _, base_lp = run(base_ids, False)
            else:
                base_lp = torch.log_softmax(base_lm(input_ids=torch.tensor([base_ids + gen])).logits[:, -1].float(), -1)
            h_th, th_lp = run(rm_ids, True)
            h_ref, ref_lp = run(rm_ids, False)
            gen.append(_rule_token(base_lp, th_lp, ref_lp, h_th - h_ref, rm.out_weight, w, cfg.beta, cfg.k, cfg.mode))
        out.append(gen)
    return out


@pytest.mark.parametrize("mode", ["eq13", "released"])
def test_pad_scores_equal_the_rule_from_its_definitions(mode):
    """``pad_scores`` on the PersRM rows' log-probs (w_pᵀφ in closed form) equals log π_LM + β·w_pᵀφ
    with φ from ``token_features`` over each row's base top-k (its own k), −inf elsewhere; from the
    hidden states alone (a linear head, with a bias) it equals that up to a constant per row."""
    g = torch.Generator().manual_seed(0)
    B, V, D = 3, 50, 16
    W, bias = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    h_th, h_ref = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    base_lp = torch.log_softmax(3 * torch.randn(B, V, generator=g), -1)
    th_lp, ref_lp = (torch.log_softmax(h @ W.T + bias, -1) for h in (h_th, h_ref))
    w = torch.randn(B, D, generator=g)
    beta, k = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4, 7, 1])
    common = dict(beta=beta, k=k, mode=mode, out_weight=W, out_bias=bias, weights=w, delta_hidden=h_th - h_ref)
    exact = pad_scores(base_lp, theta_logprobs=th_lp, ref_logprobs=ref_lp, **common)
    hidden = pad_scores(base_lp, theta_hidden=h_th, **common)
    for b in range(B):
        top_lp, ids = base_lp[b].topk(int(k[b]))
        th = th_lp[b, ids]
        if mode == "eq13":
            phi = token_features(h_th[b] - h_ref[b], W[ids], th - ref_lp[b, ids])
            want = top_lp + beta[b] * (phi * w[b]).sum(-1)
        else:
            want = (1 - beta[b]) * top_lp + beta[b] * th
        # the same sums in another order (closed form over D, normalizers over V): float32 rounding
        atol = reduction_atol(max(D, V), float(want.abs().max()) + float(th_lp.abs().max()))
        assert float((exact[b, ids] - want).abs().max()) <= atol
        shift = hidden[b, ids] - want
        assert float((shift - shift[0]).abs().max()) <= 2 * atol  # one constant per row
        assert int(hidden[b].argmax()) == int(exact[b].argmax())
        rest = torch.ones(V, dtype=torch.bool)
        rest[ids] = False
        assert torch.isneginf(exact[b, rest]).all() and torch.isneginf(hidden[b, rest]).all()
    if mode == "eq13":  # the constant is not zero: the hidden form drops the normalizers
        assert not torch.allclose(hidden[0, base_lp[0].topk(4).indices], exact[0, base_lp[0].topk(4).indices])


@pytest.mark.parametrize("mode", ["eq13", "released"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hidden_only", [True, False])
def test_pad_engine_equals_naive(tiny_tokenizer, mode, shared, hidden_only, monkeypatch):
    """The engine picks what the rule from its definitions picks, with the PersRM rows' output head
    skipped (a linear head: the scores from hidden states) or run (any other head: from log-probs)."""
    from personalign.methods import pad as pad_module

    if not hidden_only:  # a head the check does not find linear (soft-capped logits, say)
        monkeypatch.setattr(pad_module, "output_head_is_linear", lambda lm: False)
    tok = tiny_tokenizer
    rm = _persrm(tok)
    cfg = PADConfig(k=5, beta=1.5, mode=mode)
    base_lm = None if shared else make_tiny_lm(len(tok), layers=1)
    backend = HFBackend(rm.base_lm if shared else base_lm, tok, share_prefix=False)  # exact forward count
    method = _pad_on(backend, rm, cfg)
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, PREFS)]
    f0 = backend.forward_count
    outs = generate(method, reqs, backend, max_new_tokens=6, chat_template=False, ignore_eos=True)
    keys = {v.model for v in method.build_views(reqs[0], cfg, backend, False)}  # the views this mode decodes
    rm_views = [backend.models[k] for k in keys if k.startswith("persrm[")]
    n_rm = 2 if mode == "eq13" else 1  # π_ref and π_θ, or π_θ
    assert len(rm_views) == 1 and rm_views[0].logits.count(False) == (n_rm if hidden_only else 0)
    n_models = 1 if shared else 2
    assert backend.forward_count - f0 == n_models * 6  # one batched forward per model per step (prefill + 5)
    expect = _naive(rm, base_lm, tok, cfg, 6)
    assert [o.token_ids for o in outs] == expect
    # the rule matters: the rescored choice differs from plain greedy base decoding somewhere
    if mode == "eq13" and shared:
        from personalign.methods.base import BaseMethod

        plain = generate(BaseMethod(), reqs, backend, max_new_tokens=6, chat_template=False, ignore_eos=True)
        assert [o.token_ids for o in plain] != expect


def test_pad_stochastic_stays_in_base_top_k(tiny_tokenizer):
    tok = tiny_tokenizer
    rm = _persrm(tok)
    backend = HFBackend(rm.base_lm, tok)
    method = _pad_on(backend, rm, PADConfig(k=2))
    g = torch.Generator().manual_seed(0)
    reqs = [Request(prompt=PROMPTS[0], preference=PREFS[0])] * 3
    outs = generate(method, reqs, backend, max_new_tokens=5, chat_template=False, ignore_eos=True,
                    sampling=SamplingConfig(temperature=1.0), generator=g)
    base = backend.models["main"]
    ids0 = list(build_prompt_ids(tok, PROMPTS[0], chat_template=False))
    seen = set()
    for o in outs:
        for t, tokid in enumerate(o.token_ids):
            with torch.no_grad():
                logits = base(input_ids=torch.tensor([ids0 + o.token_ids[:t]])).logits[0, -1, : len(tok)]
            assert tokid in logits.topk(2).indices.tolist()
        seen.add(tuple(o.token_ids))
    assert len(seen) > 1  # sampling, not argmax


def test_mixed_adapter_rows_never_share_a_prefix(tiny_tokenizer):
    """With prefix sharing on (the default), the θ rows must still see their own prompt KV."""
    tok = tiny_tokenizer
    rm = _persrm(tok)
    cfg = PADConfig(k=5, beta=1.5)
    backend = HFBackend(rm.base_lm, tok)  # share_prefix=True
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, PREFS)]
    outs = generate(_pad_on(backend, rm, cfg), reqs, backend, max_new_tokens=6, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in outs] == _naive(rm, None, tok, cfg, 6)


def test_pad_with_a_chat_template(tiny_chat_tokenizer):
    """The preference goes in the PersRM's system message; the base view has none."""
    tok = tiny_chat_tokenizer
    rm = _persrm(tok)
    backend = HFBackend(rm.base_lm, tok)
    cfg = PADConfig(k=5, beta=1.5)
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, PREFS)]
    outs = generate(_pad_on(backend, rm, cfg), reqs, backend, max_new_tokens=4, chat_template=True, ignore_eos=True)
    specs = [o.prompt_token_ids for o in outs]
    assert specs[0] == list(build_prompt_ids(tok, PROMPTS[0], chat_template=True))
    rm_ids = persrm_prompt_ids(tok, PROMPTS[0], PREFS[0], chat_template=True)
    assert tok.convert_tokens_to_ids("<|system|>") in rm_ids
    expect = []
    with torch.no_grad():
        for p, q in zip(PROMPTS, PREFS):
            b, r = list(build_prompt_ids(tok, p)), list(persrm_prompt_ids(tok, p, q))
            w, gen = rm.preference_weights([q]), []
            for _ in range(4):
                with rm.lm.disable_adapter():
                    hb = rm._decoder()(input_ids=torch.tensor([b + gen])).last_hidden_state[:, -1]
                    hr = rm._decoder()(input_ids=torch.tensor([r + gen])).last_hidden_state[:, -1]
                ht = rm._decoder()(input_ids=torch.tensor([r + gen])).last_hidden_state[:, -1]
                lps = [torch.log_softmax(rm.base_lm.lm_head(h).float(), -1) for h in (hb, ht, hr)]
                gen.append(_rule_token(lps[0], lps[1], lps[2], ht - hr, rm.out_weight, w, 1.5, 5))
            expect.append(gen)
    assert [o.token_ids for o in outs] == expect


def test_row_scaled_lora_equals_peft_mixed_batch(tiny_tokenizer):
    """RowAdapterModel's row-scaled LoRA ≡ PEFT's own mixed-adapter batch (adapter_names=)."""
    from personalign.views.adapters import RowAdapterModel

    rm = _persrm(tiny_tokenizer)
    ids = torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42], [1, 50, 51, 52]])
    router = RowAdapterModel(rm.lm, ("__base__", "default", "__base__"))
    with torch.no_grad():
        fast = router(input_ids=ids).logits
        peft_mixed = rm.lm(input_ids=ids, adapter_names=["__base__", "default", "__base__"]).logits
        with rm.lm.disable_adapter():
            base = rm.lm(input_ids=ids).logits
    assert_close_forward(fast, peft_mixed, rm.lm)  # other kernels (sub-batches in PEFT): float32 rounding
    # the base rows skip the delta and run the backbone's ops on the same [3, T] batch: bit for bit
    assert torch.equal(fast[0], base[0]) and torch.equal(fast[2], base[2])
    assert not torch.allclose(fast[1], base[1])
    assert all(not isinstance(layer.scaling["default"], torch.Tensor) for layer in router._lora_layers)  # restored


def test_pad_batches_joined_in_one_forward_equal_each_alone(tiny_tokenizer):
    """Two PAD requests started at different times (two batches) and a base request, decoded by the
    server's worker: the PersRM rows of both batches run in one forward, whose hidden states PAD
    reads back per batch; every text equals its own decoding."""
    import asyncio

    from personalign.methods.base import BaseMethod
    from personalign.server.worker import Delta, Done, EngineWorker, Job

    tok = tiny_tokenizer
    rm = _persrm(tok)
    backend = HFBackend(rm.base_lm, tok, share_prefix=False)
    method = _pad_on(backend, rm, PADConfig(k=5, beta=1.5))
    w = EngineWorker(backend, {"pad": method, "base": BaseMethod()}, batch_wait=0.0, chat_template=False)
    greedy = SamplingConfig(temperature=0.0)

    async def collect(job):
        parts = []
        while True:
            ev = await asyncio.wait_for(job.events.get(), 60)
            if isinstance(ev, Done):
                return "".join(parts)
            assert isinstance(ev, Delta), ev
            parts.append(ev.text)

    async def run():
        loop = asyncio.get_running_loop()

        def job(m, p, q):
            return Job(method=m, request=Request(prompt=p, preference=q), max_tokens=8, sampling=greedy, stop=[],
                       loop=loop, events=asyncio.Queue())
        first = job("pad", PROMPTS[0], PREFS[0])
        w.submit(first)
        head = await asyncio.wait_for(first.events.get(), 60)
        later = [job("pad", PROMPTS[1], PREFS[1]), job("base", PROMPTS[1], None)]
        for j in later:
            w.submit(j)
        texts = await asyncio.gather(*(collect(j) for j in [first] + later))
        return [head.text + texts[0]] + texts[1:], [first] + later

    w.start()
    try:
        texts, jobs = asyncio.run(run())
    finally:
        w.stop()
    assert w.stats.cohorts == 3 and w.stats.max_cohort_rows == 3
    for j, text in zip(jobs, texts):
        m = method if j.method == "pad" else BaseMethod()
        alone = generate(m, [j.request], backend, max_new_tokens=8, chat_template=False, sampling=greedy)[0]
        assert text == alone.text


def test_lean_lora_layer_runs_the_stated_ops(tiny_tokenizer):
    """One ``RowLoraLinear`` under a row plan runs exactly the ops its docstring states, on the same
    shapes, so it equals this reference bit for bit (same primitives, same shapes, same order):
    a one-token step ``y = W x + b; y += (x Aᵀ)(Bᵀ) ⊙ s`` with the per-row scaling ``s`` (0 on base
    rows), a several-token step the delta on the adapter rows only. Against PEFT's own forward (which
    multiplies ``B`` through ``linear`` and adds unfused) it agrees to one reduction's rounding."""
    from personalign.views.adapters import _PEFT_LINEAR_FORWARD, RowAdapterModel, RowLoraLinear

    rm = _persrm(tiny_tokenizer)
    router = RowAdapterModel(rm.lm, ("__base__", "default", "__base__"))
    layer = next(m for m in rm.lm.modules() if isinstance(m, RowLoraLinear))
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    g = torch.Generator().manual_seed(0)
    names = ["__base__", "default", "__base__"]
    plan = router._build_plan(names, "default", torch.float32, torch.device("cpu"), grad=False)
    with torch.no_grad():
        for T in (1, 4):
            x = torch.randn(3, T, W.shape[1], generator=g)
            router._ctx.entries = plan.entries
            try:
                got = layer(x)
            finally:
                router._ctx.entries = None
            want = torch.nn.functional.linear(x, W, b)
            delta = torch.matmul(torch.nn.functional.linear(x if T == 1 else x[1::3], A), B.t().contiguous())
            if T == 1:
                on = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
                want.addcmul_(delta, on * s)
            else:
                want[1::3].add_(delta, alpha=s)
            assert torch.equal(got, want), T
            base = torch.nn.functional.linear(x, W, b)  # the same product on the same [3, T, in] batch
            assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])  # y + δ·0 = y: the base rows
            peft = x.new_empty(got.shape)
            scaling = layer.scaling["default"]
            layer.scaling["default"] = torch.tensor([0.0, 1.0, 0.0])[:, None, None] * scaling
            try:
                peft[:] = _PEFT_LINEAR_FORWARD(layer, x)
            finally:
                layer.scaling["default"] = scaling
            magnitude = float((x.abs().max() * A.abs().max()) * B.abs().max() * A.shape[1] * s)
            atol = reduction_atol(A.shape[1], magnitude) + reduction_atol(A.shape[0], magnitude)
            assert float((got - peft).abs().max()) <= atol


def test_lean_lora_forward_equals_peft(tiny_tokenizer, monkeypatch):
    """The lean per-row LoRA forward ≡ PEFT's per-row-scaled forward on every row, without calling
    PEFT's forward: to float32 rounding (``tests.numerics``), since the lean ops multiply ``B`` from a
    transposed copy and fuse the scaled add (other kernels, other summation order). Exact where the
    same ops run on the same shapes: rows of no adapter skip the delta and are the backbone's rows;
    a router with no adapter row is the backbone; repeated calls repeat; a layer whose state changed
    since the plan (here: its scaling) takes PEFT's forward, so it IS the per-row PEFT forward.
    Outside a router the layers are PEFT's (counted calls)."""
    from personalign.views import adapters
    from personalign.views.adapters import RowAdapterModel

    rm = _persrm(tiny_tokenizer)
    ids = torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42], [1, 50, 51, 52]])
    pattern = ("__base__", "default", "__base__")
    router = RowAdapterModel(rm.lm, pattern)
    calls = []
    real = adapters._PEFT_LINEAR_FORWARD
    monkeypatch.setattr(adapters, "_PEFT_LINEAR_FORWARD", lambda *a, **k: calls.append(1) or real(*a, **k))

    def peft_rows(x=ids):  # PEFT's forward with per-row scaling
        slow = RowAdapterModel(rm.lm, pattern)
        slow.lean_lora = False
        return slow(input_ids=x).logits

    n_layers = len(router._lora_layers)
    with torch.no_grad():
        lean = router(input_ids=ids).logits  # several tokens a row: the adapter row's delta only
        assert not calls and n_layers > 0 and torch.equal(router(input_ids=ids).logits, lean)
        one = ids[:, -1:]  # one token a row (a decode step): the delta on every row, scaled per row
        lean_one = router(input_ids=one).logits
        assert not calls
        assert_close_forward(lean_one, peft_rows(one), rm.lm)
        assert len(calls) == n_layers
        calls.clear()
        peft = peft_rows()
        assert len(calls) == n_layers
        with rm.lm.disable_adapter():
            base = rm.lm(input_ids=ids).logits
        assert_close_forward(lean, peft, rm.lm)
        assert torch.equal(lean[0], base[0]) and not torch.allclose(lean[1], base[1], atol=1e-4)
        calls.clear()
        outside = rm.lm(input_ids=ids).logits  # outside a router: PEFT's forward
        assert len(calls) == n_layers
        assert_close_forward(outside[1], lean[1], rm.lm)
        calls.clear()
        assert torch.equal(RowAdapterModel(rm.lm, ("__base__",))(input_ids=ids).logits, base) and not calls
        for layer in router._lora_layers:  # new weights, in place and by replacement: the plan reads them
            layer.lora_B["default"].weight.mul_(1.5)
        layer.lora_B["default"].weight.data = 2 * layer.lora_B["default"].weight.data
        calls.clear()
        moved = router(input_ids=one).logits
        assert not calls and not torch.allclose(moved[1], lean_one[1], atol=1e-4)
        assert_close_forward(moved, peft_rows(one), rm.lm)
        calls.clear()
        for layer in router._lora_layers:  # a state change after the plan was built
            layer.scaling["default"] *= 3.0
        rescaled = router(input_ids=ids).logits
        assert len(calls) == n_layers
        assert torch.equal(rescaled, peft_rows()) and not torch.allclose(rescaled[1], peft[1], atol=1e-4)


def test_row_scaled_lora_gradients_equal_peft(tiny_tokenizer):
    """With autograd on, the routed rows give the LoRA weights PEFT's gradients (the adapter rows'
    delta only)."""
    from personalign.views.adapters import RowAdapterModel

    rm = _persrm(tiny_tokenizer)
    ids = torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42], [1, 50, 51, 52]])
    grads = []
    for lean in (True, False):
        router = RowAdapterModel(rm.lm, ("__base__", "default", "__base__"))
        router.lean_lora = lean
        rm.lm.zero_grad()
        with torch.no_grad():  # a plan built without autograd is not reused with it
            router(input_ids=ids[:, :1])
        router(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in rm.lm.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:  # the same gradients through other kernels: float32 rounding of the backward
        assert_close_forward(grads[0][n], grads[1][n], rm.lm)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_hidden_state_rows_skip_the_output_head(tiny_tokenizer):
    """Rows of view slots without logits: the head runs on the other rows only, whose log-probs are
    what a full head gives; the skipped rows read uniform; every row's hidden state is kept."""
    from personalign.types import ViewSpec
    from personalign.views.adapters import RowAdapterModel, output_head_is_linear

    rm = _persrm(tiny_tokenizer)
    assert output_head_is_linear(rm.base_lm)
    pattern = ("__base__", "__base__", "default")
    prompts = [[1, 30, 31, 32], [1, 40, 41], [1, 50, 51, 52, 53]]
    got = {}
    for name, logits in (("full", None), ("base only", (True, False, False))):
        be = HFBackend(rm.base_lm, tiny_tokenizer, share_prefix=False)
        be.add_model("rows", RowAdapterModel(rm.lm, pattern, logits))
        state = be.prefill([[ViewSpec(prompt_ids=p, model="rows") for p in prompts]] * 2)
        lps = [state.last_logprobs.clone()]
        lps.append(be.step(state, torch.tensor([[7], [9]]))[:, :, -1])
        got[name] = (lps, [state.last_hidden(k) for k in range(3)])
    V = got["full"][0][0].shape[-1]
    for full, part in zip(got["full"][0], got["base only"][0]):
        assert_close_logprobs(part[:, 0], full[:, 0], rm.lm)  # the head on fewer rows: another kernel shape
        assert torch.allclose(part[:, 1:], torch.full_like(part[:, 1:], -math.log(V)))
    for a, b in zip(got["full"][1], got["base only"][1]):
        assert_close_forward(b, a, rm.lm)


def test_output_head_check_tells_soft_capped_logits(tiny_tokenizer):
    """A head followed by soft-capping (Gemma-2's logits) is not linear in the hidden state."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from personalign.views.adapters import output_head_is_linear

    cfg = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    capped = Gemma2ForCausalLM(cfg).eval()
    assert not output_head_is_linear(capped)
    cfg.final_logit_softcapping = None
    assert output_head_is_linear(Gemma2ForCausalLM(cfg).eval())


def test_row_lora_layers_survive_copies_and_other_dtypes(tiny_tokenizer):
    """A deep copy or a pickle of a routed model is a model of its own (its layers follow its own
    routers); in bfloat16 the routed rows stay bfloat16 and match PEFT's forward."""
    import copy
    import pickle

    from personalign.views.adapters import RowAdapterModel, RowLoraLinear

    rm = _persrm(tiny_tokenizer)
    ids = torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42]])
    pattern = ("__base__", "default")
    with torch.no_grad():
        want = RowAdapterModel(rm.lm, pattern)(input_ids=ids).logits
        for clone in (copy.deepcopy(rm.lm), pickle.loads(pickle.dumps(rm.lm))):
            layer = next(m for m in clone.modules() if isinstance(m, RowLoraLinear))
            assert layer._row_ctx is not next(m for m in rm.lm.modules() if isinstance(m, RowLoraLinear))._row_ctx
            for m in clone.modules():
                if isinstance(m, RowLoraLinear):
                    m.lora_B["default"].weight.mul_(2.0)  # the clone's weights, not the original's
            got = RowAdapterModel(clone, pattern)(input_ids=ids).logits
            # row 0 is a base row: the backbone's ops on the same batch, bit for bit
            assert torch.equal(got[0], want[0]) and not torch.allclose(got[1], want[1], atol=1e-4)
        half = copy.deepcopy(rm.lm).to(torch.bfloat16)
        fast = RowAdapterModel(half, pattern)(input_ids=ids).logits
        slow = RowAdapterModel(half, pattern)
        slow.lean_lora = False
        assert fast.dtype == torch.bfloat16
        assert_close_forward(fast, slow(input_ids=ids).logits, half)  # bfloat16 rounding of other kernels
        off = RowAdapterModel(half, ("__base__", "__base__"))(input_ids=ids).logits
        # the adapter's effect dwarfs that bound: a lean path that lost the delta in bfloat16 would fail
        assert float((fast[1] - off[1]).float().abs().max()) > 10 * lowp_atol(half, fast, torch.bfloat16)


def test_args_with_the_persrm_reward_ranks_as_pad(tiny_tokenizer):
    """ARGS' score log π(a) + w·R(p, x, y_<t ∘ a) with the PersRM's sequence reward (a sum of token
    rewards: the prefix's part is the same for every candidate) picks what Eq. 13 picks with
    β = w·β_PersRM — here through ARGS' text path, which re-encodes every candidate text (and so
    cannot follow a special token: the texts agree up to the first one)."""
    from personalign.methods.args import ARGSConfig, ARGSMethod
    from personalign.training.persrm.scorer import PersRMScorer

    tok = tiny_tokenizer
    rm = _persrm(tok, seed=3)
    reqs = [Request(prompt=p, preference=q) for p, q in zip(PROMPTS, PREFS)]
    be = HFBackend(rm.base_lm, tok)
    pad = generate(_pad_on(be, rm, PADConfig(k=4, beta=0.8 * rm.config.beta)), reqs, be, max_new_tokens=6,
                   chat_template=False, ignore_eos=True)
    args = ARGSMethod(ARGSConfig(k=4, w=0.8), scorer=PersRMScorer(rm, chat_template=False))
    policy = make_tiny_lm(len(tok))  # the backbone without the adapter: PAD's π_LM
    out = generate(args, reqs, HFBackend(policy, tok), max_new_tokens=6, chat_template=False, ignore_eos=True)
    special = set(tok.all_special_ids)
    for a, b in zip(out, pad):  # equal up to a special token, which the text path cannot re-encode
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(b.token_ids))
        assert n >= 3 and (n == len(b.token_ids) or b.token_ids[n] in special or a.token_ids[n] in special), (a, b)
    be0 = HFBackend(rm.base_lm, tok)
    base = generate(_pad_on(be0, rm, PADConfig(k=4, beta=0.0)), reqs, be0,
                    max_new_tokens=6, chat_template=False, ignore_eos=True)
    assert [o.token_ids for o in base] != [o.token_ids for o in pad]  # the reward changes the text
