"""The prompt views a method builds from a request: plain, under a preference, or both.

* ``plain_view``      — ``π(· | x)``: the prompt alone (role ``base``);
* ``preference_view`` — ``π(· | p, x)``: the preference as the system message (a plain-text prefix
  without a chat template; see ``personas.prompts``);
* ``build_pair_views`` — ``[π(· | p_pref, x), π(· | x)]``, the two views of the contrastive methods
  (Amulet, Linear Alignment); ``PairViewMethod`` is the ``TokenMethod`` base that builds them.
"""

from __future__ import annotations

from typing import Any

from personalign.decoding.method import TokenMethod
from personalign.personas.prompts import build_prompt_ids
from personalign.types import Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["require_preference", "plain_view", "preference_view", "build_pair_views", "PairViewMethod"]


def require_preference(request: Request, method: str) -> str:
    """The request's preference text, or a ``ValueError`` naming the method that needs it."""
    if request.preference is None or not request.preference.strip():
        raise ValueError(f"`preference` must be a non-empty text for method {method!r}.")
    return request.preference.strip()


def plain_view(request: Request, backend: Backend, chat_template: bool) -> ViewSpec:
    """The view of the plain prompt (role ``base``)."""
    return ViewSpec(prompt_ids=build_prompt_ids(backend.tokenizer(), request.prompt, chat_template=chat_template),
                    role="base")


def preference_view(request: Request, preference: str, backend: Backend, chat_template: bool,
                    role: str = "preference") -> ViewSpec:
    """The view of the prompt with ``preference`` as the system message."""
    ids = build_prompt_ids(backend.tokenizer(), request.prompt, system=preference, chat_template=chat_template)
    return ViewSpec(prompt_ids=ids, role=role)


def build_pair_views(method: str, request: Request, backend: Backend, chat_template: bool) -> list[ViewSpec]:
    """[preference-prompted view, plain view] of one request (the preference as system message)."""
    pref = require_preference(request, method)
    return [preference_view(request, pref, backend, chat_template), plain_view(request, backend, chat_template)]


class PairViewMethod(TokenMethod):
    """A ``TokenMethod`` on two views of the main model: the preference-prompted ``π_1`` and the plain ``π_base``.

    ``combine`` receives ``logprobs[:, 0]`` = log π_1 and ``logprobs[:, 1]`` = log π_base; both views
    advance together in one batched forward. Requests without a preference are errors.
    """

    def build_views(self, request: Request, config: Any, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        return build_pair_views(self.name, request, backend, chat_template)
