"""The hub's relational database: SQLite by default, PostgreSQL in production.

    from edgeops.db import Database

    database = Database(settings.database)   # does not connect yet
    database.check()                          # DatabaseError with a one-line reason
    database.upgrade()                        # Alembic migrations up to the newest revision
    with database.session() as session:       # one transaction: commit, or roll back
        session.add(...)

Tables are SQLModel classes in their domain package (``edgeops/fleet/models.py``, ...), on
:data:`metadata`; column types that behave alike on both backends are in
:mod:`edgeops.db.types`. A module that defines tables must be listed in
``edgeops/db/_migrations.py:TABLE_MODULES`` so that autogenerate sees it.

Migrations are Alembic scripts shipped in ``edgeops/db/migrations/versions/`` and are run in
code (no alembic.ini). After changing a table, generate the next script and read it through
before committing::

    python -m edgeops.db revision -m "add rollouts"

It is compared against a scratch SQLite database upgraded to the newest revision; pass
``--url postgresql+psycopg://...`` to compare against PostgreSQL instead. Other commands:
``python -m edgeops.db [--url URL] upgrade | downgrade REV | current | heads``; without
``--url`` they act on the database of the current settings.
"""

from __future__ import annotations

from sqlmodel import SQLModel

from edgeops.db._database import Database

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names are predictable, so later migrations can drop them (SQLite batch mode)."""

metadata = SQLModel.metadata
"""Every EdgeOps table. Table modules import :mod:`edgeops.db` first, so the convention holds."""
metadata.naming_convention = NAMING_CONVENTION

__all__ = ["NAMING_CONVENTION", "Database", "metadata"]
