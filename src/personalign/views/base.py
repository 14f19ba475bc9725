"""The backend contract: the only place where a model forward runs.

A backend advances ``B`` requests x ``K`` views per request. ``prefill`` encodes every view's prompt;
``step`` feeds the same new tokens to every (selected) view of a request and returns float32
log-probabilities for each fed position; ``truncate`` rolls the last tokens of chosen rows back;
``release`` drops finished requests' rows. ``sequence_logprobs`` teacher-forces whole texts (fitting,
scoring, judging).

Views may be split into *groups* at prefill: each group owns its own cache and is advanced by one
batched forward per model, so a method can move one view ahead of another (a drafter ahead of a
judge) without feeding the other. By default all views of one model form one group.

``Backend`` is exactly what the loop, the methods and the personas call; ``BatchingBackend`` adds
``step_many``, which the server's engine uses to serve the steps of many batches with one forward per
model. ``HFBackend`` (``views.hf``) implements both; tests use crafted ones that implement ``Backend``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from personalign.types import ViewSpec

__all__ = ["Backend", "BatchingBackend", "ViewState", "StepCall"]

# one ``step`` call as ``step_many`` takes it: (state, tokens, lengths, views)
StepCall = tuple["ViewState", torch.Tensor, "torch.Tensor | None", "Sequence[int] | None"]


@runtime_checkable
class ViewState(Protocol):
    """Per-batch state of a backend (caches, masks, positions), opaque to methods but for these."""

    batch_size: int
    num_views: int
    last_logprobs: torch.Tensor  # float32 [B, K, V]: next-token log-probs after everything fed
    fed: torch.Tensor  # long [B, K]: tokens fed to each view after its prompt
    live: torch.Tensor  # bool [B]: requests still held (not released)
    specs: list[list[ViewSpec]]  # the views as prefilled

    def last_hidden(self, k: int) -> torch.Tensor:
        """float [B, D]: the output head's input at view ``k``'s last fed position (models that keep it)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """What a decoding method, the loop and the personas may ask of the models."""

    vocab_size: int
    models: Mapping[str, Any]  # model key -> module (read-only for methods: assembly attaches)
    forward_count: int  # forwards run so far (stats)

    def tokenizer(self, model: str = "main") -> Any: ...

    def device(self, model: str = "main") -> torch.device: ...

    def context_length(self, model: str = "main") -> int | None: ...

    def prefill(
        self, views: Sequence[Sequence[ViewSpec]], groups: Sequence[Sequence[int]] | None = None
    ) -> ViewState: ...

    def step(
        self,
        state: ViewState,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        views: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Feed ``tokens`` long [B, L] (row b uses its first ``lengths[b]``) to the selected views.

        Returns float32 log-probs [B, K_selected, L, V]; position ``l`` predicts the token after
        ``tokens[:, l]``. Positions past a row's length are meaningless.
        """
        ...

    def truncate(self, state: ViewState, keep: torch.Tensor, views: Sequence[int] | None = None) -> None:
        """Keep only the first ``keep[b]`` fed tokens of request ``b`` in the selected views."""
        ...

    def release(self, state: ViewState, rows: Sequence[int]) -> None:
        """Drop requests ``rows`` from every cache of ``state``; later steps neither feed nor compute them."""
        ...

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          model: str = "main", batch_size: int = 16) -> list[torch.Tensor]:
        """Per-token log-probs (float32 [len(continuation)]) of each continuation after its prompt."""
        ...


@runtime_checkable
class BatchingBackend(Backend, Protocol):
    """A backend that serves several ``step`` calls (of different batches) with one forward per model."""

    def step_many(self, calls: Sequence[StepCall]) -> list[torch.Tensor]: ...
