"""Alembic, configured in code: the scripts ship inside the package, no alembic.ini needed."""

from __future__ import annotations

import importlib
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Every module that defines tables. env.py imports them so autogenerate sees all tables;
# add a module here when a domain gets its first table.
TABLE_MODULES = (
    "edgeops.fleet.models",
    "edgeops.data.models",
    "edgeops.registry.models",
    "edgeops.monitor.models",
    "edgeops.rollout.models",
    "edgeops.pipelines.models",
    "edgeops.api.models",
)


def import_table_modules() -> None:
    """Import every table module, filling ``SQLModel.metadata``."""
    for name in TABLE_MODULES:
        importlib.import_module(name)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped scripts, running on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # new revision files are named like 0002_add_rollouts.py (ConfigParser needs %% for %)
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships at least one revision
        raise RuntimeError(f"no migration scripts in {MIGRATIONS_DIR}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


def next_revision_id() -> str:
    """A sequential id for the next script: 0002, 0003, ... (ids may carry a ``_name``)."""
    numbers = [
        int(prefix)
        for s in script_directory().walk_revisions()
        if (prefix := s.revision.partition("_")[0]).isdigit()
    ]
    return f"{max(numbers, default=0) + 1:04d}"
