"""Databases written by earlier releases, brought up to date when a ``Store`` opens: columns added
since (all nullable, added in place), ids outside the safe set renamed with every row that names
them (reported at start-up), and learned state moved from the profile's own columns to one row per
(user, learner) in ``learner_states``."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text as sa_text
from sqlalchemy.orm import Session

from personalign.server.schemas import ID_PATTERN
from personalign.server.store_tables import Base, Completion, Feedback, LearnerState, Profile

__all__ = ["migrate_ids", "add_missing_columns", "migrate_learner_states", "LEGACY_STATE_COLUMNS"]

# profile columns of earlier releases -> the learner whose state they held
LEGACY_STATE_COLUMNS = {"drift_profile": "drift", "pdpo_embedding": "pdpo"}


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


def migrate_ids(s: Session) -> list[dict[str, str]]:
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


def add_missing_columns(engine: Any) -> None:
    """Columns added since a database was created (all nullable), added in place: older stores open."""
    insp = sa_inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable:
                    conn.execute(sa_text(f'ALTER TABLE {table.name} ADD COLUMN {col.name} '
                                         f'{col.type.compile(dialect=engine.dialect)}'))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def migrate_learner_states(engine: Any) -> int:
    """Move the Drift profiles and P-DPO embeddings an earlier release kept in the profile's columns into
    ``learner_states`` (one row per user and learner; the old columns are emptied, not dropped), and
    rename what feedback items kept (``learned``) from the embedding's field to the learner's name.
    One transaction; returns the profiles moved (0 on a current database)."""
    cols = {c["name"] for c in sa_inspect(engine).get_columns("profiles")}
    legacy = [c for c in LEGACY_STATE_COLUMNS if c in cols]
    moved = 0
    with engine.begin() as conn:
        if legacy:
            where = " OR ".join(f"{c} IS NOT NULL" for c in legacy)
            rows = conn.execute(sa_text(f"SELECT owner, user_id, {', '.join(legacy)} FROM profiles WHERE {where}"))
            for owner, user, *values in rows.all():
                for col, value in zip(legacy, values):
                    value = _json(value)
                    if value is None:
                        continue
                    learner = LEGACY_STATE_COLUMNS[col]
                    have = conn.execute(select(LearnerState.pk).where(
                        LearnerState.owner == owner, LearnerState.user_id == user, LearnerState.learner == learner)).first()
                    if have is None:
                        conn.execute(insert(LearnerState).values(owner=owner, user_id=user, learner=learner, state=value,
                                                                 format=1, updated_at=time.time()))
                moved += 1
            conn.execute(sa_text(f"UPDATE profiles SET {', '.join(f'{c} = NULL' for c in legacy)} WHERE {where}"))
        q = select(Feedback.pk, Feedback.learned).where(Feedback.learned.is_not(None))
        for pk, learned in conn.execute(q).all():
            learned = _json(learned)
            if not isinstance(learned, dict):
                continue
            if "pdpo_embedding" in learned or learned == {"stale": True}:  # an earlier release: the embedding alone
                new = {k: v for k, v in learned.items() if k != "pdpo_embedding"}
                new["pdpo"] = learned.get("pdpo_embedding")
                conn.execute(update(Feedback).where(Feedback.pk == pk).values(learned=new))
    return moved
