"""Folding feedback into users' Drift profiles: bounded, off the chat's critical path, in order, once.

Drift (seed 002) models a user as weights ``p = v / ‖v‖`` over attribute prompts, where ``v`` sums,
over the user's pairs ``(x, y_w, y_l)``, the per-attribute log-likelihood-ratio differences
``W_i − L_i`` measured by the steering model. A new pair only adds its own ``W``, ``L`` rows, so the
expensive part of a fold — scoring the chosen and the rejected reply under the base and every
attribute prompt of the user's pool, ``2 (A + 1)`` teacher-forced sequences — does not depend on
the rest of the profile, and the merge that follows is cheap.

One feedback item (``POST /v1/feedback``, ``server.routes.feedback``) states one pair, or — a user's choice
among a completion's ``n`` choices — ``n − 1`` pairs sharing the prompt and the chosen reply, scored
together: the chosen reply is scored once, so the item is ``n (A + 1)`` sequences:

1. ``prepare``: its texts are checked against the limits — characters, then the tokens of every
   sequence to score under the steering model's tokenizer, against ``max_feedback_tokens`` and the
   model's context (``FoldRejected``, a 400; no model work) — and its scoring rows are built;
2. the item is stored, unfolded: the acknowledgement. Items of one user are stored and queued under
   one lock, so the queue's order is the order of acknowledgement;
3. ``start``: the engine scores its rows (``server.worker.FoldJob``) within the rounds' folding
   budget, batched with other waiting folds; at most ``max_folds`` items wait or fold
   (``FoldQueueFull``, a 429);
4. the merge — the rows appended to the profile, the profile written and the item marked folded in
   ONE transaction guarded by the profile's version — runs after every earlier item of the same user
   has merged. A concurrent change of the profile re-runs the merge alone (``ProfileConflict``);
   the scoring is repeated only if the profile's pool itself was replaced meanwhile.

Where the server serves a ``pdpo`` checkpoint, a ``pdpo`` user it never saw (the profile's method is
``pdpo``, or it holds a fitted embedding; neither its ``pdpo_user_id`` nor its id is in the user index)
also learns their own P-DPO embedding from the same item (our
extension, ``training.pdpo.user_fit``): after the user's earlier items have merged, an
``EmbeddingFit`` on the item's pairs and the user's most recent earlier ones (``max_pairs`` in all)
starts from their last embedding (or ``e_0``) and runs as a fold task in the engine's folding budget,
a piece (whole pairs, forward and backward) per round; step 4 then writes the embedding with the
Drift rows in the same transaction, and stores it with the item (``learned``). Deleting a folded item
puts back the embedding of the item before it and ``replay`` refits the later items in order, as fold
tasks, so the embedding equals a fit of the surviving items from scratch (one pair cannot be taken
back out of a fitted embedding).

``wait: true`` answers after step 4, ``wait: false`` after step 2 (202). A server stopped before step
4 leaves the item stored and unfolded; ``recover`` folds every such item when it starts again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from personalign.personas import drift
from personalign.personas.attributes import AttributePool, default_pool
from personalign.personas.identity import compare_identity, steer_identity
from personalign.server.embedding_learner import EmbeddingLearner, fit_pairs
from personalign.server.schemas import Limits
from personalign.server.store import ProfileConflict, Store, StoreBusy, StoredFeedback, StoreUnavailable
from personalign.server.store_tables import drift_prompt
from personalign.server.worker import EngineWorker, FoldJob, QueueFull
from personalign.training.pdpo.user_fit import EmbeddingFit, EmbeddingFitConfig, UserEmbedding
from personalign.views.base import Backend

__all__ = ["FoldManager", "EmbeddingLearner", "FoldRejected", "FoldQueueFull", "EngineStopped", "PreferencePair",
           "drift_prompt",
           "check_profile", "unfold_pairs", "item_pair_id", "feedback_pairs", "steering_model_key"]

logger = logging.getLogger(__name__)

PreferencePair = drift.PreferencePair
_MERGE_RETRIES = 50


class FoldRejected(ValueError):
    """A feedback item the server will not fold: ``field`` and the reason (a 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class FoldQueueFull(Exception):
    """``max_folds`` items are waiting or folding (a 429)."""


class EngineStopped(Exception):
    """The server stopped before the item was folded (it stays stored; folded at the next start)."""


def steering_model_key(methods: dict[str, Any], backend: Backend) -> str:
    """The model Drift steers with on this server: feedback is scored by the same model."""
    key = getattr(getattr(methods.get("drift"), "config", None), "steer_model", None)
    if key in backend.models:
        return key
    return "steer" if "steer" in backend.models else "main"


def check_profile(profile: dict[str, Any]) -> None:
    """``ValueError`` unless ``profile`` reads as a Drift profile."""
    drift.DriftProfile.from_dict(profile)


def feedback_pairs(fb: StoredFeedback) -> list[PreferencePair]:
    """The pairs a stored item states, as Drift scores them (``StoredFeedback.pairs``)."""
    return fb.pairs()


def item_pair_id(feedback_id: str, pair: PreferencePair) -> str:
    """The id of the Drift row one item folded for ``pair``: the pair's content id and the item's id, so
    two items stating the same pair fold two rows, and deleting one takes back exactly its own."""
    return f"{pair.pair_id}@{feedback_id}"


def unfold_pairs(profile: dict[str, Any], fb: StoredFeedback, legacy: bool = False) -> dict[str, Any] | None:
    """``profile`` without the rows item ``fb`` folded; None when none of them is in it.

    ``legacy``: the rows an earlier release folded instead, which carry the pair's content id alone (one
    row for every item stating that pair; the caller takes them out only when no other folded item
    states the pair)."""
    prof = drift.DriftProfile.from_dict(profile)
    pairs = feedback_pairs(fb)
    ids = [p.pair_id for p in pairs] if legacy else [item_pair_id(fb.feedback_id, p) for p in pairs]
    present = [i for i in ids if i in prof.pair_ids]
    if not present:
        return None
    for i in present:
        prof.remove_pair(i)
    return prof.to_dict()


@dataclass(frozen=True)
class FoldPlan:
    """What to score for one item (its pairs share the prompt and the chosen reply), and how its rows
    merge: the pool and scoring settings of the user's profile at the time (or the defaults of a new
    profile)."""

    pairs: list[PreferencePair]
    rows: list[tuple[list[int], list[int]]]
    pool: AttributePool
    chat_template: bool
    max_response_tokens: int | None
    top_m: int = 7


@dataclass(eq=False)
class FoldTicket:
    owner: str
    user: str
    feedback_id: str
    plan: FoldPlan
    merged: asyncio.Future  # -> StoredFeedback (folded, or with fold_error), None when the item is gone
    job: FoldJob | None = None
    fit_job: FoldJob | None = None
    merging: bool = False
    cancelled: bool = False
    previous: asyncio.Future | None = None  # the merge of the user's item before this one


@dataclass
class _UserQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tail: asyncio.Future | None = None  # the last item's merge


class FoldManager:
    """Schedules the folds of one server (see the module docstring).

    Args:
        engine: the engine worker that scores (``submit_fold``).
        store: where items and profiles live.
        limits: ``max_feedback_chars``, ``max_feedback_tokens``, ``max_folds``.
        steer_key: the backend model that scores (Drift's steering model).
        chat_template: how a new profile scores prompts.
        run_sync: runs a blocking function off the event loop (the server's thread pool).
        embedding_fit: how new users' P-DPO embeddings are fitted where ``pdpo`` is served; None: not.
    """

    def __init__(self, engine: EngineWorker, store: Store, limits: Limits, *, steer_key: str,
                 chat_template: bool, run_sync: Any, embedding_fit: EmbeddingFitConfig | None = None) -> None:
        self.engine, self.store, self.limits = engine, store, limits
        self.steer_key, self.chat_template, self.run_sync = steer_key, chat_template, run_sync
        backend = engine.backend
        self.tokenizer = backend.tokenizer(steer_key)
        self.identity = steer_identity(backend.models[steer_key], self.tokenizer)
        ctx = backend.context_length(steer_key)
        self.max_tokens = min(limits.max_feedback_tokens, ctx - 1) if ctx else limits.max_feedback_tokens
        pdpo = engine.methods.get("pdpo")
        self.learner = None if embedding_fit is None or pdpo is None else EmbeddingLearner.of(
            pdpo, backend, chat_template=chat_template, config=embedding_fit, max_prompt_tokens=self.max_tokens)
        self._users: dict[tuple[str, str], _UserQueue] = {}
        self._tickets: dict[tuple[str, str], FoldTicket] = {}
        self._backlog: deque[FoldTicket] = deque()  # recovered items beyond the engine's queue
        self.cancelled = 0  # folds stopped because their item was deleted first
        self._replay_gen: dict[tuple[str, str], int] = {}  # the latest replay queued for each user
        self.replays_pending = 0  # replays queued or running
        self.replayed = 0  # items whose embedding a replay refitted

    # ------------------------------------------------------------------ step 1: bounds, rows
    def user_lock(self, owner: str, user: str) -> asyncio.Lock:
        return self._users.setdefault((owner, user), _UserQueue()).lock

    def check_chars(self, pairs: list[PreferencePair]) -> None:
        """``FoldRejected`` when a text is longer than ``max_feedback_chars`` (checked before anything else)."""
        lim = self.limits.max_feedback_chars
        pair = pairs[0]
        prompt = pair.prompt if isinstance(pair.prompt, str) else "".join(m["content"] for m in pair.prompt)
        texts = [("prompt", prompt), ("chosen", pair.chosen)] + [("rejected", p.rejected) for p in pairs]
        for name, text in texts:
            if len(text) > lim:
                raise FoldRejected(name, f"`{name}` is {len(text)} characters; the limit is {lim} "
                                         "(max_feedback_chars).")

    def prepare(self, pairs: list[PreferencePair], profile: dict[str, Any]) -> FoldPlan:
        """The item's scoring rows under the user's pool (blocking: tokenizes; run off the loop).

        Raises:
            FoldRejected: a text over a limit, a sequence over ``max_feedback_tokens`` or the steering
                model's context, a profile fitted with another steering model or with hand-set weights.
        """
        self.check_chars(pairs)
        pair = pairs[0]
        if any((p.prompt, p.chosen) != (pair.prompt, pair.chosen) for p in pairs):
            raise ValueError("an item's pairs must share the prompt and the chosen reply.")
        stored = profile.get("drift_profile")
        if stored is None:
            pool, chat, max_resp, top_m = default_pool(), self.chat_template, drift.FIT_RESPONSE_TOKENS, 7
        else:
            prof = drift.DriftProfile.from_dict(stored)
            if prof.manual_weights is not None:
                raise FoldRejected("user", f"user {profile['user']!r} has a Drift profile with hand-set weights; "
                                           "set a fitted one (or none) to learn from feedback.")
            try:
                compare_identity(prof.steer, self.identity, f"user {profile['user']!r}'s Drift profile")
            except ValueError as e:
                raise FoldRejected("user", str(e)) from None
            pool, chat, max_resp, top_m = prof.pool, prof.chat_template, prof.max_response_tokens, prof.top_m
        if any(pair.chosen.strip() == p.rejected.strip() for p in pairs):
            raise FoldRejected("rejected", "`chosen` and `rejected` are the same text; a preference needs two replies.")
        replies = [pair.chosen, *(p.rejected for p in pairs)]
        try:
            rows = drift.score_rows(self.tokenizer, pair.prompt, replies, pool,
                                    chat_template=chat, max_response_tokens=max_resp)
        except ValueError as e:  # a reply that encodes to no token
            raise FoldRejected("chosen", str(e)) from None
        longest = max(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        n = len(rows[longest][0]) + len(rows[longest][1])
        if n > self.max_tokens:
            which = "chosen" if longest < len(rows) // len(replies) else "rejected"
            raise FoldRejected(which, f"the prompt and `{which}` are {n} tokens under the steering model's attribute "
                                      f"prompts; the limit is {self.max_tokens} (max_feedback_tokens, and the model's "
                                      "context).")
        return FoldPlan(pairs=list(pairs), rows=rows, pool=pool, chat_template=chat, max_response_tokens=max_resp, top_m=top_m)

    def check_capacity(self) -> None:
        """``FoldQueueFull`` when ``max_folds`` items already wait or fold."""
        n = len(self._tickets)
        if n >= self.limits.max_folds:
            raise FoldQueueFull(f"{n} feedback items are waiting to be folded (limit {self.limits.max_folds}).")

    # ------------------------------------------------------------------ steps 3, 4
    def start(self, owner: str, fb: StoredFeedback, plan: FoldPlan) -> FoldTicket:
        """Queue a stored item's fold; call it holding ``user_lock`` right after storing the item."""
        loop = asyncio.get_running_loop()
        queue = self._users.setdefault((owner, fb.user_id), _UserQueue())
        ticket = FoldTicket(owner=owner, user=fb.user_id, feedback_id=fb.feedback_id, plan=plan,
                            merged=loop.create_future(), previous=queue.tail)
        queue.tail = ticket.merged
        self._tickets[(owner, fb.feedback_id)] = ticket
        if self._backlog or not self._submit(ticket):
            self._backlog.append(ticket)
        asyncio.ensure_future(self._run(ticket))
        return ticket

    def _submit(self, ticket: FoldTicket) -> bool:
        loop = asyncio.get_running_loop()
        job = FoldJob(rows=ticket.plan.rows, model=self.steer_key, loop=loop, future=loop.create_future(),
                      label=f"{ticket.owner}/{ticket.feedback_id}")
        try:
            self.engine.submit_fold(job)
        except QueueFull:
            return False
        ticket.job = job
        return True

    def _pump(self) -> None:
        while self._backlog:
            t = self._backlog[0]
            if t.cancelled:
                self._backlog.popleft()
                continue
            if not self._submit(t):
                return
            self._backlog.popleft()

    async def _run(self, ticket: FoldTicket) -> None:
        try:
            while ticket.job is None and not ticket.cancelled:  # waiting in the backlog
                await asyncio.sleep(0.05)
                self._pump()
            result = None
            if not ticket.cancelled:
                try:
                    logprobs = await ticket.job.future  # None once the item is deleted (``settle``)
                except RuntimeError as e:
                    if not self.engine.alive:
                        raise EngineStopped(str(e)) from None
                    raise
                if not ticket.cancelled:
                    result = drift.rewards_from_scores(logprobs, 1 + len(ticket.plan.pairs), ticket.plan.pool)
            self._pump()
            if ticket.previous is not None:  # the user's earlier items merge first
                await asyncio.shield(ticket.previous)
            fitted = None
            if self.learner is not None and not ticket.cancelled and result is not None:
                fitted = await self._fit(ticket)
            if ticket.cancelled or result is None:
                self._settle(ticket, None)
                return
            stored = await self._merge_when_the_store_answers(ticket, result[0], result[1:], fitted)
            self._settle(ticket, stored)
        except EngineStopped as e:
            self._settle(ticket, e)
        except Exception as e:  # noqa: BLE001 - recorded on the item, logged
            logger.exception("folding feedback %s failed", ticket.feedback_id)
            try:
                failed = await self.run_sync(self.store.fail_fold, ticket.owner, ticket.feedback_id,
                                             f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                failed = None
            self._settle(ticket, failed)
        finally:
            self._pump()

    async def _fit(self, ticket: FoldTicket) -> UserEmbedding | None:
        """The user's P-DPO embedding refitted with this item (None: a user the checkpoint knows)."""
        learner = self.learner
        profile = await self.run_sync(self.store.get_profile, ticket.owner, ticket.user)
        if profile is None or not learner.learns(profile):
            return None
        prior = await self.run_sync(self.store.recent_feedback, ticket.owner, ticket.user, learner.config.max_pairs,
                                    ticket.feedback_id)
        pairs = fit_pairs(ticket.plan.pairs, prior, learner.config.max_pairs)
        job = await self._run_fit(pairs, learner.start(profile), len(ticket.plan.pairs),
                                  f"{ticket.owner}/{ticket.feedback_id}/pdpo", lambda: ticket.cancelled,
                                  lambda j: setattr(ticket, "fit_job", j))
        return job

    async def _run_fit(self, pairs: list[PreferencePair], start: UserEmbedding | None, new_pairs: int, label: str,
                       cancelled: Any, attach: Any = None) -> UserEmbedding | None:
        """Fit the embedding on ``pairs`` from ``start`` (``e_0`` when None) as a fold task in the engine's
        folding budget; None once ``cancelled()`` says so. ``attach`` receives the job (to cancel it)."""
        learner = self.learner
        tokenized = await self.run_sync(learner.tokenize, pairs)
        fit = EmbeddingFit(self.engine.backend.models[learner.model], tokenized,
                           learner.generic if start is None else start.tensor, learner.generic, learner.config,
                           embedding_std=learner.embedding_std)
        loop = asyncio.get_running_loop()
        job = FoldJob(rows=[], model=learner.model, loop=loop, future=loop.create_future(), label=label, task=fit)
        if attach is not None:
            attach(job)
        while not cancelled():
            try:
                self.engine.submit_fold(job)
                break
            except QueueFull:
                await asyncio.sleep(0.05)
        if cancelled():
            job.cancel()
            return None
        try:
            done = await job.future  # None once cancelled (a delete's ``settle``)
        except RuntimeError as e:
            if not self.engine.alive:
                raise EngineStopped(str(e)) from None
            raise
        if cancelled() or done is None:
            return None
        return done.result((start.num_pairs if start is not None else 0) + new_pairs)

    async def _merge_when_the_store_answers(self, ticket: FoldTicket, wins: Any, losses: Any,
                                            fitted: UserEmbedding | None) -> StoredFeedback | None:
        """``_merge``, retried while the store is failing (read-only, full, locked): the item was
        acknowledged, so its scores wait for the store to recover instead of being lost."""
        pause = 0.25
        while True:
            ticket.merging = True
            try:
                return await self.run_sync(self._merge, ticket, wins, losses, fitted)
            except (StoreUnavailable, StoreBusy):
                if not self.engine.alive:
                    raise
            ticket.merging = False  # between attempts a delete may cancel it (``settle``)
            await asyncio.sleep(pause)
            if ticket.cancelled:
                return None
            pause = min(2 * pause, 5.0)

    def _settle(self, ticket: FoldTicket, value: Any) -> None:
        self._tickets.pop((ticket.owner, ticket.feedback_id), None)
        if not ticket.merged.done():
            if isinstance(value, BaseException):
                ticket.merged.set_exception(value)
                ticket.merged.exception()  # retrieved: a waiter may have gone
            else:
                ticket.merged.set_result(value)

    def _merge(self, ticket: FoldTicket, wins: Any, losses: Any,
               fitted: UserEmbedding | None = None) -> StoredFeedback | None:
        """Step 4 (blocking, off the loop): append the rows (``wins`` [A], ``losses`` [pairs, A]) and set
        the ``fitted`` P-DPO embedding under the profile's version check; a conflict retries this merge
        only. Returns the stored item, None when it or the profile is gone."""
        for _ in range(_MERGE_RETRIES):
            if ticket.cancelled:
                return None
            profile = self.store.get_profile(ticket.owner, ticket.user)
            if profile is None:
                return None
            stored = profile.get("drift_profile")
            if stored is None:
                plan = ticket.plan
                prof = drift.DriftProfile.empty(self.identity, plan.pool, top_m=plan.top_m,
                                                chat_template=plan.chat_template,
                                                max_response_tokens=plan.max_response_tokens)
            else:
                prof = drift.DriftProfile.from_dict(stored)
                if prof.pool.to_dict() != ticket.plan.pool.to_dict():
                    raise ValueError("the user's Drift profile was replaced with another attribute pool while this "
                                     "feedback was folded; post it again to score it under the new pool.")
            for pair, loss in zip(ticket.plan.pairs, losses):
                prof.add_rewards(item_pair_id(ticket.feedback_id, pair), wins, loss)
            update: dict[str, Any] = {"drift_profile": prof.to_dict()}
            learned = None
            if fitted is not None:
                update["pdpo_embedding"] = fitted.to_dict()
                learned = {"pdpo_embedding": update["pdpo_embedding"]}
            try:
                return self.store.complete_fold(ticket.owner, ticket.feedback_id, update, profile["version"], learned)
            except ProfileConflict:
                continue
        raise RuntimeError(f"profile {ticket.user!r} kept changing; {_MERGE_RETRIES} merges conflicted.")

    # ------------------------------------------------------------------ replays after a delete
    def replay(self, owner: str, user: str, from_pk: int) -> None:
        """After a folded item (arrival ``from_pk``) of ``user`` was deleted: refit their P-DPO embedding
        for every later item that taught it, in order, from the state before the deleted item, so the
        embedding equals a fit of the surviving items from scratch. Queued behind the user's earlier
        items (call it holding ``user_lock``); the items after it wait for it. No-op where no embedding
        is learned here."""
        if self.learner is None:
            return
        loop = asyncio.get_running_loop()
        key = (owner, user)
        queue = self._users.setdefault(key, _UserQueue())
        done = loop.create_future()
        previous, queue.tail = queue.tail, done
        gen = self._replay_gen[key] = self._replay_gen.get(key, 0) + 1
        self.replays_pending += 1
        asyncio.ensure_future(self._replay(owner, user, from_pk, gen, previous, done))

    async def _replay(self, owner: str, user: str, from_pk: int, gen: int, previous: asyncio.Future | None,
                      done: asyncio.Future) -> None:
        key = (owner, user)

        def superseded() -> bool:  # a later delete queued its own replay, which covers this one
            return self._replay_gen.get(key) != gen
        try:
            if previous is not None:
                await asyncio.wait([previous])
            pause = 0.25
            for _ in range(_MERGE_RETRIES):
                if superseded():
                    return
                try:
                    if await self._replay_once(owner, user, from_pk, superseded):
                        return
                except (StoreUnavailable, StoreBusy):  # the stale marks stay: retried, or at the next start
                    if not self.engine.alive:
                        return
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 5.0)
            logger.warning("replaying %s/%s's embedding: the profile kept changing", owner, user)
        except EngineStopped:
            pass  # the stale marks stay: replayed at the next start (``recover``)
        except Exception:  # noqa: BLE001 - logged; the stale marks stay
            logger.exception("replaying the embedding of %s/%s failed", owner, user)
        finally:
            self.replays_pending -= 1
            if self._replay_gen.get(key) == gen:
                del self._replay_gen[key]
            done.set_result(None)

    async def _replay_once(self, owner: str, user: str, from_pk: int, superseded: Any) -> bool:
        """One attempt: True when written (or nothing to do), False on a conflict."""
        learner = self.learner
        profile = await self.run_sync(self.store.get_profile, owner, user)
        if profile is None or not learner.learns(profile):
            return True
        items = await self.run_sync(self.store.folded_items, owner, user)
        first = next((i for i, f in enumerate(items) if f.pk >= from_pk), len(items))
        before = next((f.learned for f in reversed(items[:first]) if f.learned and not f.stale), None)
        emb = learner.start({"pdpo_embedding": before.get("pdpo_embedding")} if before else {})
        learned: dict[str, dict[str, Any]] = {}
        for j in range(first, len(items)):
            if items[j].learned is None:  # it taught no embedding when it folded
                continue
            pairs = fit_pairs(items[j], items[:j][::-1][:learner.config.max_pairs], learner.config.max_pairs)
            emb = await self._run_fit(pairs, emb, len(items[j].rejected_texts),
                                      f"{owner}/{items[j].feedback_id}/pdpo-replay", superseded)
            if emb is None:
                return True  # superseded
            learned[items[j].feedback_id] = {"pdpo_embedding": emb.to_dict()}
            self.replayed += 1
        final = None if emb is None else emb.to_dict()
        if not learned and final == profile.get("pdpo_embedding"):
            return True
        try:
            await self.run_sync(self.store.write_replay, owner, user, learned, {"pdpo_embedding": final},
                                profile["version"])
        except ProfileConflict:
            return False
        return True

    # ------------------------------------------------------------------ deletes, restarts, stats
    async def settle(self, owner: str, feedback_id: str) -> None:
        """Cancel the item's fold if it has not merged yet, or wait for its merge if it is merging (a
        delete then sees the item as folded or not, never in between)."""
        ticket = self._tickets.get((owner, feedback_id))
        if ticket is None:
            return
        if ticket.merging:
            await asyncio.shield(ticket.merged)
            return
        ticket.cancelled = True
        self.cancelled += 1
        for job in (ticket.job, ticket.fit_job):
            if job is not None:
                job.cancel()  # its waiter wakes (no task is left pending); the engine skips or stops it
        self._settle(ticket, None)

    async def recover(self) -> int:
        """Fold every stored item left unfolded by a stopped server, in order of arrival."""
        pending = await self.run_sync(self.store.pending_feedback)
        n = 0
        for owner, fb in pending:
            profile = await self.run_sync(self.store.get_profile, owner, fb.user_id)
            try:
                if profile is None:
                    raise FoldRejected("user", f"user {fb.user_id!r} has no profile any more.")
                plan = await self.run_sync(self.prepare, feedback_pairs(fb), profile)
            except (FoldRejected, ValueError) as e:
                await self.run_sync(self.store.fail_fold, owner, fb.feedback_id, str(e))
                continue
            async with self.user_lock(owner, fb.user_id):
                self.start(owner, fb, plan)
            n += 1
        if n:
            logger.info("folding %d feedback item(s) left unfolded by the last run", n)
        for owner, user, pk in await self.run_sync(self.store.stale_users):
            async with self.user_lock(owner, user):
                self.replay(owner, user, pk)
        return n

    def load(self) -> dict[str, int]:
        """Items waiting (in the engine's queue or the backlog) and folding, for ``/health``."""
        eng = self.engine.load()
        merging = sum(1 for t in self._tickets.values() if t.merging)
        return {"folds_waiting": eng["folds_waiting"] + len(self._backlog), "folds_running": eng["folds_running"]
                + merging, "max_folds": self.limits.max_folds, "folds_cancelled": self.cancelled,
                "replays_pending": self.replays_pending}
