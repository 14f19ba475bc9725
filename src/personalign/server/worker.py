"""The engine worker: one thread that owns the backend and decodes every user's request.

Scheduling, one *round* at a time; a round is ONE forward per model over the rows of every running
request, whatever their methods, then at most one bounded forward of feedback folding:

1. run queued engine calls (``call``: short work that needs the engine thread);
2. admit waiting jobs while fewer than ``max_batch`` rows are running, once the oldest has waited
   ``batch_wait`` seconds (or enough wait to fill the free rows), so that requests arriving
   together, but parsed one by one by the HTTP front end, start together: each job is validated
   (method config, views, context length); valid jobs that arrived together and share a method and
   view layout form one *cohort*, decoded by ``decoding.loop.decode`` (its prefill runs at once);
3. resume every cohort until it asks for its next forward, then serve all those forwards with
   ``HFBackend.step_many``: one forward per model, the caches of all cohorts joined row-wise;
4. advance feedback folding (``server.fold_runner``) by at most one forward of
   ``views.scoring.ChunkedScorer`` (the sequences a fold scores, batched across the waiting folds)
   within the *fold budget* (``server.fold_budget``):
   while requests decode, folding earns ``fold_share`` of each round's decoding time and spends it on
   a forward once it covers one, so a chat's latency stays within ``1 + fold_share`` of an idle
   server's on average, whatever feedback is queued; when none decodes, a forward takes
   ``fold_idle_ms`` (which bounds how long a request that arrives meanwhile waits to start). On any
   machine a forward feeds enough tokens that its fixed cost is at most half its time. Folds wait in
   a bounded queue (``max_folds``; ``submit_fold`` raises ``QueueFull`` beyond it, HTTP 429). A *fold task* (``FoldJob.task``: a user's P-DPO embedding fit)
   takes its turn in the same queue and budget: one piece — whole pairs, forward and backward — per
   folding turn, sized by its own cost model.

Each cohort's ``decode`` runs in a greenlet on the engine thread, with the backend seen through
``_RoundBackend``, whose ``step`` parks the greenlet until the round's joined forward is done. So
methods stay plain sequential code, yet a ``base`` row, a Drift row with its nine views and a
Persona-judge row drafting its tokens advance in the same forward; a method that needs several
forwards per token (Persona-judge drafts, ARGS candidates, best-of-N's inner decode) simply takes
part in several rounds. A request that arrives while others run joins at the next round, and a row
leaves the step it ends (EOS, its budget, one of its own stop strings, or its client gone):
``decode`` releases its cache rows, so later rounds neither compute nor store them.

Waiting jobs are bounded by ``max_pending``; ``submit`` raises ``QueueFull`` beyond it (HTTP 429).
Every result leaves the thread through ``loop.call_soon_threadsafe`` into the job's asyncio queue
(a fold's into its future).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import greenlet
import torch

from personalign.decoding.loop import PromptTooLong, RequestPlan, decode, plan_request
from personalign.decoding.method import Method
from personalign.decoding.sampling import SamplingConfig
from personalign.decoding.stopping import RowText
from personalign.server.fold_runner import FoldJob, FoldRunner, FoldStats
from personalign.types import Request
from personalign.views.base import BatchingBackend

__all__ = ["EngineWorker", "Job", "FoldJob", "QueueFull", "Delta", "Done", "Failed", "Event"]

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound."""


@dataclass(frozen=True)
class Delta:
    """New text of a job's reply (``index``: the job's choice in its request)."""

    text: str
    index: int = 0


@dataclass(frozen=True)
class Done:
    """The job's last event: why it ended and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    index: int = 0


@dataclass(frozen=True)
class Failed:
    """The job failed (before any ``Delta``, unless the engine itself failed): an HTTP status, a
    message and the request field at fault (or None)."""

    status: int
    message: str
    param: str | None = None
    index: int = 0


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    """One reply for the worker to decode: a request already validated and encoded (``plan``).

    Events put on ``events``: ``Delta`` as text becomes safe to show, then ``Done``; or ``Failed``.
    Without a ``plan`` (a job made by hand) the engine plans the request itself.

    The ``n`` choices of one chat request are ``n`` jobs submitted together (``submit_group``): choice
    ``index`` of ``group`` jobs, sharing one ``events`` queue (every event carries its ``index``). They
    are admitted together, so choices of one method decode as rows of one batch and every choice
    advances in the same rounds.
    """

    method: str
    request: Request
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    done: bool = False
    prompt_tokens: int = 0
    submitted: float = 0.0
    text: RowText | None = None
    group_key: tuple = ()
    checked_at: float = 0.0  # when the HTTP side last checked that the client is still there
    plan: RequestPlan | None = None
    index: int = 0
    group: int = 1

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is waiting
            self.cancelled = True


class _RoundBackend:
    """The backend as a cohort's ``decode`` sees it: ``step`` waits for the round's joined forward.

    Everything else (prefill, truncate, release, tokenizers) goes straight to the real backend.
    """

    def __init__(self, backend: BatchingBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, state: Any, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
             views: Any = None) -> torch.Tensor:
        me = greenlet.getcurrent()
        if me.parent is None:  # not inside a cohort: a plain call
            return self._backend.step(state, tokens, lengths, views)
        return me.parent.switch(_StepCall((state, tokens, lengths, views)))


@dataclass
class _StepCall:
    args: tuple


@dataclass(eq=False)
class _Cohort:
    """Jobs decoded as one ``decode`` batch, running in their own greenlet."""

    jobs: list[Job]
    method: str
    glet: Any = None
    call: _StepCall | None = None  # the forward it waits for
    result: Any = None  # what that forward returned, handed back at the next switch


@dataclass
class EngineStats(FoldStats):
    ticks: int = 0  # scheduler rounds
    steps: int = 0  # rounds that served forwards
    forwards: int = 0  # model forwards those rounds ran (one per model and round)
    cohorts: int = 0
    rows: int = 0
    max_rows_in_tick: int = 0  # requests advanced in one round, over all cohorts
    max_cohort_rows: int = 0  # requests in one round's joined forward
    max_methods_in_forward: int = 0  # distinct methods whose rows shared one forward
    rejected: int = 0
    cancelled: int = 0
    per_method: dict[str, int] = field(default_factory=dict)


class EngineWorker:
    """Owns ``backend`` and decodes submitted jobs on its own thread.

    Args:
        backend: an ``HFBackend`` (or any backend the methods accept).
        methods: method name -> ready instance (its config holds the server defaults).
        max_pending: waiting jobs beyond which ``submit`` raises ``QueueFull``.
        max_batch: rows decoded at once over all cohorts.
        chat_template: encode prompts with the tokenizer's chat template when it has one.
        seed: seed of the worker's generator (rows with their own ``seed`` use their own).
        batch_wait: seconds the oldest waiting job may wait for others to start with it.
        switch_interval: the interpreter's thread switch interval while the worker runs (restored
            at ``stop``), or None to leave it. The engine thread runs Python between tensor ops and
            the HTTP thread must get the GIL to ship each token; at Python's default (5 ms) a
            single-row decode waits on that hand-off at every token (measured: 28 vs 330 tokens/s
            at concurrency 1 on stories260k, ``benchmarks/server_throughput.py``).
        max_folds: feedback items waiting for folding or folding; ``submit_fold`` raises beyond it.
        fold_share: a round's folding forward may take this share of its decoding forward's time.
        fold_idle_ms: the folding forward's time when nothing decodes.
        fold_unit_rows: scored sequences advanced together (one cache; bounds folding's memory).
        fold_batch_rows: sequences of waiting folds scored as one batch.
    """

    def __init__(self, backend: BatchingBackend, methods: dict[str, Method], *, max_pending: int = 64, max_batch: int = 16,
                 chat_template: bool = True, seed: int = 0, batch_wait: float = 0.02,
                 switch_interval: float | None = 0.0005, max_folds: int = 64, fold_share: float = 0.5,
                 fold_idle_ms: float = 200.0, fold_unit_rows: int = 4, fold_batch_rows: int = 256) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError(f"`max_pending` and `max_batch` must be >= 1, got {max_pending}, {max_batch}.")
        if max_folds < 1:
            raise ValueError(f"`max_folds` must be >= 1, got {max_folds}.")
        self.max_folds = max_folds
        self._decode_seconds = 0.0  # this round's decoding forward time
        if not 0 <= batch_wait <= 10:
            raise ValueError(f"`batch_wait` must lie in [0, 10] seconds, got {batch_wait}.")
        if switch_interval is not None and not 0 < switch_interval <= 1:
            raise ValueError(f"`switch_interval` must lie in (0, 1] seconds or be None, got {switch_interval}.")
        self.batch_wait = batch_wait
        self.switch_interval = switch_interval
        self._saved_interval: float | None = None
        self.backend = backend
        self.methods = dict(methods)
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.chat_template = chat_template
        self.generator = torch.Generator(device=backend.device() if hasattr(backend, "device") else "cpu")
        self.generator.manual_seed(seed)
        self.stats = EngineStats()
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[Any], Any], concurrent.futures.Future]] = deque()
        self._cohorts: list[_Cohort] = []
        self._cv = threading.Condition()
        self.folding = FoldRunner(backend, self.stats, self._cv, fold_share=fold_share, fold_idle_ms=fold_idle_ms,
                                  fold_unit_rows=fold_unit_rows, fold_batch_rows=fold_batch_rows)
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        if self._thread is None:
            if self.switch_interval is not None:
                self._saved_interval = sys.getswitchinterval()
                sys.setswitchinterval(self.switch_interval)
            self._thread = threading.Thread(target=self._run, name="personalign-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._saved_interval is not None:
            sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``QueueFull`` when ``max_pending`` jobs already wait."""
        self.submit_group([job])

    def submit_group(self, jobs: list[Job]) -> None:
        """Queue the choices of one request together (all or none), admitted together.

        Raises ``QueueFull`` when they do not fit in ``max_pending``, ``ValueError`` when there are more
        than ``max_batch`` of them (they could never start together)."""
        if not 1 <= len(jobs) <= self.max_batch:
            raise ValueError(f"a request's choices must number 1-{self.max_batch} (max_batch), got {len(jobs)}.")
        with self._cv:
            if len(self._pending) + len(jobs) > self.max_pending:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting (limit {self.max_pending}).")
            now = time.monotonic()
            for i, job in enumerate(jobs):
                job.submitted, job.index, job.group = now, i, len(jobs)
                self._pending.append(job)
            self._cv.notify_all()

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(backend)`` on the engine thread between steps; its result comes in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def submit_fold(self, job: FoldJob) -> None:
        """Queue a fold's scoring; raises ``QueueFull`` when ``max_folds`` folds wait or run."""
        with self._cv:
            n = self.folding.waiting + self.folding.running
            if n >= self.max_folds:
                raise QueueFull(f"{n} feedback items are being folded (limit {self.max_folds}).")
            self.folding.queue(job)
            self._cv.notify_all()

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._pending), "running": self._running_rows(),
                    "max_pending": self.max_pending, "max_batch": self.max_batch,
                    "folds_waiting": self.folding.waiting, "folds_running": self.folding.running,
                    "max_folds": self.max_folds}

    # ------------------------------------------------------------------ engine thread
    def _running_rows(self) -> int:
        return sum(not j.done for c in self._cohorts for j in c.jobs)

    def _admission_delay(self) -> float | None:
        """Seconds until waiting jobs should start (0 = now); None when nothing waits. Holds ``_cv``."""
        if not self._pending:
            return None
        if len(self._pending) >= self.max_batch - self._running_rows():
            return 0.0
        return max(0.0, self._pending[0].submitted + self.batch_wait - time.monotonic())

    def _run(self) -> None:
        self._round_backend = _RoundBackend(self.backend)
        while True:
            with self._cv:
                while not self._stop and not self._calls and not self._cohorts and self.folding.idle:
                    delay = self._admission_delay()
                    if delay == 0.0:
                        break
                    self._cv.wait(timeout=1.0 if delay is None else delay)
                if self._stop:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.backend))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            self._admit()
            self.stats.ticks += 1
            self.stats.max_rows_in_tick = max(self.stats.max_rows_in_tick, self._running_rows())
            self._decode_seconds = 0.0
            self._round()
            self.folding.round(busy=bool(self._cohorts) or self._admission_delay() is not None,
                               decode_seconds=self._decode_seconds)
        for c in self._cohorts:
            self._fail(c.jobs, 503, "the server is shutting down.")
            if c.glet is not None and not c.glet.dead:
                c.glet.throw(greenlet.GreenletExit)
        with self._cv:
            self._fail(list(self._pending), 503, "the server is shutting down.")
            self.folding.stop()

    def _round(self) -> None:
        """Resume every cohort up to its next forward, then serve them all with one forward per model."""
        for c in list(self._cohorts):
            self._resume(c)
        waiting = [c for c in self._cohorts if c.call is not None]
        if not waiting:
            return
        f0 = getattr(self.backend, "forward_count", 0)
        t0 = time.perf_counter()
        try:
            results = self.backend.step_many([c.call.args for c in waiting])
        except ValueError:  # a call is invalid (checked before anything runs): serve each alone
            results = []
            for c in waiting:
                try:
                    results.append(self.backend.step(*c.call.args))
                except ValueError as e:  # this cohort's rows fail, the others run on
                    results.append(e)
        except Exception as e:  # noqa: BLE001 - the forward itself failed: its caches are not to be trusted
            logger.exception("a joined forward failed")
            results = [e] * len(waiting)
        self._decode_seconds = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.forwards += getattr(self.backend, "forward_count", 0) - f0
        live = sum(int(c.call.args[0].live.sum()) for c in waiting)
        self.stats.max_cohort_rows = max(self.stats.max_cohort_rows, live)
        self.stats.max_methods_in_forward = max(self.stats.max_methods_in_forward, len({c.method for c in waiting}))
        for c, r in zip(waiting, results):
            c.call, c.result = None, r

    def _resume(self, c: _Cohort) -> None:
        """Run cohort ``c`` until it asks for a forward (``c.call``) or ends (removed)."""
        try:
            if isinstance(c.result, Exception):
                err, c.result = c.result, None
                out = c.glet.throw(err)
            else:
                value, c.result = c.result, None
                out = c.glet.switch(value)
        except ValueError as e:
            self._end(c)
            self._fail(c.jobs, 400, str(e), "personalization")
            return
        except Exception as e:  # noqa: BLE001 - one broken batch must not stop the server
            logger.exception("decoding a %s batch failed", c.method)
            self._end(c)
            self._fail(c.jobs, 500, f"decoding failed: {type(e).__name__}: {e}")
            return
        if isinstance(out, _StepCall):
            c.call = out
        else:  # decode returned: every row ended
            self._end(c)

    def _end(self, c: _Cohort) -> None:
        if c in self._cohorts:
            self._cohorts.remove(c)

    def _admit(self) -> None:
        running = self._running_rows()
        new: list[Job] = []
        with self._cv:
            if self._admission_delay() != 0.0:
                return
            while self._pending and running + len(new) + self._pending[0].group <= self.max_batch:
                group = [self._pending.popleft() for _ in range(self._pending[0].group)]  # a request's choices
                for job in group:
                    if job.cancelled:
                        self.stats.cancelled += 1
                    else:
                        new.append(job)
        groups: dict[tuple, list[Job]] = {}
        for job in new:
            if self._validate(job):
                groups.setdefault(job.group_key, []).append(job)
        for jobs in groups.values():
            self._start(jobs)

    def _validate(self, job: Job) -> bool:
        """The job's plan (made once, by the HTTP route, or here for a job made by hand): a bad request
        fails alone, never its batch neighbours."""
        if job.plan is None:
            try:
                job.plan = plan_request(self.methods[job.method], job.request, self.backend, self.chat_template)
            except ValueError as e:
                self._fail([job], 400, str(e), "messages" if isinstance(e, PromptTooLong) else "personalization")
                return False
            except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                logger.exception("building the views of a %s request failed", job.method)
                self._fail([job], 500, f"the engine could not prepare this request: {type(e).__name__}: {e}")
                return False
        job.prompt_tokens = job.plan.prompt_tokens
        job.group_key = (job.method, tuple(v.model for v in job.plan.views))
        job.text = RowText(self.backend.tokenizer(), job.stop)
        return True

    def _start(self, jobs: list[Job]) -> None:
        cohort = _Cohort(jobs=jobs, method=jobs[0].method)
        method = self.methods[jobs[0].method]

        def on_row(b: int, new: list[int], reason: str | None) -> str | None:
            job = jobs[b]
            if job.done:
                return "cancelled"
            job.text.extend(new)
            override = None
            if job.text.stopped_by_string:
                override = "stop"
            elif job.cancelled:
                override = "cancelled"
            final = reason or override
            if final == "cancelled":
                self.stats.cancelled += 1
                job.done = True
                return override
            delta = job.text.delta(final=final is not None)
            if delta:
                job.post(Delta(delta, job.index))
            if final is not None:
                job.done = True
                job.post(Done(final, job.prompt_tokens, len(job.text.ids), job.index))
            return override

        def run(*_: Any) -> None:
            for _ in decode(
                method, [j.request for j in jobs], self._round_backend,
                max_new_tokens=[j.max_tokens for j in jobs], sampling=[j.sampling for j in jobs],
                generator=self.generator, chat_template=self.chat_template, on_row=on_row,
                plans=[j.plan for j in jobs],
            ):
                pass

        cohort.glet = greenlet.greenlet(run)
        self._cohorts.append(cohort)
        self.stats.cohorts += 1
        self.stats.rows += len(jobs)
        self.stats.per_method[jobs[0].method] = self.stats.per_method.get(jobs[0].method, 0) + len(jobs)

    def _fail(self, jobs: list[Job], status: int, message: str, param: str | None = None) -> None:
        for job in jobs:
            if not job.done:
                job.done = True
                job.post(Failed(status, message, param, job.index))
