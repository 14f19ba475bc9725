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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text as sa_text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from personalign.server.schemas import ID_PATTERN

__all__ = ["Store", "hash_key", "new_key", "ProfileConflict", "FeedbackConflict", "ChoiceConflict", "StoredFeedback",
           "StoreBusy", "StoreUnavailable"]

logger = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Profile(Base):
    __tablename__ = "profiles"
    __table_args__ = (UniqueConstraint("owner", "user_id", name="uq_profile_owner_user"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    preference: Mapped[str | None] = mapped_column(Text, nullable=True)
    method: Mapped[str | None] = mapped_column(String(100), nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    drift_profile: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    pdpo_user_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # a P-DPO embedding fitted from the user's feedback (``UserEmbedding.to_dict``), for users the
    # checkpoint never saw
    pdpo_embedding: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Completion(Base):
    __tablename__ = "completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    user_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    messages: Mapped[list] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(100))
    finish_reason: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[float] = mapped_column(Float)
    # every choice {"index", "text", "method", "finish_reason"}; text/method/finish_reason are choice 0's.
    # NULL in rows written before choices were stored (one choice).
    choices: Mapped[list | None] = mapped_column(JSON, nullable=True)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("owner", "feedback_id", name="uq_feedback_owner_id"),)
    pk: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    feedback_id: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[list] = mapped_column(JSON)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    completion_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    folded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    fold_error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why folding failed (not retried)
    # a choice among a completion's choices: which was chosen, and the rejected texts after the first
    chosen_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    also_rejected: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # what the user's learners held right after this item folded ({"pdpo_embedding": ...}), so a delete
    # can go back to the state before an item and replay the ones after it; {"stale": true} once an
    # earlier item was deleted and the replay has not rewritten it yet; NULL: the item taught no learner
    learned: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class StoreMeta(Base):
    """One row the store writes when it opens: proves the database takes writes."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


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


@dataclass
class StoredFeedback:
    """One feedback item: ``chosen`` preferred to ``rejected`` and to each of ``also_rejected`` (a choice
    among ``n`` choices of completion ``completion_id``, ``chosen_index`` the one kept: ``n − 1`` pairs)."""

    feedback_id: str
    user_id: str
    prompt: list
    chosen: str
    rejected: str
    completion_id: str | None
    folded: bool
    created_at: float
    fold_error: str | None = None
    chosen_index: int | None = None
    also_rejected: tuple[str, ...] = ()
    learned: dict | None = None  # the learners' state after this item folded (``Feedback.learned``)
    pk: int = 0  # the order of arrival

    @property
    def stale(self) -> bool:
        """An earlier item was deleted and this item's learned state waits to be replayed."""
        return bool(self.learned and self.learned.get("stale"))

    @property
    def rejected_texts(self) -> list[str]:
        return [self.rejected, *self.also_rejected]

    def content(self) -> tuple:
        """What a retry must repeat to be the same item."""
        return (self.user_id, self.prompt, self.chosen, self.rejected_texts, self.completion_id
                if self.chosen_index is not None else None, self.chosen_index)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.feedback_id, "object": "feedback", "user": self.user_id, "prompt": self.prompt,
                "chosen": self.chosen, "rejected": self.rejected, "also_rejected": list(self.also_rejected),
                "completion_id": self.completion_id, "chosen_index": self.chosen_index,
                "folded": self.folded, "fold_error": self.fold_error, "created": int(self.created_at)}


PROFILE_FIELDS = ("preference", "method", "params", "drift_profile", "pdpo_user_id", "pdpo_embedding")


def _profile_dict(p: Profile) -> dict[str, Any]:
    return {"id": p.user_id, "object": "profile", "user": p.user_id, "preference": p.preference,
            "method": p.method, "params": p.params or {}, "drift_profile": p.drift_profile,
            "pdpo_user_id": p.pdpo_user_id, "pdpo_embedding": p.pdpo_embedding, "version": p.version, "created": int(p.created_at),
            "updated": int(p.updated_at)}


def _feedback_record(f: Feedback) -> StoredFeedback:
    return StoredFeedback(f.feedback_id, f.user_id, f.prompt, f.chosen, f.rejected, f.completion_id, f.folded,
                          f.created_at, f.fold_error, f.chosen_index, tuple(f.also_rejected or ()), f.learned,
                          f.pk)


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
            _add_missing_columns(self.engine)
            self._session = sessionmaker(self.engine, expire_on_commit=False)
            self.migrated: list[dict[str, str]] = self._tx(_migrate_ids)
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
                return _profile_dict(p)
            return self._tx(fn)
        except IntegrityError:
            return None

    def get_profile(self, owner: str, user_id: str) -> dict[str, Any] | None:
        def fn(s: Session) -> dict[str, Any] | None:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            return _profile_dict(p) if p is not None else None
        return self._read(fn)

    def list_profiles(self, owner: str, limit: int = 100, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """One page of ``owner``'s profiles by user id, after the id ``after``: ``(page, has_more)``."""
        def fn(s: Session) -> tuple[list[dict[str, Any]], bool]:
            q = select(Profile).where(Profile.owner == owner)
            if after is not None:
                q = q.where(Profile.user_id > after)
            rows = [_profile_dict(p) for p in s.scalars(q.order_by(Profile.user_id).limit(limit + 1))]
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
            p.version += 1
            p.updated_at = time.time()
            s.flush()
            return _profile_dict(p)
        return self._tx(fn)

    def delete_profile(self, owner: str, user_id: str, *, keep_history: bool = False) -> dict[str, int] | None:
        """Delete a profile and (unless ``keep_history``) its user's feedback and completions, in one
        transaction; returns what was deleted, or None when there is no such profile."""
        def fn(s: Session) -> dict[str, int] | None:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            if p is None:
                return None
            s.delete(p)
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
            return _feedback_record(f) if f is not None else None
        return self._read(fn)

    def recent_feedback(self, owner: str, user_id: str, limit: int, before: str | None = None) -> list[StoredFeedback]:
        """The user's ``limit`` most recent folded items (newest first), those before item ``before`` when given."""
        def fn(s: Session) -> list[StoredFeedback]:
            q = select(Feedback).where(Feedback.owner == owner, Feedback.user_id == user_id, Feedback.folded.is_(True))
            if before is not None:
                pk = s.scalar(select(Feedback.pk).where(Feedback.owner == owner, Feedback.feedback_id == before))
                if pk is not None:
                    q = q.where(Feedback.pk < pk)
            return [_feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk.desc()).limit(limit))]
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
            rows = [_feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk).limit(limit + 1))]
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
                    return _feedback_record(prior)  # the same choice again: the first item stands
            _apply_profile_update(s, owner, fb.user_id, profile_update, expect_version)
            row = Feedback(owner=owner, feedback_id=fb.feedback_id, user_id=fb.user_id, prompt=fb.prompt,
                           chosen=fb.chosen, rejected=fb.rejected, completion_id=fb.completion_id,
                           folded=fb.folded, created_at=fb.created_at, fold_error=fb.fold_error,
                           chosen_index=fb.chosen_index, also_rejected=list(fb.also_rejected) or None)
            s.add(row)
            s.flush()
            return _feedback_record(row)
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
            return _feedback_record(f)
        return self._tx(fn)

    def fail_fold(self, owner: str, feedback_id: str, error: str) -> StoredFeedback | None:
        """Record why an item could not be folded (it stays stored, unfolded)."""
        def fn(s: Session) -> StoredFeedback | None:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            if f is None:
                return None
            f.fold_error = error[:2000]
            s.flush()
            return _feedback_record(f)
        return self._tx(fn)

    def pending_feedback(self) -> list[tuple[str, StoredFeedback]]:
        """Every stored item still waiting to be folded (not folded, no error), in order of arrival:
        what a restarted server folds first."""
        def fn(s: Session) -> list[tuple[str, StoredFeedback]]:
            q = select(Feedback).where(Feedback.folded.is_(False), Feedback.fold_error.is_(None)).order_by(Feedback.pk)
            return [(f.owner, _feedback_record(f)) for f in s.scalars(q)]
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
                    later.learned = {"stale": True}
            s.delete(f)
            return True
        return self._tx(fn)

    def folded_items(self, owner: str, user_id: str) -> list[StoredFeedback]:
        """The user's folded items in order of arrival (with what each left its learners)."""
        def fn(s: Session) -> list[StoredFeedback]:
            q = select(Feedback).where(Feedback.owner == owner, Feedback.user_id == user_id, Feedback.folded.is_(True))
            return [_feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk))]
        return self._read(fn)

    def learned_before(self, owner: str, feedback_id: str) -> dict[str, Any] | None:
        """What the user's learners held before item ``feedback_id``: the learned state of the latest earlier
        item that has one and is not stale; None when there is none (or the item is gone)."""
        def fn(s: Session) -> dict[str, Any] | None:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            if f is None:
                return None
            q = select(Feedback.learned).where(Feedback.owner == owner, Feedback.user_id == f.user_id,
                                               Feedback.pk < f.pk, Feedback.learned.is_not(None))
            for learned in s.scalars(q.order_by(Feedback.pk.desc())):
                if learned and not learned.get("stale"):
                    return learned
            return None
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
    res = s.execute(
        update(Profile)
        .where(Profile.owner == owner, Profile.user_id == user_id, Profile.version == expect_version)
        .values(**profile_update, version=Profile.version + 1, updated_at=time.time())
    )
    if res.rowcount != 1:
        raise ProfileConflict(user_id)


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


_ID_LIMIT = 128  # the longest id a server accepts (``Limits.max_id_chars``' default)


def _safe_id(old: str, taken: set[str], limit: int = _ID_LIMIT) -> str:
    """A safe id for ``old`` (``schemas.ID_PATTERN``, at most ``limit`` characters): other characters
    become ``_``, an id that does not start with a letter or digit gets ``id`` in front, and ``-2``,
    ``-3``... avoids ids in ``taken``."""
    base = "".join(c if c.isascii() and (c.isalnum() or c in "._:@+-") else "_" for c in old)
    if not base or not base[0].isalnum():
        base = "id" + base
    base = base[: limit - 8]
    new, n = base, 1
    while new in taken:
        n += 1
        new = f"{base}-{n}"
    return new


def _unsafe(value: str | None) -> bool:
    return value is not None and (len(value) > _ID_LIMIT or not ID_PATTERN.fullmatch(value))


def _migrate_ids(s: Session) -> list[dict[str, str]]:
    """Rename user, feedback and completion ids an earlier release stored outside the safe set (``a/b``,
    ``..``, ``.``), with every row that names them, so each stays addressable in a URL; returns what was
    renamed (``kind``, ``owner``, ``old``, ``new``). One transaction; a no-op on a clean database."""
    out: list[dict[str, str]] = []
    owners = set(s.scalars(select(Profile.owner))) | set(s.scalars(select(Feedback.owner))) | \
        set(s.scalars(select(Completion.owner)))
    for owner in sorted(owners):
        users = set(s.scalars(select(Profile.user_id).where(Profile.owner == owner))) | \
            set(s.scalars(select(Feedback.user_id).where(Feedback.owner == owner))) | \
            {u for u in s.scalars(select(Completion.user_id).where(Completion.owner == owner)) if u is not None}
        for old in sorted(u for u in users if _unsafe(u)):
            new = _safe_id(old, users)
            users.add(new)
            for model in (Profile, Feedback, Completion):
                s.execute(update(model).where(model.owner == owner, model.user_id == old).values(user_id=new))
            out.append({"kind": "user", "owner": owner, "old": old, "new": new})
        fids = set(s.scalars(select(Feedback.feedback_id).where(Feedback.owner == owner)))
        for old in sorted(f for f in fids if _unsafe(f)):
            new = _safe_id(old, fids)
            fids.add(new)
            s.execute(update(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == old)
                      .values(feedback_id=new))
            out.append({"kind": "feedback", "owner": owner, "old": old, "new": new})
    cids = set(s.scalars(select(Completion.id)))
    for old in sorted(c for c in cids if _unsafe(c)):
        new = _safe_id(old, cids, limit=64)  # the column's width
        cids.add(new)
        owner = s.scalar(select(Completion.owner).where(Completion.id == old))
        s.execute(update(Completion).where(Completion.id == old).values(id=new))
        s.execute(update(Feedback).where(Feedback.owner == owner, Feedback.completion_id == old)
                  .values(completion_id=new))
        out.append({"kind": "completion", "owner": owner, "old": old, "new": new})
    return out


def _add_missing_columns(engine: Any) -> None:
    """Columns added since a database was created (all nullable), added in place: older stores open."""
    insp = sa_inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable:
                    conn.execute(sa_text(f'ALTER TABLE {table.name} ADD COLUMN {col.name} '
                                         f'{col.type.compile(dialect=engine.dialect)}'))
