"""The store's tables (SQLAlchemy ORM) and the records the store hands out (``server.store``)."""

from __future__ import annotations

import time
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
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from personalign.learners import LEARNERS, state_fields
from personalign.personas.drift import PreferencePair

__all__ = ["Base", "ApiKey", "Profile", "LearnerState", "Completion", "Feedback", "StoreMeta", "StoredFeedback", "PROFILE_FIELDS",
           "profile_dict", "feedback_record", "drift_prompt", "read_states", "write_states"]


def drift_prompt(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A stored prompt (chat messages) as Drift scores it: one user turn is its text."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [dict(m) for m in messages]


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
    pdpo_user_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # the learner the user's feedback teaches (``personalign.learners``; NULL: Drift, and the P-DPO
    # embedding where it applies) and its settings for this user
    learner: Mapped[str | None] = mapped_column(String(40), nullable=True)
    learner_params: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # what the learners hold lives in ``learner_states``; releases before it kept Drift weights and the
    # P-DPO embedding in the columns ``drift_profile`` and ``pdpo_embedding`` of this table, which
    # ``store_migrate.migrate_learner_states`` moves there
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class LearnerState(Base):
    """One learner's state for one user (``personalign.learners``): a versioned JSON object."""

    __tablename__ = "learner_states"
    __table_args__ = (UniqueConstraint("owner", "user_id", "learner", name="uq_learner_state"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    learner: Mapped[str] = mapped_column(String(40))
    format: Mapped[int] = mapped_column(Integer, default=1)  # the learner's state format version
    state: Mapped[dict] = mapped_column(JSON)
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
    # what each learner kept with this item ({learner: entry}, ``Merge.learned``), so a delete can go
    # back to the state before an item and replay the ones after it; "stale": true is added once an
    # earlier item was deleted and the replay has not rewritten it yet; NULL: it kept nothing
    learned: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class StoreMeta(Base):
    """One row the store writes when it opens: proves the database takes writes."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


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

    def pairs(self) -> list[PreferencePair]:
        """The pairs this item states, as Drift scores them: the chosen reply over each rejected one."""
        prompt = drift_prompt(self.prompt)
        return [PreferencePair(prompt=prompt, chosen=self.chosen, rejected=r) for r in self.rejected_texts]

    def content(self) -> tuple:
        """What a retry must repeat to be the same item."""
        return (self.user_id, self.prompt, self.chosen, self.rejected_texts, self.completion_id
                if self.chosen_index is not None else None, self.chosen_index)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.feedback_id, "object": "feedback", "user": self.user_id, "prompt": self.prompt,
                "chosen": self.chosen, "rejected": self.rejected, "also_rejected": list(self.also_rejected),
                "completion_id": self.completion_id, "chosen_index": self.chosen_index,
                "folded": self.folded, "fold_error": self.fold_error, "created": int(self.created_at)}


PROFILE_FIELDS = ("preference", "method", "params", "pdpo_user_id", "learner", "learner_params")


def profile_dict(p: Profile, states: dict[str, Any]) -> dict[str, Any]:
    """A profile as the API shows it: its columns and, under each learner's field, its state (``states``:
    learner name -> state)."""
    out = {"id": p.user_id, "object": "profile", "user": p.user_id, "preference": p.preference,
           "method": p.method, "params": p.params or {}, "pdpo_user_id": p.pdpo_user_id, "learner": p.learner,
           "learner_params": p.learner_params or {}}
    out.update({f: states.get(name) for f, name in state_fields().items()})
    out.update({"version": p.version, "created": int(p.created_at), "updated": int(p.updated_at)})
    return out


def feedback_record(f: Feedback) -> StoredFeedback:
    return StoredFeedback(f.feedback_id, f.user_id, f.prompt, f.chosen, f.rejected, f.completion_id, f.folded,
                          f.created_at, f.fold_error, f.chosen_index, tuple(f.also_rejected or ()), f.learned,
                          f.pk)


def read_states(s: Session, owner: str, user_id: str) -> dict[str, Any]:
    """Learner name -> state of one user."""
    q = select(LearnerState.learner, LearnerState.state).where(LearnerState.owner == owner,
                                                                 LearnerState.user_id == user_id)
    return {name: state for name, state in s.execute(q)}


def write_states(s: Session, owner: str, user_id: str, fields: dict[str, Any]) -> None:
    """Write the learner states among ``fields`` (by profile field; None deletes the state)."""
    names = state_fields()
    for f, value in fields.items():
        if f not in names:
            continue
        learner = names[f]
        row = s.scalar(select(LearnerState).where(LearnerState.owner == owner, LearnerState.user_id == user_id,
                                                  LearnerState.learner == learner))
        if value is None:
            if row is not None:
                s.delete(row)
        elif row is None:
            s.add(LearnerState(owner=owner, user_id=user_id, learner=learner, state=value,
                               format=LEARNERS.get(learner).format, updated_at=time.time()))
        else:
            row.state, row.updated_at = value, time.time()
    s.flush()
