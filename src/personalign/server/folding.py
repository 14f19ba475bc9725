"""Folding feedback into what each user's learners hold: bounded, off the chat's critical path, in
order, once. What a learner does with a choice lives in ``personalign.learners`` (one file per
learner: ``drift``, ``pdpo``, ``incontext``); this module keeps the generic queue, the order of one
user's items and the merge.

One feedback item (``POST /v1/feedback``, ``server.routes.feedback``) states one pair, or — a user's
choice among a completion's ``n`` choices — ``n − 1`` pairs sharing the prompt and the chosen reply:

1. ``prepare``: its texts are checked against the limits (characters, then each learner's ``prepare``:
   the tokens of every sequence it will score, against ``max_feedback_tokens`` and the model's context
   — ``FoldRejected``, a 400; no model work) and each learner that learns for the user plans its work;
2. the item is stored, unfolded: the acknowledgement. Items of one user are stored and queued under
   one lock, so the queue's order is the order of acknowledgement;
3. ``start``: each learner's ``ahead`` work (model work independent of the user's state, e.g. Drift's
   scoring) runs in the engine's folding budget at once, batched with other waiting folds; at most
   ``max_folds`` items wait or fold (``FoldQueueFull``, a 429);
4. after every earlier item of the same user has merged, each learner's ``learn`` work (model work from
   the user's state: the P-DPO embedding fit, the in-context hypothesis) runs as fold tasks, then the
   merge — every learner's new state written, what each keeps with the item (``learned``) and the item
   marked folded in ONE transaction guarded by the profile's version. A concurrent change of the
   profile re-runs the merge alone (``ProfileConflict``).

``wait: true`` answers after step 4, ``wait: false`` after step 2 (202). A server stopped before step
4 leaves the item stored and unfolded; ``recover`` folds every such item when it starts again.
A delete (``routes.feedback``) asks each learner to ``undo`` the item in the delete's transaction; a
learner that cannot take one item back exactly (the P-DPO embedding) marks the later items stale and
``replay`` refits them in order, as fold tasks, so its state equals a fit of the surviving items.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personalign.decoding.sampling import SamplingConfig
from personalign.learners import (
    FoldRejected,
    Learner,
    LearnerEnv,
    make_learners,
    state_before,
)
from personalign.learners.drift import item_pair_id
from personalign.personas import drift
from personalign.server.events import EventReader
from personalign.server.schemas import Limits
from personalign.server.store import ProfileConflict, Store, StoreBusy, StoredFeedback, StoreUnavailable
from personalign.server.store_tables import drift_prompt
from personalign.server.worker import EngineWorker, Failed, FoldJob, Job, QueueFull
from personalign.types import Request as GenRequest
from personalign.views.base import Backend

__all__ = ["FoldManager", "FoldRejected", "FoldQueueFull", "EngineStopped", "PreferencePair", "drift_prompt",
           "item_pair_id", "feedback_pairs", "steering_model_key"]

logger = logging.getLogger(__name__)

PreferencePair = drift.PreferencePair
_MERGE_RETRIES = 50
_PRIOR_ITEMS = 32  # the user's most recent earlier items a learner's ``learn`` sees


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


def feedback_pairs(fb: StoredFeedback) -> list[PreferencePair]:
    """The pairs a stored item states, as Drift scores them (``StoredFeedback.pairs``)."""
    return fb.pairs()


@dataclass(frozen=True)
class FoldPlan:
    """What each learner that learns for the user will do with one item (in registration order)."""

    plans: dict[str, Any]


@dataclass(eq=False)
class FoldTicket:
    owner: str
    item: StoredFeedback
    plan: FoldPlan
    merged: asyncio.Future  # -> StoredFeedback (folded, or with fold_error), None when the item is gone
    jobs: list[Any] = field(default_factory=list)  # the engine work it started (cancelled by a delete)
    merging: bool = False
    cancelled: bool = False
    previous: asyncio.Future | None = None  # the merge of the user's item before this one

    @property
    def user(self) -> str:
        return self.item.user_id

    @property
    def feedback_id(self) -> str:
        return self.item.feedback_id


class EngineTasks:
    """``learners.Tasks`` on the engine: scoring and fit tasks in the folding budget, generation in the
    decoding rounds. Every call returns None once ``cancelled()`` says so."""

    def __init__(self, engine: EngineWorker, label: str, cancelled: Callable[[], bool],
                 jobs: list[Any] | None = None) -> None:
        self.engine, self.label, self.cancelled = engine, label, cancelled
        self.jobs = jobs if jobs is not None else []

    async def _submit(self, submit: Callable[[Any], None], job: Any) -> bool:
        """Queue ``job`` with ``submit``, waiting while the engine's queue is full; False once cancelled."""
        self.jobs.append(job)
        while not self.cancelled():
            try:
                submit(job)
                return True
            except QueueFull:
                await asyncio.sleep(0.05)
        return False

    async def _fold(self, job: FoldJob) -> Any:
        if not await self._submit(self.engine.submit_fold, job):
            job.cancel()
            return None
        try:
            out = await job.future  # None once cancelled (a delete's ``settle``)
        except RuntimeError as e:
            if not self.engine.alive:
                raise EngineStopped(str(e)) from None
            raise
        return None if self.cancelled() else out

    async def score(self, rows: list[tuple[list[int], list[int]]], model: str) -> list[Any] | None:
        loop = asyncio.get_running_loop()
        return await self._fold(FoldJob(rows=rows, model=model, loop=loop, future=loop.create_future(),
                                        label=self.label))

    async def run(self, task: Any, model: str) -> Any | None:
        loop = asyncio.get_running_loop()
        return await self._fold(FoldJob(rows=[], model=model, loop=loop, future=loop.create_future(),
                                        label=self.label, task=task))

    async def generate(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        loop = asyncio.get_running_loop()
        job = Job(method="base", request=GenRequest(prompt=messages), max_tokens=max_tokens,
                  sampling=SamplingConfig(temperature=0.0), stop=[], loop=loop, events=asyncio.Queue())
        if not await self._submit(self.engine.submit, job):
            return None
        reader = EventReader([job], _Cancelled(self.cancelled), poll=0.1)  # type: ignore[arg-type]
        while (event := await reader.next()) is not None:
            if isinstance(event, Failed):
                if not self.engine.alive:
                    raise EngineStopped(event.message)
                raise RuntimeError(f"generating for a learner failed: {event.message}")
        if reader.gone or self.cancelled():
            return None
        return reader.text(0)


class _Cancelled:
    """Stands for the client of a learner's generation: it "goes away" once the fold is cancelled."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self.cancelled = cancelled

    async def is_disconnected(self) -> bool:
        return self.cancelled()


@dataclass
class _UserQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tail: asyncio.Future | None = None  # the last item's merge


class FoldManager:
    """Schedules the folds of one server (see the module docstring).

    Args:
        engine: the engine worker that scores and generates.
        store: where items, profiles and learner states live.
        limits: ``max_feedback_chars``, ``max_feedback_tokens``, ``max_folds``.
        steer_key: the backend model that scores Drift's rows (its steering model).
        chat_template: how prompts are built.
        run_sync: runs a blocking function off the event loop (the server's thread pool).
        learners: settings per learner name (its ``Config``); ``False`` turns that learner off.
    """

    def __init__(self, engine: EngineWorker, store: Store, limits: Limits, *, steer_key: str,
                 chat_template: bool, run_sync: Any, learners: dict[str, Any] | None = None) -> None:
        self.engine, self.store, self.limits = engine, store, limits
        self.steer_key, self.chat_template, self.run_sync = steer_key, chat_template, run_sync
        backend = engine.backend
        ctx = backend.context_length(steer_key)
        self.max_tokens = min(limits.max_feedback_tokens, ctx - 1) if ctx else limits.max_feedback_tokens
        configs = dict(learners or {})
        env = LearnerEnv(backend=backend, methods=engine.methods, steer_key=steer_key, chat_template=chat_template,
                         max_tokens=self.max_tokens)
        self.registered = make_learners({k: v for k, v in configs.items() if v is not False})
        self.learners: dict[str, Learner] = {}  # those that learn here
        self.unavailable: dict[str, str] = {}  # learner -> why it does not learn here
        for name, learner in self.registered.items():
            why = "turned off" if configs.get(name) is False else learner.bind(env)
            if why:
                self.unavailable[name] = why
            else:
                self.learners[name] = learner
        self._users: dict[tuple[str, str], _UserQueue] = {}
        self._tickets: dict[tuple[str, str], FoldTicket] = {}
        self.cancelled = 0  # folds stopped because their item was deleted first
        self._replay_gen: dict[tuple[str, str], int] = {}  # the latest replay queued for each user
        self.replays_pending = 0  # replays queued or running
        self.replayed = 0  # items a replay refitted

    # ------------------------------------------------------------------ step 1: bounds, plans
    def user_lock(self, owner: str, user: str) -> asyncio.Lock:
        return self._users.setdefault((owner, user), _UserQueue()).lock

    def active(self, profile: dict[str, Any]) -> list[Learner]:
        """The learners that learn for ``profile``'s user, in registration order."""
        return [lr for lr in self.learners.values() if lr.learns(profile)]

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
        """Each active learner's plan for the item (blocking: tokenizes; run off the loop).

        Raises:
            FoldRejected: a text over a limit, or what a learner refuses (naming the field).
        """
        self.check_chars(pairs)
        pair = pairs[0]
        if any((p.prompt, p.chosen) != (pair.prompt, pair.chosen) for p in pairs):
            raise ValueError("an item's pairs must share the prompt and the chosen reply.")
        if any(pair.chosen.strip() == p.rejected.strip() for p in pairs):
            raise FoldRejected("rejected", "`chosen` and `rejected` are the same text; a preference needs two replies.")
        return FoldPlan(plans={lr.name: lr.prepare(list(pairs), profile)
                                                  for lr in self.active(profile)})

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
        ticket = FoldTicket(owner=owner, item=fb, plan=plan, merged=loop.create_future(), previous=queue.tail)
        queue.tail = ticket.merged
        self._tickets[(owner, fb.feedback_id)] = ticket
        asyncio.ensure_future(self._run(ticket))
        return ticket

    def _tasks(self, ticket: FoldTicket, what: str = "") -> EngineTasks:
        return EngineTasks(self.engine, f"{ticket.owner}/{ticket.feedback_id}{what}", lambda: ticket.cancelled,
                           ticket.jobs)

    async def _run(self, ticket: FoldTicket) -> None:
        try:
            names = list(ticket.plan.plans)
            ahead = await asyncio.gather(*(self.learners[n].ahead(ticket.plan.plans[n], self._tasks(ticket))
                                           for n in names))
            if ticket.previous is not None:  # the user's earlier items merge first
                await asyncio.shield(ticket.previous)
            if ticket.cancelled or any(a is None for a in ahead):
                self._settle(ticket, None)
                return
            results = await self._learn(ticket, dict(zip(names, ahead)))
            if results is None:
                self._settle(ticket, None)
                return
            stored = await self._merge_when_the_store_answers(ticket, results)
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

    async def _learn(self, ticket: FoldTicket, ahead: dict[str, Any]) -> dict[str, Any] | None:
        """Each learner's ``learn`` from the user's state after their earlier items (None: cancelled). The
        user's profile and earlier items are read only when a learner does such work (overrides ``learn``);
        for the others ``learn`` passes ``ahead``'s result on."""
        if all(type(self.learners[n]).learn is Learner.learn for n in ticket.plan.plans):
            return ahead
        profile = await self.run_sync(self.store.get_profile, ticket.owner, ticket.user)
        if profile is None:
            return None
        prior = await self.run_sync(self.store.recent_feedback, ticket.owner, ticket.user, _PRIOR_ITEMS,
                                    ticket.feedback_id)
        out = {}
        for name, plan in ticket.plan.plans.items():
            out[name] = await self.learners[name].learn(plan, ahead[name], profile, ticket.item, prior,
                                                        self._tasks(ticket, f"/{name}"))
            if out[name] is None or ticket.cancelled:
                return None
        return out

    async def _merge_when_the_store_answers(self, ticket: FoldTicket, results: dict[str, Any]
                                            ) -> StoredFeedback | None:
        """``_merge``, retried while the store is failing (read-only, full, locked): the item was
        acknowledged, so its results wait for the store to recover instead of being lost."""
        pause = 0.25
        while True:
            ticket.merging = True
            try:
                return await self.run_sync(self._merge, ticket, results)
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

    def _merge(self, ticket: FoldTicket, results: dict[str, Any]) -> StoredFeedback | None:
        """Step 4 (blocking, off the loop): every learner's ``merge`` under the profile's version check; a
        conflict retries this merge only. Returns the stored item, None when it or the profile is gone."""
        for _ in range(_MERGE_RETRIES):
            if ticket.cancelled:
                return None
            profile = self.store.get_profile(ticket.owner, ticket.user)
            if profile is None:
                return None
            update: dict[str, Any] = {}
            learned: dict[str, Any] = {}
            for name, plan in ticket.plan.plans.items():
                lr = self.learners[name]
                m = lr.merge(profile.get(lr.field), plan, results[name], ticket.item, profile)
                update[lr.field] = m.state
                if m.learned is not None:
                    learned[name] = m.learned
            try:
                return self.store.complete_fold(ticket.owner, ticket.feedback_id, update, profile["version"],
                                                learned or None)
            except ProfileConflict:
                continue
        raise RuntimeError(f"profile {ticket.user!r} kept changing; {_MERGE_RETRIES} merges conflicted.")

    # ------------------------------------------------------------------ deletes and replays
    def undo(self, profile: dict[str, Any], item: StoredFeedback, items: list[StoredFeedback]
             ) -> tuple[dict[str, Any], list[str]]:
        """Each learner's ``undo`` of a deleted folded ``item`` (``items``: the user's folded items in
        order): the profile fields to write in the delete's transaction and the learners to replay."""
        index = next((i for i, f in enumerate(items) if f.feedback_id == item.feedback_id), len(items))
        update, replay = {}, []
        for lr in self.learners.values():
            u = lr.undo(profile.get(lr.field), item, state_before(items, index, lr.name), profile,
                        [f for f in items if f.feedback_id != item.feedback_id])
            if u.changed:
                update[lr.field] = u.state
            if u.replay:
                replay.append(lr.name)
        return update, replay

    def replay(self, owner: str, user: str, from_pk: int) -> None:
        """After a folded item (arrival ``from_pk``) of ``user`` was deleted: each learner that keeps
        state per item refits the later items in order, from the state before the deleted one
        (``Learner.replay``). Queued behind the user's earlier items (call it holding ``user_lock``);
        the items after it wait for it."""
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
            logger.warning("replaying %s/%s's learners: the profile kept changing", owner, user)
        except EngineStopped:
            pass  # the stale marks stay: replayed at the next start (``recover``)
        except Exception:  # noqa: BLE001 - logged; the stale marks stay
            logger.exception("replaying the learners of %s/%s failed", owner, user)
        finally:
            self.replays_pending -= 1
            if self._replay_gen.get(key) == gen:
                del self._replay_gen[key]
            done.set_result(None)

    async def _replay_once(self, owner: str, user: str, from_pk: int, superseded: Callable[[], bool]) -> bool:
        """One attempt: True when written (or nothing to do), False on a conflict."""
        profile = await self.run_sync(self.store.get_profile, owner, user)
        if profile is None:
            return True
        items = await self.run_sync(self.store.folded_items, owner, user)
        # from the deleted item on, or from an earlier item a replay this one superseded left stale
        first = next((i for i, f in enumerate(items) if f.pk >= from_pk or f.stale), len(items))
        kept = {f.feedback_id: {k: v for k, v in f.learned.items() if k != "stale"}
                for f in items[first:] if f.learned}
        update: dict[str, Any] = {}
        tasks = EngineTasks(self.engine, f"{owner}/{user}/replay", superseded)
        for lr in self.learners.values():
            taught = any(lr.name in entry for entry in kept.values())
            if not taught and not (profile.get(lr.field) or {}).get("stale"):
                continue
            out = await lr.replay(profile, items, first, state_before(items, first, lr.name), tasks)
            if out is None:
                return True  # superseded
            per_item, final = out
            for fid, entry in per_item.items():
                kept.setdefault(fid, {})[lr.name] = entry
            self.replayed += len(per_item)
            update[lr.field] = final
        if not kept and all(update[f] == profile.get(f) for f in update):
            return True
        try:
            await self.run_sync(self.store.write_replay, owner, user, kept, update, profile["version"])
        except ProfileConflict:
            return False
        return True

    # ------------------------------------------------------------------ cancels, restarts, stats
    async def settle(self, owner: str, feedback_id: str) -> None:
        """Cancel the item's fold if it has not merged yet (it merges nothing), or wait for its merge if it
        is merging (a delete then sees the item as folded or not, never in between)."""
        ticket = self._tickets.get((owner, feedback_id))
        if ticket is None:
            return
        if ticket.merging:
            await asyncio.shield(ticket.merged)
            return
        ticket.cancelled = True
        self.cancelled += 1
        for job in ticket.jobs:
            if isinstance(job, FoldJob):
                job.cancel()  # its waiter wakes (no task is left pending); the engine skips or stops it
            else:
                job.cancelled = True  # a generation: the engine drops it, its reader stops
        # its run settles it (None) once the user's earlier items have merged: the items after it keep
        # waiting for those, not for this one

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
        stale = await self.run_sync(self.store.stale_users)
        for owner, user, pk in stale:
            async with self.user_lock(owner, user):
                self.replay(owner, user, pk)
        for owner, user in await self.run_sync(self.store.stale_states):  # a learner's state, no item stale
            if not any((o, u) == (owner, user) for o, u, _ in stale):
                async with self.user_lock(owner, user):
                    self.replay(owner, user, 1 << 62)
        return n

    def load(self) -> dict[str, int]:
        """Items waiting and folding, for ``/health``."""
        eng = self.engine.load()
        merging = sum(1 for t in self._tickets.values() if t.merging)
        return {"folds_waiting": eng["folds_waiting"], "folds_running": eng["folds_running"]
                + merging, "max_folds": self.limits.max_folds, "folds_cancelled": self.cancelled,
                "replays_pending": self.replays_pending}
