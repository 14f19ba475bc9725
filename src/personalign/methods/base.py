"""``base``: plain decoding of the model on the user's prompt — the reference every method is judged against.

Formula: ``scores = log π(· | x)`` from a single view. Greedy through the loop equals
``model.generate(do_sample=False)`` token for token (tested on real models).
"""

from __future__ import annotations

from typing import Any

import torch

from personalign.decoding.method import METHODS, DecodeState, TokenMethod
from personalign.methods.prompt_views import plain_view
from personalign.types import Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["BaseMethod"]


@METHODS.register
class BaseMethod(TokenMethod):
    """Plain decoding; the request's preference, if any, is ignored."""

    name = "base"

    def build_views(self, request: Request, config: Any, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        return [plain_view(request, backend, chat_template)]

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return logprobs[:, 0]
