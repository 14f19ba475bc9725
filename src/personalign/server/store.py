"""The server's only state: API keys, user profiles, recorded completions and feedback, in SQL.

SQLAlchemy 2 over SQLite (default; WAL journal, ``synchronous=FULL``, a busy timeout) or PostgreSQL
(``postgresql://...``, driven by psycopg 3). Every change is one transaction, so a process killed at
any point leaves each change either fully there or absent. Replicas that share one PostgreSQL share
everything: no server keeps state outside the store.

Ownership: every profile, completion and feedback row belongs to one API key (``owner``); every
read and write names the owner, and another key's rows are simply not found.

Concurrency: a profile carries a ``version``; ``update_profile_if`` writes only when the version
is unchanged (optimistic locking), so two replicas folding feedback into one profile at once
cannot lose an update. Feedback ids are unique per owner, so a retried POST is recorded once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    event,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = ["Store", "hash_key", "new_key", "ProfileConflict", "FeedbackConflict", "StoredFeedback"]


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


@dataclass
class StoredFeedback:
    feedback_id: str
    user_id: str
    prompt: list
    chosen: str
    rejected: str
    completion_id: str | None
    folded: bool
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.feedback_id, "object": "feedback", "user": self.user_id, "prompt": self.prompt,
                "chosen": self.chosen, "rejected": self.rejected, "completion_id": self.completion_id,
                "folded": self.folded, "created": int(self.created_at)}


PROFILE_FIELDS = ("preference", "method", "params", "drift_profile", "pdpo_user_id")


def _profile_dict(p: Profile) -> dict[str, Any]:
    return {"id": p.user_id, "object": "profile", "user": p.user_id, "preference": p.preference,
            "method": p.method, "params": p.params or {}, "drift_profile": p.drift_profile,
            "pdpo_user_id": p.pdpo_user_id, "version": p.version, "created": int(p.created_at),
            "updated": int(p.updated_at)}


def _feedback_record(f: Feedback) -> StoredFeedback:
    return StoredFeedback(f.feedback_id, f.user_id, f.prompt, f.chosen, f.rejected, f.completion_id, f.folded,
                          f.created_at)


class Store:
    """All persistent state behind one SQLAlchemy engine.

    Args:
        url: ``sqlite:///path.db`` (default file store), ``sqlite://`` (in memory, tests) or
            ``postgresql://user:pass@host/db``.
    """

    def __init__(self, url: str = "sqlite:///personalign.db") -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"`db` must be a database URL (sqlite:///FILE or postgresql://...), got {url!r}.")
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url in ("sqlite://", "sqlite:///:memory:"):
                from sqlalchemy.pool import StaticPool

                kwargs["poolclass"] = StaticPool
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bad URL or a missing driver
            raise ValueError(f"could not open database {self.url!r}: {e}") from e
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self, fn: Callable[[Session], Any]) -> Any:
        with self._session.begin() as s:
            return fn(s)

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str = "") -> tuple[str, str]:
        """Create an API key; returns ``(id, key)``. Only the key's hash is stored."""
        kid, key = new_key()
        self._tx(lambda s: s.add(ApiKey(id=kid, key_hash=hash_key(key), name=name, created_at=time.time())))
        return kid, key

    def owner_of(self, key: str) -> str | None:
        """The id of the live key ``key``, or None (unknown or revoked)."""
        with self._session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
            return row.id if row is not None and row.revoked_at is None else None

    def revoke_key(self, kid: str) -> bool:
        def fn(s: Session) -> bool:
            res = s.execute(update(ApiKey).where(ApiKey.id == kid, ApiKey.revoked_at.is_(None))
                            .values(revoked_at=time.time()))
            return res.rowcount > 0
        return self._tx(fn)

    def list_keys(self) -> list[dict[str, Any]]:
        with self._session() as s:
            return [{"id": k.id, "object": "api_key", "name": k.name, "created": int(k.created_at),
                     "revoked": k.revoked_at is not None} for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at))]

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
        with self._session() as s:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            return _profile_dict(p) if p is not None else None

    def list_profiles(self, owner: str, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        with self._session() as s:
            q = select(Profile).where(Profile.owner == owner)
            if after is not None:
                q = q.where(Profile.user_id > after)
            return [_profile_dict(p) for p in s.scalars(q.order_by(Profile.user_id).limit(limit))]

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

    def delete_profile(self, owner: str, user_id: str) -> bool:
        def fn(s: Session) -> bool:
            p = s.scalar(select(Profile).where(Profile.owner == owner, Profile.user_id == user_id))
            if p is None:
                return False
            s.delete(p)
            return True
        return self._tx(fn)

    # ------------------------------------------------------------------ completions
    def record_completion(self, owner: str, cid: str, user_id: str | None, messages: list, text: str,
                          method: str, finish_reason: str) -> None:
        self._tx(lambda s: s.add(Completion(id=cid, owner=owner, user_id=user_id, messages=messages, text=text,
                                            method=method, finish_reason=finish_reason, created_at=time.time())))

    def get_completion(self, owner: str, cid: str) -> dict[str, Any] | None:
        with self._session() as s:
            c = s.scalar(select(Completion).where(Completion.owner == owner, Completion.id == cid))
            if c is None:
                return None
            return {"id": c.id, "user": c.user_id, "messages": c.messages, "text": c.text, "method": c.method,
                    "finish_reason": c.finish_reason}

    # ------------------------------------------------------------------ feedback
    def get_feedback(self, owner: str, feedback_id: str) -> StoredFeedback | None:
        with self._session() as s:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            return _feedback_record(f) if f is not None else None

    def list_feedback(self, owner: str, user_id: str | None = None) -> list[StoredFeedback]:
        with self._session() as s:
            q = select(Feedback).where(Feedback.owner == owner)
            if user_id is not None:
                q = q.where(Feedback.user_id == user_id)
            return [_feedback_record(f) for f in s.scalars(q.order_by(Feedback.pk))]

    def add_feedback(self, owner: str, fb: StoredFeedback, profile_update: dict[str, Any] | None = None,
                     expect_version: int | None = None) -> tuple[StoredFeedback, bool]:
        """Record feedback and (optionally) the profile fields it changes, in one transaction.

        Returns ``(stored, created)``: an id already recorded with the same content returns the
        stored item and ``created=False`` (idempotent retry). Raises ``FeedbackConflict`` when the id
        was used for different content, ``ProfileConflict`` when the profile's version moved on.
        """
        def fn(s: Session) -> StoredFeedback:
            _apply_profile_update(s, owner, fb.user_id, profile_update, expect_version)
            row = Feedback(owner=owner, feedback_id=fb.feedback_id, user_id=fb.user_id, prompt=fb.prompt,
                           chosen=fb.chosen, rejected=fb.rejected, completion_id=fb.completion_id,
                           folded=fb.folded, created_at=fb.created_at)
            s.add(row)
            s.flush()
            return _feedback_record(row)
        try:
            return self._tx(fn), True
        except IntegrityError:
            old = self.get_feedback(owner, fb.feedback_id)
            if old is None:  # the integrity error was something else
                raise
            if (old.user_id, old.prompt, old.chosen, old.rejected) != (fb.user_id, fb.prompt, fb.chosen, fb.rejected):
                raise FeedbackConflict(fb.feedback_id) from None
            return old, False

    def delete_feedback(self, owner: str, feedback_id: str, profile_update: dict[str, Any] | None = None,
                        expect_version: int | None = None) -> bool:
        """Delete a feedback row and apply ``profile_update`` in one transaction; False if absent."""
        def fn(s: Session) -> bool:
            f = s.scalar(select(Feedback).where(Feedback.owner == owner, Feedback.feedback_id == feedback_id))
            if f is None:
                return False
            _apply_profile_update(s, owner, f.user_id, profile_update, expect_version)
            s.delete(f)
            return True
        return self._tx(fn)


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
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
