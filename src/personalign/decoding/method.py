"""What a decoding method is (the contract the loop calls), and the state the loop hands it.

A method is a frozen config dataclass + pure tensor functions + a thin ``step``:

* ``requires`` -> the resources it cannot decode without (``"persrm"``, ``"reward"``, ``"pdpo"``);
  ``from_resources(config, loaded)`` makes it from what assembly loaded (``personalign.assembly``);
* ``build_views(request, config, backend, chat_template)`` -> the request's ``ViewSpec`` list; every
  request of a batch yields the same number ``K`` of views, in the same roles. It only reads the
  backend: models a method decodes are attached by assembly before decoding;
* ``view_groups(K)`` -> optional partition of the views into independently advanced caches;
* ``prepare(state, backend)`` -> per-row tensors (weights, betas) into ``state.extra``;
* ``step(state, backend, generator) -> StepOutput``: choose the next token(s) of every row.

Single-token methods subclass ``TokenMethod`` and write only ``combine`` (the formula: view
log-probs [B, K, V] -> scores [B, V]); the shared step feeds last step's tokens, combines and samples.
Methods never call a model themselves: every forward goes through the backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from personalign.config import config_from_mapping, config_to_dict
from personalign.decoding.loaded import Loaded
from personalign.decoding.sampling import SamplingParams, sample
from personalign.registry import Registry
from personalign.types import Request, StepOutput, ViewSpec
from personalign.views.base import Backend

__all__ = ["METHODS", "Method", "TokenMethod", "DecodeState", "EmptyConfig", "get_method", "method_names"]


@dataclass(frozen=True, kw_only=True)
class EmptyConfig:
    """A method without parameters."""


@dataclass
class DecodeState:
    """Everything a method step may read or update for one batch.

    Attributes:
        requests: the B requests.
        configs: per-request method configs (defaults merged with ``request.params``).
        views: the backend's state (caches, ``last_logprobs`` float32 [B, K, V], ``fed`` [B, K]).
        sampling: per-row sampling parameters.
        row_generators: a generator per row that has its own seed, else None.
        pending: long [B, L] tokens emitted last step and not yet fed to the views, or None.
        pending_lengths: long [B] valid length of each pending row (None = all L).
        generated: tokens emitted so far per row.
        finished: bool [B].
        extra: method-private tensors and bookkeeping (per-row weights, statistics).
        budgets: each row's max_new_tokens after the loop's context clamp (methods that emit a
            whole answer at once, e.g. best-of-N, need it).
    """

    requests: list[Request]
    configs: list[Any]
    views: Any
    sampling: SamplingParams
    row_generators: list[torch.Generator | None]
    pending: torch.Tensor | None = None
    pending_lengths: torch.Tensor | None = None
    generated: list[list[int]] = field(default_factory=list)
    finished: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    def next_logprobs(self, backend: Backend, views: Sequence[int] | None = None) -> torch.Tensor:
        """Feed pending tokens (if any) to ``views`` (default all) and return float32 [B, K, V]."""
        if self.pending is not None:
            backend.step(self.views, self.pending, self.pending_lengths, views=views)
            self.pending, self.pending_lengths = None, None
        return self.views.last_logprobs

    def row_stats(self, b: int) -> dict[str, Any]:
        return self.extra.setdefault("stats", [{} for _ in self.requests])[b]


class Method:
    """Base class of every decoding method; subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any | None = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        if not isinstance(base, self.Config):
            raise ValueError(f"{self.name} expects a {self.Config.__name__}, got {type(base).__name__}.")
        self.config = config_from_mapping(self.Config, overrides, base=base) if overrides else base

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> Method:
        return cls(config_from_mapping(cls.Config, params or {}))

    def config_for(self, request: Request) -> Any:
        """This request's config: the method's defaults overridden by ``request.params``."""
        if not request.params:
            return self.config
        return config_from_mapping(self.Config, request.params, base=self.config)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    # -- assembly ---------------------------------------------------------------
    reads_preference: ClassVar[bool] = False  # a request's preference text shapes what it writes
    requires: ClassVar[tuple[str, ...]] = ()  # resource names (``assembly.REQUIREMENTS``)
    uses: ClassVar[tuple[str, ...]] = ()  # optional resources it reads when given (``assembly.RESOURCE_FIELDS``)

    @classmethod
    def from_resources(cls, config: Any, loaded: Loaded) -> Method:
        """The method from its validated ``config`` and what assembly loaded (``decoding.loaded.Loaded``)."""
        return cls(config)

    # -- hooks ----------------------------------------------------------------
    def build_views(self, request: Request, config: Any, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        raise NotImplementedError

    def view_groups(self, num_views: int) -> list[list[int]] | None:
        return None

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        """Build per-row tensors into ``state.extra`` once, after prefill."""

    def step(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        raise NotImplementedError


class TokenMethod(Method):
    """A method that emits one token per step from a formula over the views' log-probs."""

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """View log-probs float32 [B, K, V] -> next-token scores float32 [B, V]."""
        raise NotImplementedError

    def step(self, state: DecodeState, backend: Backend, generator: torch.Generator | None) -> StepOutput:
        logprobs = state.next_logprobs(backend)
        scores = self.combine(logprobs, state)
        tokens = sample(scores, state.sampling, generator, state.row_generators)
        state.pending = tokens[:, None]
        return StepOutput(tokens=tokens[:, None], n_tokens=torch.ones_like(tokens))


METHODS: Registry[type[Method]] = Registry("method")


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (unknown names list the valid ones)."""
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()
