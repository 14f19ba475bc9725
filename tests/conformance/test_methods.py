"""The battery every registered method runs through (a method joins it by registering).

Each method is built by its bench preset (``eval.bench.bench_method``: assembly, with untrained helpers where it needs them) over the
fixed-init tiny model, and must: emit valid ids, respect max_new_tokens, be deterministic under a
seed, leave its inputs untouched, round-trip its config, and reject a bad config with ValueError.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personalign import METHODS, HFBackend, LoadedModel, Request, SamplingConfig, generate
from personalign.config import config_from_mapping, config_to_dict


@pytest.fixture(scope="module")
def main_model(tiny_lm, tiny_chat_tokenizer):
    return LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")


def build(name, main_model):
    backend = HFBackend(main_model.model, main_model.tokenizer)
    from personalign.eval.bench import bench_method

    method, backend, _ = bench_method(name, main_model, backend)
    return method, backend


REQUESTS = [
    Request(prompt="tell me a story about a cat", preference="very funny"),
    Request(prompt="why is the sky blue ?", preference="formal and concise"),
]


@pytest.mark.parametrize("name", METHODS.names())
def test_valid_ids_and_budget(name, main_model):
    method, backend = build(name, main_model)
    outs = generate(method, REQUESTS, backend, max_new_tokens=6, ignore_eos=True)
    assert len(outs) == len(REQUESTS)
    for o in outs:
        assert len(o.token_ids) == 6
        assert all(0 <= t < backend.vocab_size for t in o.token_ids)
        assert o.method == name


@pytest.mark.parametrize("name", METHODS.names())
def test_deterministic_under_seed(name, main_model):
    method, backend = build(name, main_model)
    samp = SamplingConfig(temperature=1.0, top_p=0.9)

    def run():
        return [o.token_ids for o in generate(method, REQUESTS, backend, max_new_tokens=5, sampling=samp,
                                              generator=torch.Generator().manual_seed(11))]
    assert run() == run()


@pytest.mark.parametrize("name", METHODS.names())
def test_no_input_mutation(name, main_model):
    method, backend = build(name, main_model)
    reqs = [dataclasses.replace(r, params=dict(r.params)) for r in REQUESTS]
    before, cfg_before = repr(reqs), repr(method.config)
    generate(method, reqs, backend, max_new_tokens=3)
    assert repr(reqs) == before and repr(method.config) == cfg_before


@pytest.mark.parametrize("name", METHODS.names())
def test_config_round_trip_and_bad_config(name, main_model):
    method, _ = build(name, main_model)
    cls = type(method)
    assert config_from_mapping(cls.Config, config_to_dict(method.config)) == method.config
    with pytest.raises(ValueError, match="unknown parameter"):
        cls.from_params({"definitely_not_a_param": 1})


def _snapshot(backend):
    """What a method could change on a backend: its model keys and objects, tokenizers, every weight,
    and each PEFT model's active adapter."""
    out = {}
    for key, model in backend.models.items():
        peft = getattr(model, "peft_model", model)
        out[key] = (id(model), id(backend.tokenizer(key)), getattr(peft, "active_adapter", None),
                    {n: t.detach().clone() for n, t in model.state_dict().items()})
    return out


@pytest.mark.parametrize("name", METHODS.names())
def test_decoding_leaves_the_backend_as_assembly_built_it(name, main_model):
    """No method changes the backend: building views and decoding (greedy and sampled, a request
    with its own parameters too) leave the same models, tokenizers, weights and adapters."""
    method, backend = build(name, main_model)
    before = _snapshot(backend)
    for req in REQUESTS:
        method.build_views(req, method.config, backend, True)
    generate(method, REQUESTS, backend, max_new_tokens=4, ignore_eos=True)
    generate(method, REQUESTS, backend, max_new_tokens=3, sampling=SamplingConfig(temperature=1.0),
             generator=torch.Generator().manual_seed(3))
    after = _snapshot(backend)
    assert after.keys() == before.keys()
    for key in before:
        assert after[key][:3] == before[key][:3], key
        assert after[key][3].keys() == before[key][3].keys(), key
        for n, t in before[key][3].items():
            assert torch.equal(after[key][3][n], t), f"{key}: {n} changed"
