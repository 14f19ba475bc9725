"""THE decoding loop: validate -> prefill -> until every row stops: step, append, check stop -> output.

Every method, every backend and every front end (CLI, evaluation, server) decodes through
``decode``; ``generate`` collects its result and ``stream`` turns it into text deltas. The loop takes
an explicit ``torch.Generator`` (no global RNG); a request with its own ``seed`` gets its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.config import check_int
from personalign.decoding.method import DecodeState, Method
from personalign.decoding.sampling import SamplingConfig, SamplingParams
from personalign.decoding.stopping import RowText, eos_ids_of
from personalign.types import GenerationOutput, Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["generate", "stream", "decode", "plan_request", "RequestPlan", "PromptTooLong", "TextDelta", "StepEvent"]

logger = logging.getLogger(__name__)


@dataclass
class StepEvent:
    """Tokens appended to one row by one step."""

    row: int
    tokens: list[int]


@dataclass
class TextDelta:
    """New text of one row, for streaming. ``finish_reason`` is set on the row's last delta."""

    row: int
    text: str
    finish_reason: str | None = None


class PromptTooLong(ValueError):
    """A request's prompt (one of its views) does not fit the model's context."""


@dataclass(frozen=True)
class RequestPlan:
    """One request validated and encoded once (``plan_request``): its config and its views.

    ``decode`` takes plans instead of re-deriving them, so a server validates a request once, in its
    HTTP route, and the engine and the loop reuse what the route built.
    """

    request: Request
    config: Any
    views: list[ViewSpec]

    @property
    def prompt_tokens(self) -> int:
        return len(self.views[0].prompt_ids)


def plan_request(method: Method, request: Request, backend: Backend, chat_template: bool = True) -> RequestPlan:
    """The request's config (its params over the method's defaults) and views, checked against the
    models' contexts.

    Raises:
        ValueError: a bad parameter or a request the method cannot decode (no preference, ...);
            ``PromptTooLong`` when a view's prompt fills a model's context.
    """
    config = method.config_for(request)
    views = method.build_views(request, config, backend, chat_template)
    for spec in views:
        ctx = backend.context_length(spec.model)
        if ctx is not None and spec.length >= ctx:
            raise PromptTooLong(f"the prompt is {spec.length} tokens (with the method's {spec.role or 'view'} prompt); "
                                f"the model's context is {ctx} tokens.")
    return RequestPlan(request=request, config=config, views=views)


def _validate(requests: Sequence[Request], max_new_tokens: int | Sequence[int], B: int) -> list[int]:
    if B == 0:
        raise ValueError("`requests` must hold at least one request.")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise ValueError(f"`requests[{i}]` must be a personalign.Request, got {type(r).__name__}.")
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != B:
        raise ValueError(f"`max_new_tokens` must be one integer or {B}, got {len(budgets)}.")
    for n in budgets:
        check_int("max_new_tokens", n, 1)
    return budgets


def decode(
    method: Method,
    requests: Sequence[Request],
    backend: Backend,
    *,
    max_new_tokens: int | Sequence[int] = 128,
    sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
    stop: Sequence[str] = (),
    generator: torch.Generator | None = None,
    chat_template: bool = True,
    ignore_eos: bool = False,
    on_row: Callable[[int, list[int], str | None], str | None] | None = None,
    plans: Sequence[RequestPlan] | None = None,
) -> Iterator[StepEvent | list[GenerationOutput]]:
    """Run the loop, yielding ``StepEvent``s as tokens are appended and finally the outputs list.

    ``plans`` (one per request, from ``plan_request``) reuse configs and views built beforehand;
    without them the loop plans every request itself.

    ``on_row(b, new_tokens, reason)``, when given, is called after every step for each row that was
    still running, with the tokens the step appended to it and the loop's finish reason (None while
    the row runs on). Returning a reason (e.g. ``"stop"`` for the caller's own stop rule, or
    ``"cancelled"``) ends a running row there: a server streams rows and stops them one by one.
    """
    requests = list(requests)
    state, plans = _start(method, requests, backend, max_new_tokens, sampling, chat_template, plans)
    main = backend.models.get("main") if hasattr(backend, "models") else None
    eos = set() if ignore_eos else eos_ids_of(backend.tokenizer(), main)
    rows = _Rows(backend.tokenizer(), stop, state.budgets, eos)
    release = getattr(backend, "release", None)  # frees the cache rows of finished requests
    forwards0, n_steps = getattr(backend, "forward_count", 0), 0
    while not all(rows.done):
        out = method.step(state, backend, generator)  # one batched forward of every view of every row
        n_steps += 1
        events = rows.advance(out.tokens.tolist(), out.n_tokens.tolist(), state.generated, on_row)
        if any(rows.done):
            state.finished = torch.tensor(rows.done)
            ended = rows.ended()
            if ended and release is not None and not all(rows.done):
                release(state.views, ended)  # their cache rows leave the batch
                rows.released(ended)
        yield from events
    forwards = getattr(backend, "forward_count", 0) - forwards0
    yield [_output(method, plan, state, rows, b, n_steps, forwards) for b, plan in enumerate(plans)]


def _start(method: Method, requests: list[Request], backend: Backend, max_new_tokens: int | Sequence[int],
           sampling: SamplingConfig | Sequence[SamplingConfig] | None, chat_template: bool,
           plans: Sequence[RequestPlan] | None) -> tuple[DecodeState, Sequence[RequestPlan]]:
    """Validate and plan the requests, prefill every view and let the method prepare: the loop's state."""
    B = len(requests)
    budgets = _validate(requests, max_new_tokens, B)
    sampling = sampling if sampling is not None else SamplingConfig()
    samplings = [sampling] * B if isinstance(sampling, SamplingConfig) else list(sampling)
    if len(samplings) != B:
        raise ValueError(f"`sampling` must be one SamplingConfig or {B}, got {len(samplings)}.")
    if plans is None:
        plans = [plan_request(method, r, backend, chat_template) for r in requests]
    elif len(plans) != B or any(p.request is not r for p, r in zip(plans, requests)):
        raise ValueError("`plans` must hold one plan per request, for those requests, in order.")
    for b, plan in enumerate(plans):  # each row's budget fits the context left after its longest view
        for spec in plan.views:
            ctx = backend.context_length(spec.model)
            if ctx is not None and spec.length < ctx and spec.length + budgets[b] > ctx:
                logger.warning("request %d: max_new_tokens cut to %d by the model's context", b, ctx - spec.length)
                budgets[b] = ctx - spec.length
    views = backend.prefill([p.views for p in plans], method.view_groups(len(plans[0].views)))
    dev = views.last_logprobs.device
    state = DecodeState(requests=requests, configs=[p.config for p in plans], views=views,
                        sampling=SamplingParams.from_configs(samplings, device=dev),
                        row_generators=[_row_generator(r.seed, dev) for r in requests],
                        generated=[[] for _ in range(B)], finished=torch.zeros(B, dtype=torch.bool),
                        budgets=list(budgets))
    method.prepare(state, backend)
    return state, plans


class _Rows:
    """Each row's text and the rules that end it: an EOS token, the token budget, a stop string, or
    the caller's ``on_row``."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], budgets: list[int], eos: set[int]) -> None:
        B = len(budgets)
        self.texts = [RowText(tokenizer, stop) for _ in range(B)]
        self.reasons: list[str | None] = [None] * B
        self.done = [False] * B
        self._released = [False] * B
        self.budgets, self.eos = budgets, eos

    def advance(self, tokens: list[list[int]], counts: list[int], generated: list[list[int]],
                on_row: Callable[[int, list[int], str | None], str | None] | None) -> list[StepEvent]:
        """Append one step's tokens (row b emitted ``tokens[b][:counts[b]]``) to every running row."""
        events = []
        for b, done in enumerate(self.done):
            if done:
                continue
            new = self._keep(tokens[b][: counts[b]], len(generated[b]), b)
            generated[b].extend(new)
            self.texts[b].extend(new)
            if self.texts[b].stopped_by_string:
                self.reasons[b] = "stop"
            elif self.reasons[b] is None and len(generated[b]) >= self.budgets[b]:
                self.reasons[b] = "length"
            if on_row is not None:
                override = on_row(b, new, self.reasons[b])
                if self.reasons[b] is None:
                    self.reasons[b] = override
            self.done[b] = self.reasons[b] is not None
            if new:
                events.append(StepEvent(row=b, tokens=new))
        return events

    def _keep(self, emitted: list[int], have: int, b: int) -> list[int]:
        """The emitted tokens row ``b`` keeps: up to and with an EOS (reason ``stop``), within its budget."""
        new: list[int] = []
        for t in emitted:
            new.append(t)
            if t in self.eos:
                self.reasons[b] = "stop"
                break
            if have + len(new) >= self.budgets[b]:
                break
        return new

    def ended(self) -> list[int]:
        """Rows that finished and still hold cache rows."""
        return [b for b, done in enumerate(self.done) if done and not self._released[b]]

    def released(self, rows: list[int]) -> None:
        for b in rows:
            self._released[b] = True


def _output(method: Method, plan: RequestPlan, state: DecodeState, rows: _Rows, b: int, n_steps: int,
            forwards: int) -> GenerationOutput:
    r = plan.request
    stats = dict(state.row_stats(b))
    stats.update(steps=n_steps, batch_forwards=forwards, new_tokens=len(state.generated[b]))
    return GenerationOutput(prompt=r.prompt if isinstance(r.prompt, str) else [dict(m) for m in r.prompt],
                            method=method.name, text=rows.texts[b].text, token_ids=state.generated[b],
                            prompt_token_ids=list(plan.views[0].prompt_ids),
                            finish_reason=rows.reasons[b] or "length", stats=stats)


def _row_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def generate(method: Method, requests: Sequence[Request], backend: Backend, **kwargs: Any) -> list[GenerationOutput]:
    """Decode ``requests`` with ``method`` and return one ``GenerationOutput`` per request."""
    result: list[GenerationOutput] = []
    for event in decode(method, requests, backend, **kwargs):
        if isinstance(event, list):
            result = event
    return result


def stream(method: Method, requests: Sequence[Request], backend: Backend, **kwargs: Any) -> Iterator[TextDelta]:
    """Decode and yield text deltas as they become safe to show (see ``RowText.delta``)."""
    tok = backend.tokenizer()
    stop = kwargs.get("stop", ())
    texts: dict[int, RowText] = {}
    for event in decode(method, requests, backend, **kwargs):
        if isinstance(event, list):
            for b, out in enumerate(event):
                rt = texts.get(b) or RowText(tok, stop)
                rest = rt.delta(final=True)
                yield TextDelta(row=b, text=rest, finish_reason=out.finish_reason)
            return
        rt = texts.setdefault(event.row, RowText(tok, stop))
        rt.extend(event.tokens)
        delta = rt.delta()
        if delta:
            yield TextDelta(row=event.row, text=delta)
