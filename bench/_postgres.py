"""A scratch database on the local PostgreSQL for a benchmark run (``EDGEOPS_TEST_POSTGRES_URL``,
default ``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

ADMIN_URL = os.environ.get(
    "EDGEOPS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new database named ``<prefix><random>``, dropped afterwards; its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            base, _, _ = ADMIN_URL.rpartition("/")
            yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
