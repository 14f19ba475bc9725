"""The server's only state: API keys, user profiles, recorded completions and feedback, in SQL.

SQLAlchemy 2 over SQLite (default; a rollback journal, ``synchronous=FULL``, a busy timeout) or PostgreSQL
(``postgresql://...``, driven by psycopg 3). Every change is one transaction, so a process killed at
any point leaves each change either fully there or absent. Replicas that share one PostgreSQL share
everything: no server keeps state outside the store.

Ownership: every profile, completion and feedback row belongs to one API key (``owner``); every
read and write names the owner, and another key's rows are simply not found.

Concurrency: a profile carries a ``version``; profile writes that follow a read (folding feedback)
apply only when the version is unchanged (optimistic locking), so two replicas folding feedback into
one profile at once cannot lose an update. Feedback ids are unique per owner, so a retried POST is
recorded once.

Faults are answered, never lost: a database that stays locked (SQLite ``database is locked``) is
retried for ``busy_seconds``, then ``StoreBusy`` (HTTP 503 with Retry-After); a database that cannot
be written (a read-only file, a missing directory) fails when the store is opened, with one clear
line. A fault while the server runs (the files made read-only, a full disk, an I/O error, a lost
connection) is ``StoreUnavailable`` (503 with Retry-After), logged once per fault with its reason;
``health()`` reports it until a probe write that needs room succeeds (at most once a second).
SQL parameters (user texts) never reach error messages or logs (``hide_parameters``).

SQLite runs with a rollback journal (``journal_mode=TRUNCATE``) and no memory-mapped I/O
(``mmap_size=0``), not WAL: WAL keeps its index in a memory-mapped ``-shm`` file, and a write to that
mapping after the file turned unwritable kills the process with SIGBUS (measured: a database made
immutable under a running server). With a rollback journal such a fault is an error the server
answers. The cost: readers and the writer take turns (the busy retry covers it), one more sync per
commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from personalign.server.store_migrate import add_missing_columns, migrate_ids, migrate_learner_states
from personalign.server.store_tables import (
    PROFILE_FIELDS,
    ApiKey,
    Base,
    Completion,
    Feedback,
    LearnerState,
    Profile,
    StoredFeedback,
    StoreMeta,
    feedback_record,
    profile_dict,
    read_states,
    write_states,
)

__all__ = ["Store", "hash_key", "new_key", "ProfileConflict", "FeedbackConflict", "ChoiceConflict", "StoredFeedback",
           "StoreBusy", "StoreUnavailable"]

logger = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: keys are long random secrets, so a plain hash suffices."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, secret key)``; the key embeds the id for the owner's reference."""
    kid = "key_" + secrets.token_hex(8)
    return kid, f"pa-{kid[4:]}-{secrets.token_urlsafe(24)}"


class ProfileConflict(Exception):
    """A profile changed between read and write (another replica or request got there first)."""


class FeedbackConflict(Exception):
    """A feedback id was reused with different content."""


class ChoiceConflict(Exception):
    """A completion was already judged with another choice (``feedback_id``, ``chosen_index``: the first)."""

    def __init__(self, feedback_id: str, chosen_index: int) -> None:
        super().__init__(feedback_id)
        self.feedback_id, self.chosen_index = feedback_id, chosen_index


class StoreBusy(Exception):
    """The database stayed locked past the store's retry budget (answer 503, Retry-After)."""


class StoreUnavailable(Exception):
    """The database failed while the server runs: read-only, full, an I/O error, unreachable (answer 503,
    Retry-After). The message names the fault, never a SQL parameter."""


class Store:
    """All persistent state behind one SQLAlchemy engine.

    Args:
        url: ``sqlite:///path.db`` (default file store), ``sqlite://`` (in memory, tests) or
            ``postgresql://user:pass@host/db``.
        busy_seconds: how long a locked database is retried before ``StoreBusy``.

    Raises:
        ValueError: a bad URL, a missing driver, a SQLite file whose directory does not exist, or a
            database that cannot be written (one line, no traceback).
    """

    def __init__(self, url: str = "sqlite:///personalign.db", *, busy_seconds: float = 10.0) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"`db` must be a database URL (sqlite:///FILE or postgresql://...), got {url!r}.")
        self.url = url
        self.busy_seconds = busy_seconds
        self._faulted: tuple[str, float] | None = None  # (reason, since) of a fault not yet recovered
        self._running = False  # opened: faults from now on are answered (503) and logged
        self._probed = 0.0
        self._health_lock = threading.Lock()
        kwargs: dict[str, Any] = {"hide_parameters": True}  # no user text in errors or logs
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 2}
            if url in ("sqlite://", "sqlite:///:memory:"):
                from sqlalchemy.pool import StaticPool

                kwargs["poolclass"] = StaticPool
            else:
                _check_sqlite_path(self.url)
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bad URL or a missing driver
            raise ValueError(f"could not open database {self.url!r}: {e}") from e
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
            add_missing_columns(self.engine)
            self._session = sessionmaker(self.engine, expire_on_commit=False)
            self.migrated: list[dict[str, str]] = self._tx(migrate_ids)
            moved = migrate_learner_states(self.engine)
            if moved:
                logger.info("moved the learned state of %d profile(s) to learner_states", moved)
            if self.migrated:
                logger.warning("renamed %d id(s) an earlier release accepted outside the safe set: %s",
                               len(self.migrated), "; ".join(f"{m['kind']} {m['old']!r} -> {m['new']!r}"
                                                             for m in self.migrated[:20]))
            self._tx(lambda s: s.merge(StoreMeta(key="opened", value=str(time.time()))))
        except (OperationalError, StoreBusy, StoreUnavailable) as e:
            reason = self._faulted[0] if self._faulted else str(getattr(e, "orig", e)).splitlines()[0]
            raise ValueError(f"database {self.url!r} cannot be written: {reason}.") from None
        self._running = True

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self, fn: Callable[[Session], Any]) -> Any:
        """Run ``fn`` in one transaction, retrying while the database is locked (``busy_seconds``)."""
        return self._run(fn, write=True)

    def _read(self, fn: Callable[[Session], Any]) -> Any:
        """A read (no transaction of its own), with the same busy retry as ``_tx``."""
        return self._run(fn, write=False)

    def _run(self, fn: Callable[[Session], Any], *, write: bool) -> Any:
        """``fn`` in a session (a transaction when ``write``): a locked database is retried for
        ``busy_seconds`` (then ``StoreBusy``); any other database fault is ``StoreUnavailable``."""
        deadline = time.monotonic() + self.busy_seconds
        pause = 0.05
        while True:
            try:
                if write:
                    with self._session.begin() as s:
                        out = fn(s)
                else:
                    with self._session() as s:
                        out = fn(s)
            except OperationalError as e:
                if not _is_busy(e):
                    raise self._fault(e) from None
                if time.monotonic() + pause > deadline:
                    raise StoreBusy("the database is busy (locked by another writer); retry shortly.") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            except DBAPIError as e:  # a lost connection and the like: the database, not the request
                if not e.connection_invalidated and not isinstance(e, InterfaceError):
                    raise
                raise self._fault(e) from None
            return out

    # ------------------------------------------------------------------ health
    def _fault(self, e: Exception) -> StoreUnavailable:
        """Record a fault (logged once per reason) and the exception that answers it."""
        reason = str(getattr(e, "orig", e)).splitlines()[0][:200] or type(e).__name__
        with self._health_lock:
            if self._running and (self._faulted is None or self._faulted[0] != reason):  # opening: one ValueError
                logger.error("the store failed: %s (%s); requests that need it answer 503 until it recovers",
                             reason, self.url.split("://", 1)[0])
            self._faulted = (reason, self._faulted[1] if self._faulted else time.time())
        return StoreUnavailable(f"the database is unavailable ({reason}); retry shortly.")

    def _recovered(self) -> None:
        with self._health_lock:
            if self._faulted is not None:
                logger.warning("the store recovered after %.1f s (%s)", time.time() - self._faulted[1],
                               self._faulted[0])
            self._faulted = None

    def health(self) -> dict[str, Any]:
        """``{"ok", "fault", "since"}``. While a fault is recorded, a probe (at most once a second) writes a
        64 KiB row and commits, then deletes it: the store has recovered when it can take a write that
        needs room (a small one may fit in a page a full disk still has)."""
        if self._faulted is not None and time.monotonic() - self._probed >= 1.0:
            self._probed = time.monotonic()
            with contextlib.suppress(StoreUnavailable, StoreBusy):
                self._tx(lambda s: s.merge(StoreMeta(key="probe", value="x" * (64 << 10))))
                self._tx(lambda s: s.execute(delete(StoreMeta).where(StoreMeta.key == "probe")))
                self._recovered()
        f = self._faulted
        return {"ok": f is None, "fault": None if f is None else f[0], "since": None if f is None else int(f[1])}

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str = "") -> tuple[str, str]:
        """Create an API key; returns ``(id, key)``. Only the key's hash is stored."""
        kid, key = new_key()
        self._tx(lambda s: s.add(ApiKey(id=kid, key_hash=hash_key(key), name=name, created_at=time.time())))
        return kid, key

    def playground_key(self, name: str = "playground") -> tuple[str, str]:
        """``(id, key)`` for a local trial's playground: the live key called ``name`` gets a new secret (its id,
        and so the users it owns, stay; its old secret stops working), or a key of that name is created."""
        def fn(s: Session) -> tuple[str, str]:
            row = s.scalars(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                            .order_by(ApiKey.created_at)).first()
            if row is None:
                kid, key = new_key()
                s.add(ApiKey(id=kid, key_hash=hash_key(key), name=name, created_at=time.time()))
                return kid, key
            key = f"pa-{row.id[4:]}-{secrets.token_urlsafe(24)}"
            row.key_hash = hash_key(key)
            return row.id, key
        return self._tx(fn)

    def owner_of(self, key: str) -> str | None:
        """The id of the live key ``key``, or None (unknown or revoked)."""
        def fn(s: Session) -> str | None:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
            return row.id if row is not None and row.revoked_at is None else None
        return self._read(fn)

    def revoke_key(self, kid: str) -> bool:
        def fn(s: Session) -> bool:
            res = s.execute(update(ApiKey).where(ApiKey.id == kid, ApiKey.revoked_at.is_(None))
                            .values(revoked_at=time.time()))
            return res.rowcount > 0
        return self._tx(fn)

    def list_keys(self) -> list[dict[str, Any]]:
        return self._read(lambda s: [{"id": k.id, "object": "api_key", "name": k.name, "created": int(k.created_at),
                                      "revoked": k.revoked_at is not None}
                                     for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at))])

    # ------------------------------------------------------------------ profiles
    def create_profile(self, owner: str, user_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Insert a profile; None when ``owner`` already has one for ``user_id``."""
        now = time.time()
        try:
            def fn(s: Session) -> dict[str, Any]:
                values = {"params": {}, **{k: v for k, v in fields.items() if k in PROFILE_FIELDS}}
                p = Profile(owner=owner, user_id=user_id, created_at=now, updated_at=now, version=1, **values)
                s.add(p)
                s.flush()
                write_states(s, owner, user_id, fields)
                return profile_dict(p, read_states(s, owner, user_id))
            return self._tx(fn)
        except IntegrityError:
            return None

    def get_profile(self, owner: str, user_id: str) -> dict[str, Any] | None:
        def fn(s: Session) -> dict[str, Any] | None:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            return profile_dict(p, read_states(s, owner, user_id)) if p is not None else None
        return self._read(fn)

    def list_profiles(self, owner: str, limit: int = 100, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """One page of ``owner``'s profiles by user id, after the id ``after``: ``(page, has_more)``."""
        def fn(s: Session) -> tuple[list[dict[str, Any]], bool]:
            q = select(Profile).where(Profile.owner == owner)
            if after is not None:
                q = q.where(Profile.user_id > after)
            rows = [profile_dict(p, read_states(s, owner, p.user_id))
                    for p in s.scalars(q.order_by(Profile.user_id).limit(limit + 1))]
            return rows[:limit], len(rows) > limit
        return self._read(fn)

    def update_profile(self, owner: str, user_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Set the given fields (one transaction); None when the profile does not exist."""
        def fn(s: Session) -> dict[str, Any] | None:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id).with_for_update())
            if p is None:
                return None
            for k, v in fields.items():
                if k in PROFILE_FIELDS:
                    setattr(p, k, v)
            write_states(s, owner, user_id, fields)
            p.version += 1
            p.updated_at = time.time()
            s.flush()
            return profile_dict(p, read_states(s, owner, user_id))
        return self._tx(fn)

    def delete_profile(self, owner: str, user_id: str, *, keep_history: bool = False) -> dict[str, int] | None:
        """Delete a profile and (unless ``keep_history``) its user's feedback and completions, in one
        transaction; returns what was deleted, or None when there is no such profile."""
        def fn(s: Session) -> dict[str, int] | None:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            if p is None:
                return None
            s.delete(p)
            s.execute(delete(LearnerState).where(LearnerState.owner == owner, LearnerState.user_id == user_id))
            out = {"feedback": 0, "completions": 0}
            if not keep_history:
                out["feedback"] = s.execute(delete(Feedback).where(Feedback.owner == owner,
                                                                   Feedback.user_id == user_id)).rowcount
                out["completions"] = s.execute(delete(Completion).where(Completion.owner == owner,
                                                                        Completion.user_id == user_id)).rowcount
            return out
        return self._tx(fn)

    # ------------------------------------------------------------------ completions
    def record_completion(self, owner: str, cid: str, user_id: str | None, messages: list,
                          choices: list[dict[str, Any]]) -> None:
        """Record a completion's choices (``{"index", "text", "method", "finish_reason"}``, in index order)."""
        first = choices[0]
        self._tx(lambda s: s.add(Completion(id=cid, owner=owner, user_id=user_id, messages=messages,
                                            text=first["text"], method=first["method"],
                                            finish_reason=first["finish_reason"], created_at=time.time(),
                                            choices=[dict(c) for c in choices])))

    def get_completion(self, owner: str, cid: str) -> dict[str, Any] | None:
        """The completion with every choice; ``text``/``method``/``finish_reason`` are choice 0's."""
        def fn(s: Session) -> dict[str, Any] | None:
            c = s.scalar(select(Completion).where(Completion.owner == owner, Completion.id == cid))
            if c is None:
                return None
            choices = c.choices or [{"index": 0, "text": c.text, "method": c.method,
                                     "finish_reason": c.finish_reason}]
            return {"id": c.id, "user": c.user_id, "messages": c.messages, "text": c.text, "method": c.method,
                    "finish_reason": c.finish_reason, "choices": choices, "created": int(c.created_at)}
        return self._read(fn)

    def delete_completion(self, owner: str, cid: str) -> bool:
        return self._tx(lambda s: s.execute(delete(Completion).where(Completion.owner == owner,
                                                                      Completion.id == cid)).rowcount > 0)

    # ------------------------------------------------------------------ feedback
    def get_feedback(self, owner: str, feedback_id: str) -> StoredFeedback | None:
        def fn(s: Session) -> StoredFeedback | None:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            return feedback_record(f) if f is not None else None
        return self._read(fn)

    def recent_feedback(self, owner: str, user_id: str, limit: int, before: str | None = None) -> list[StoredFeedback]:
        """The user's ``limit`` most recent folded items (newest first), those before item ``before`` when given."""
        def fn(s: Session) -> list[StoredFeedback]:
            q = select(Feedback).where(Feedback.owner == owner, Feedback.user_id == user_id, Feedback.folded.is_(True))
            if before is not None:
                pk = s.scalar(select(Feedback.pk).where(Feedback.owner == owner, Feedback.feedback_id == before))
                if pk is not None:
                    q = q.where(Feedback.pk < pk)
            return [feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk.desc()).limit(limit))]
        return self._read(fn)

    def list_feedback(self, owner: str, user_id: str | None = None, limit: int = 100,
                      after: str | None = None) -> tuple[list[StoredFeedback], bool]:
        """One page of ``owner``'s feedback in order of arrival, after the item ``after``: ``(page, has_more)``
        (an unknown ``after`` gives an empty page)."""
        def fn(s: Session) -> tuple[list[StoredFeedback], bool]:
            q = select(Feedback).where(Feedback.owner == owner)
            if user_id is not None:
                q = q.where(Feedback.user_id == user_id)
            if after is not None:
                pk = s.scalar(select(Feedback.pk).where(Feedback.owner == owner, Feedback.feedback_id == after))
                if pk is None:
                    return [], False
                q = q.where(Feedback.pk > pk)
            rows = [feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk).limit(limit + 1))]
            return rows[:limit], len(rows) > limit
        return self._read(fn)

    def count_feedback(self, owner: str, user_id: str) -> dict[str, int]:
        """How many of the user's feedback items are stored, folded and waiting."""
        def fn(s: Session) -> dict[str, int]:
            rows = s.execute(select(Feedback.folded, Feedback.fold_error).where(Feedback.owner == owner,
                                                                                 Feedback.user_id == user_id)).all()
            folded = sum(1 for f, _ in rows if f)
            failed = sum(1 for f, e in rows if not f and e)
            return {"total": len(rows), "folded": folded, "failed": failed, "pending": len(rows) - folded - failed}
        return self._read(fn)

    def add_feedback(self, owner: str, fb: StoredFeedback, profile_update: dict[str, Any] | None = None,
                     expect_version: int | None = None) -> tuple[StoredFeedback, bool]:
        """Record feedback and (optionally) the profile fields it changes, in one transaction.

        Returns ``(stored, created)``: an id already recorded with the same content returns the
        stored item and ``created=False`` (idempotent retry). Raises ``FeedbackConflict`` when the id
        was used for different content, ``ProfileConflict`` when the profile's version moved on.
        """
        def fn(s: Session) -> StoredFeedback:
            if fb.chosen_index is not None:  # a completion is judged once
                prior = s.scalar(select(Feedback).where(Feedback.owner == owner,
                                                        Feedback.completion_id == fb.completion_id,
                                                        Feedback.chosen_index.is_not(None)).order_by(Feedback.pk))
                if prior is not None and prior.feedback_id != fb.feedback_id:
                    if prior.chosen_index != fb.chosen_index:
                        raise ChoiceConflict(prior.feedback_id, prior.chosen_index)
                    return feedback_record(prior)  # the same choice again: the first item stands
            _apply_profile_update(s, owner, fb.user_id, profile_update, expect_version)
            row = Feedback(owner=owner, feedback_id=fb.feedback_id, user_id=fb.user_id, prompt=fb.prompt,
                           chosen=fb.chosen, rejected=fb.rejected, completion_id=fb.completion_id,
                           folded=fb.folded, created_at=fb.created_at, fold_error=fb.fold_error,
                           chosen_index=fb.chosen_index, also_rejected=list(fb.also_rejected) or None)
            s.add(row)
            s.flush()
            return feedback_record(row)
        try:
            stored = self._tx(fn)
        except IntegrityError:
            old = self.get_feedback(owner, fb.feedback_id)
            if old is None:  # the integrity error was something else
                raise
            if old.content() != fb.content():
                raise FeedbackConflict(fb.feedback_id) from None
            return old, False
        return stored, stored.feedback_id == fb.feedback_id

    def complete_fold(self, owner: str, feedback_id: str, profile_update: dict[str, Any],
                      expect_version: int, learned: dict[str, Any] | None = None) -> StoredFeedback | None:
        """Mark a stored item folded and write the profile it changed (and, when given, the learners'
        state it left, ``learned``), in one transaction guarded by the profile's version. None when the
        item is gone (deleted meanwhile); ``ProfileConflict`` when the profile moved on (the caller
        re-merges, no model work)."""
        def fn(s: Session) -> StoredFeedback | None:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id)
                         .with_for_update())
            if f is None:
                return None
            _apply_profile_update(s, owner, f.user_id, profile_update, expect_version)
            f.folded, f.fold_error = True, None
            if learned is not None:
                f.learned = learned
            s.flush()
            return feedback_record(f)
        return self._tx(fn)

    def fail_fold(self, owner: str, feedback_id: str, error: str) -> StoredFeedback | None:
        """Record why an item could not be folded (it stays stored, unfolded)."""
        def fn(s: Session) -> StoredFeedback | None:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            if f is None:
                return None
            f.fold_error = error[:2000]
            s.flush()
            return feedback_record(f)
        return self._tx(fn)

    def pending_feedback(self) -> list[tuple[str, StoredFeedback]]:
        """Every stored item still waiting to be folded (not folded, no error), in order of arrival:
        what a restarted server folds first."""
        def fn(s: Session) -> list[tuple[str, StoredFeedback]]:
            q = select(Feedback).where(Feedback.folded.is_(False), Feedback.fold_error.is_(None)).order_by(Feedback.pk)
            return [(f.owner, feedback_record(f)) for f in s.scalars(q)]
        return self._read(fn)

    def delete_feedback(self, owner: str, feedback_id: str, profile_update: dict[str, Any] | None = None,
                        expect_version: int | None = None, *, stale_after: bool = False) -> bool:
        """Delete a feedback row and apply ``profile_update`` in one transaction; False if absent.

        ``stale_after``: mark the learned state of the user's later items stale (they are replayed)."""
        def fn(s: Session) -> bool:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            if f is None:
                return False
            _apply_profile_update(s, owner, f.user_id, profile_update, expect_version)
            if stale_after:
                for later in s.scalars(select(Feedback).where(Feedback.owner == owner, Feedback.user_id == f.user_id,
                                                              Feedback.pk > f.pk, Feedback.learned.is_not(None))):
                    later.learned = {**later.learned, "stale": True}
            s.delete(f)
            return True
        return self._tx(fn)

    def folded_items(self, owner: str, user_id: str) -> list[StoredFeedback]:
        """The user's folded items in order of arrival (with what each left its learners)."""
        def fn(s: Session) -> list[StoredFeedback]:
            q = select(Feedback).where(Feedback.owner == owner, Feedback.user_id == user_id, Feedback.folded.is_(True))
            return [feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk))]
        return self._read(fn)

    def stale_users(self) -> list[tuple[str, str, int]]:
        """``(owner, user, pk)`` of every user with stale learned state, ``pk`` the first stale item: the
        replays a stopped server left undone."""
        def fn(s: Session) -> list[tuple[str, str, int]]:
            first: dict[tuple[str, str], int] = {}
            q = select(Feedback.owner, Feedback.user_id, Feedback.pk, Feedback.learned).where(
                Feedback.learned.is_not(None)).order_by(Feedback.pk)
            for owner, user, pk, learned in s.execute(q):
                if learned and learned.get("stale"):
                    first.setdefault((owner, user), pk)
            return [(o, u, pk) for (o, u), pk in first.items()]
        return self._read(fn)

    def stale_states(self) -> list[tuple[str, str]]:
        """``(owner, user)`` of every user with a learner state marked stale (a delete left it to be
        inferred again, e.g. the in-context hypothesis): the replays a stopped server left undone."""
        def fn(s: Session) -> list[tuple[str, str]]:
            q = select(LearnerState.owner, LearnerState.user_id, LearnerState.state)
            return sorted({(o, u) for o, u, st in s.execute(q) if isinstance(st, dict) and st.get("stale")})
        return self._read(fn)

    def write_replay(self, owner: str, user_id: str, learned: dict[str, dict[str, Any]],
                     profile_update: dict[str, Any], expect_version: int) -> None:
        """A replay's result in one transaction guarded by the profile's version: each item's learned
        state (items deleted meanwhile are skipped) and the profile fields it ends with."""
        def fn(s: Session) -> None:
            _apply_profile_update(s, owner, user_id, profile_update, expect_version)
            if learned:
                for f in s.scalars(select(Feedback).where(Feedback.owner == owner,
                                                          Feedback.feedback_id.in_(list(learned)))):
                    f.learned = learned[f.feedback_id]
        self._tx(fn)


def _apply_profile_update(s: Session, owner: str, user_id: str, profile_update: dict[str, Any] | None,
                          expect_version: int | None) -> None:
    """Set ``profile_update`` on the profile if it is still at ``expect_version`` (and bump the version).

    No-op without an update; ``ProfileConflict`` when the version moved on (or the profile is gone).
    """
    if profile_update is None:
        return
    columns = {k: v for k, v in profile_update.items() if k in PROFILE_FIELDS}
    res = s.execute(
        update(Profile)
        .where(Profile.owner == owner, Profile.user_id == user_id, Profile.version == expect_version)
        .values(**columns, version=Profile.version + 1, updated_at=time.time())
    )
    if res.rowcount != 1:
        raise ProfileConflict(user_id)
    write_states(s, owner, user_id, profile_update)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=TRUNCATE")  # not WAL: its memory-mapped -shm can SIGBUS (module docstring)
    cur.execute("PRAGMA mmap_size=0")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=2000")  # per statement; Store._tx retries up to busy_seconds in all
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _is_busy(e: OperationalError) -> bool:
    msg = str(getattr(e, "orig", e)).lower()
    return "database is locked" in msg or "database is busy" in msg or "deadlock detected" in msg


def _check_sqlite_path(url: str) -> None:
    """A file database's directory must exist (SQLite would say only "unable to open database file")."""

    path = url.split("///", 1)[-1].split("?", 1)[0]
    path = path[len("file:"):] if path.startswith("file:") else path  # sqlite:///file:PATH?mode=ro&uri=true
    if not path or path == ":memory:":
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ValueError(f"database {url!r}: the directory {str(parent)!r} does not exist.")
