"""``preference_prompting``: the preference stated in the prompt, then plain decoding.

The preference text becomes the system message when the tokenizer has a chat template, else a
plain-text prefix (see ``personas.prompts``). Formula: ``scores = log π(· | p, x)``.
"""

from __future__ import annotations

from typing import Any

import torch

from personalign.decoding.method import METHODS, DecodeState, TokenMethod
from personalign.methods.prompt_views import preference_view, require_preference
from personalign.types import Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["PreferencePromptingMethod", "require_preference"]


@METHODS.register
class PreferencePromptingMethod(TokenMethod):
    """Decode the model on the prompt with the preference in it."""

    name = "preference_prompting"
    reads_preference = True

    def build_views(self, request: Request, config: Any, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        return [preference_view(request, require_preference(request, self.name), backend, chat_template)]

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return logprobs[:, 0]
