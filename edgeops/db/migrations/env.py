"""Alembic environment. Run by :mod:`edgeops.db` with ``config.attributes["connection"]``.

There is no offline (SQL script) mode and no alembic.ini: the caller always hands over an
open connection, and commits or rolls back the transaction around it.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

from edgeops.db import metadata
from edgeops.db._migrations import import_table_modules
from edgeops.db.types import UTCDateTime

import_table_modules()


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render our column types as plain SQLAlchemy ones, so scripts never import the app."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, JSONB):
        # the default rendering, JSONB(astext_type=Text()), needs an import it does not add
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return "postgresql.JSONB()"
    return False


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # Every script must run on SQLite too, whose ALTER TABLE cannot do much: autogenerate
        # wraps table changes in batch_alter_table(), which on PostgreSQL is plain ALTERs.
        render_as_batch=True,
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("EdgeOps migrations run online only: use edgeops.db.Database.upgrade()")
connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through edgeops.db, which passes an open connection")
run_migrations(connection)
