"""The shared prompt views: plain, preference-prompted, and the (preference, plain) pair."""

from __future__ import annotations

import pytest

from personalign.methods import get_method
from personalign.methods.prompt_views import PairViewMethod, build_pair_views, plain_view, preference_view
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request


def _key(views):
    return [(v.prompt_ids, v.model, v.prefix_embeds, v.role) for v in views]


class _Tok:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def tokenizer(self, key: str = "main"):
        return self.tok


@pytest.mark.parametrize("chat", [True, False])
def test_views_are_the_prompt_with_and_without_the_preference(tiny_chat_tokenizer, chat):
    be, req = _Tok(tiny_chat_tokenizer), Request(prompt="tell me a story", preference="  short and happy ")
    pref_ids = build_prompt_ids(tiny_chat_tokenizer, req.prompt, system="short and happy", chat_template=chat)
    plain_ids = build_prompt_ids(tiny_chat_tokenizer, req.prompt, chat_template=chat)
    assert pref_ids != plain_ids
    pair = build_pair_views("amulet", req, be, chat)
    assert [(v.prompt_ids, v.role) for v in pair] == [(tuple(pref_ids), "preference"), (tuple(plain_ids), "base")]
    assert _key(pair) == _key([preference_view(req, "short and happy", be, chat), plain_view(req, be, chat)])
    assert preference_view(req, "x", be, chat, role="preference:1").role == "preference:1"
    # every two-view method builds exactly this pair; single-view methods build one of its halves
    for name in ("amulet", "linear_alignment"):
        method = get_method(name)()
        assert isinstance(method, PairViewMethod)
        assert _key(method.build_views(req, method.config, be, chat)) == _key(pair)
    assert _key(get_method("preference_prompting")().build_views(req, None, be, chat)) == _key(pair[:1])
    assert _key(get_method("base")().build_views(req, None, be, chat)) == _key(pair[1:])


@pytest.mark.parametrize("name", ["amulet", "linear_alignment", "preference_prompting"])
def test_a_missing_preference_names_the_method(tiny_chat_tokenizer, name):
    method = get_method(name)()
    for pref in (None, " "):
        with pytest.raises(ValueError, match=rf"`preference` must be a non-empty text for method '{name}'"):
            method.build_views(Request(prompt="hi", preference=pref), getattr(method, "config", None),
                               _Tok(tiny_chat_tokenizer), True)
