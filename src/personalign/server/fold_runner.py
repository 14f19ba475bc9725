"""The folding side of the engine: waiting fold jobs and at most one bounded forward of them per round
(``server.worker``, step 4), on the engine thread.

A ``FoldJob`` scores the teacher-forced sequences of one feedback item (``views.scoring.ChunkedScorer``,
batched across the waiting items that share a model), or runs a *fold task* alone (anything with
``advance(tokens)`` and ``done``, e.g. a user's P-DPO embedding fit). ``FoldRunner.round`` sizes and
times each forward with the folding budget (``server.fold_budget``): while requests decode, folding
takes about ``fold_share`` of the time; when nothing decodes, a forward takes ``fold_idle_ms``; on any
machine a forward's fixed part is at most half its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from personalign.server.fold_budget import FoldBudget, FoldCost
from personalign.views.base import BatchingBackend
from personalign.views.scoring import ChunkedScorer

__all__ = ["FoldJob", "FoldRunner", "FoldStats"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class FoldJob:
    """The scoring of one feedback item: teacher-forced ``rows`` on the backend's model ``model``.

    ``future`` (on ``loop``) gets the rows' per-token log-probs (``ChunkedScorer.result``) or the
    exception that stopped them. A cancelled job (``cancel``, on ``loop``) gets None at once and is
    dropped before it starts; a batch whose jobs are all cancelled stops and frees its cache.

    A job with a ``task`` instead (no rows) runs that task in bounded pieces, alone: anything with
    ``advance(tokens) -> tokens fed`` and ``done`` (e.g. ``training.pdpo.user_fit.EmbeddingFit``, a
    user's P-DPO embedding fitted from their feedback); ``future`` gets the finished task.
    """

    rows: list[tuple[list[int], list[int]]]
    model: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    label: str = ""
    cancelled: bool = False
    task: Any = None

    def cancel(self) -> None:
        """Stop waiting for this job (on ``loop``'s thread): its future gets None; the engine skips it."""
        self.cancelled = True
        if not self.future.done():
            self.future.set_result(None)

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def set_() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(set_)


@dataclass
class FoldStats:
    folds: int = 0  # feedback items scored
    fits: int = 0  # fold tasks run (P-DPO embedding fits)
    fold_forwards: int = 0
    fold_tokens: int = 0
    fold_seconds: float = 0.0
    folds_dropped: int = 0  # folds abandoned mid-scoring because every item of their batch was deleted


class FoldRunner:
    """The fold queue and its forwards (module docstring); driven by the engine thread.

    Args:
        backend: the engine's backend.
        stats: where the counts go (the engine's stats).
        cv: the engine's condition: guards the queue between the HTTP threads and the engine thread.
        fold_share, fold_idle_ms: the folding budget (``server.fold_budget``).
        fold_unit_rows: scored sequences advanced together (one cache; bounds folding's memory).
        fold_batch_rows: sequences of waiting folds scored as one batch.
    """

    def __init__(self, backend: BatchingBackend, stats: FoldStats, cv: threading.Condition, *, fold_share: float,
                 fold_idle_ms: float, fold_unit_rows: int, fold_batch_rows: int) -> None:
        if fold_unit_rows < 1 or fold_batch_rows < 1:
            raise ValueError("`fold_unit_rows` and `fold_batch_rows` must be >= 1.")
        if not 0 < fold_share <= 10 or not 1 <= fold_idle_ms <= 60_000:
            raise ValueError(f"`fold_share` must lie in (0, 10] and `fold_idle_ms` in [1, 60000], got {fold_share}, "
                             f"{fold_idle_ms}.")
        self._backend, self.stats, self._cv = backend, stats, cv
        self.fold_unit_rows, self.fold_batch_rows = fold_unit_rows, fold_batch_rows
        self._queue: deque[FoldJob] = deque()
        self._batch: list[tuple[FoldJob, int, int]] = []  # (job, first row, end row) in the scorer
        self._scorer: Any = None  # a ChunkedScorer over a batch of folds, or a fold task
        self._fold_budget = FoldBudget(fold_share, fold_idle_ms / 1000)
        self._fold_cost = FoldCost()
        self._task_cost = FoldCost()  # a fold task's piece (forward and backward), fitted apart

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def idle(self) -> bool:
        """Nothing waits or runs (the engine may sleep)."""
        return not self._queue and self._scorer is None

    def queue(self, job: FoldJob) -> None:
        """Add a job (call holding ``cv``)."""
        self._queue.append(job)

    def stop(self) -> None:
        """Tell every waiting and running job that the server stopped (call holding ``cv``)."""
        stopping = RuntimeError("the server stopped before this feedback was folded; it stays stored and is "
                                "folded when the server starts again.")
        for job in [j for j, _, _ in self._batch] + list(self._queue):
            job.resolve(error=stopping)
        self._queue.clear()
        self._batch, self._scorer = [], None

    def round(self, busy: bool, decode_seconds: float) -> None:
        """At most one bounded forward of feedback folding (module docstring, step 4), sized and timed by
        the folding budget (``server.fold_budget``): while requests decode, folding takes about
        ``fold_share`` of the time; when nothing decodes, a forward takes ``fold_idle_ms``; on any machine
        a forward's fixed part is at most half its time, so folding never crawls at a few tokens a forward.
        """
        if self._scorer is not None and all(job.cancelled for job, _, _ in self._batch):
            self._drop_batch()  # every item of the batch was deleted: stop scoring it
        if self._scorer is None and not self._start_batch():
            self._fold_budget.reset()
            return
        task = self._batch[0][0].task is not None
        cost, least = (self._task_cost, 1) if task else (self._fold_cost, self.fold_unit_rows)
        tokens = self._fold_budget.plan(cost, least, busy, decode_seconds)
        if tokens is None:
            return  # not enough credit for a forward yet: decoding goes on
        t0 = time.perf_counter()
        try:
            fed = self._scorer.advance(tokens)
        except Exception as e:  # noqa: BLE001 - the batch fails; every fold in it is told why
            logger.exception("a folding forward failed")
            for job, _, _ in self._batch:
                job.resolve(error=e)
            with self._cv:
                self._batch, self._scorer = [], None
            return
        dt = max(time.perf_counter() - t0, 1e-6)
        cost.observe(fed, dt)
        self._fold_budget.spent(dt, busy)
        self.stats.fold_forwards += 1
        self.stats.fold_tokens += fed
        self.stats.fold_seconds += dt
        if self._scorer.done and task:
            job = self._batch[0][0]
            if not job.cancelled:
                job.resolve(self._scorer)
            self.stats.fits += 1
            with self._cv:
                self._batch, self._scorer = [], None
        elif self._scorer.done:
            out = self._scorer.result()
            for job, a, b in self._batch:
                if not job.cancelled:
                    job.resolve(out[a:b])
                self.stats.folds += 1
            with self._cv:
                self._batch, self._scorer = [], None

    def _drop_batch(self) -> None:
        """Abandon the running fold batch, its cache rows released (a fold task simply stops)."""
        close = getattr(self._scorer, "close", None)
        if close is not None:
            close()
        self.stats.folds_dropped += len(self._batch)
        with self._cv:
            self._batch, self._scorer = [], None

    def _start_batch(self) -> bool:
        """Take waiting folds (one steering model, at most ``fold_batch_rows`` sequences) into a new scorer."""
        with self._cv:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
            if not self._queue:
                return False
            if self._queue[0].task is not None:  # a task runs alone
                job = self._queue.popleft()
                self._batch, self._scorer = [(job, 0, 0)], job.task
                return True
            model = self._queue[0].model
            batch, rows = [], []
            while self._queue and self._queue[0].task is None and self._queue[0].model == model and (
                    not rows or len(rows) + len(self._queue[0].rows) <= self.fold_batch_rows):
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                batch.append((job, len(rows), len(rows) + len(job.rows)))
                rows.extend(job.rows)
            self._batch = batch
        try:
            self._scorer = ChunkedScorer(self._backend, rows, model=model, unit_rows=self.fold_unit_rows)
        except ValueError as e:
            for job, _, _ in batch:
                job.resolve(error=e)
            with self._cv:
                self._batch = []
            return False
        return True
