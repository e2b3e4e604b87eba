"""Serialising transactions that decide from what they read (check, then write).

:func:`lock_key` makes every transaction that calls it with the same ``key`` wait for the
others to end before it reads: a transaction-scoped advisory lock on PostgreSQL
(``pg_advisory_xact_lock`` on ``hashtext(key)``); on SQLite, the database's write lock taken
at once by an UPDATE that matches no row (SQLite has one writer at a time, so writers
queue there, whatever the key).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

__all__ = ["lock_key"]


def lock_key(session: Session, key: str, table: type[SQLModel]) -> None:
    """Serialise the transactions naming ``key`` until this one ends; ``table`` is any table
    of the caller's (SQLite's write lock is taken with a no-op UPDATE of it)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(key))))
        return
    columns = table.__table__.columns  # type: ignore[attr-defined]
    column = next(iter(columns))
    touch = sa.update(table).where(sa.false()).values({column.name: column})
    session.execute(touch.execution_options(synchronize_session=False))
