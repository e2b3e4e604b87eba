"""Engine construction and error wording, kept apart from the :class:`Database` facade."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from device_agent.link import mask_url
from edgeops.errors import DatabaseError

SQLITE_BUSY_TIMEOUT_MS = 5_000  # how long a writer waits for another writer's lock
POSTGRES_CONNECT_TIMEOUT_S = 10  # unless the URL sets connect_timeout itself

_POSTGRES_DRIVERS = {"postgresql", "postgres", "postgresql+psycopg"}
_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite"}

# psycopg wraps the server's words in "connection to server at "h", port p failed: FATAL:  ..."
_CAUSE_PREFIX = re.compile(r"^(?:.*\bfailed:\s+)?(?:FATAL:\s+)?")


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL for ``url``, with plain ``postgresql://`` bound to psycopg 3."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise DatabaseError(f"database URL {mask_url(url)!r} is malformed") from exc
    if parsed.drivername in _POSTGRES_DRIVERS:
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in _SQLITE_DRIVERS:
        return parsed
    raise DatabaseError(
        f"database URL {mask_url(url)!r}: driver {parsed.drivername!r} is not supported; "
        "use sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST:PORT/DB"
    )


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory or ``file:`` URI databases."""
    if url.database in (None, "", ":memory:") or url.query.get("uri"):
        return None
    return Path(url.database)


def create_engine(url: URL, display_url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:
                raise DatabaseError(
                    f"cannot create directory {str(path.parent)!r} for database "
                    f"{display_url}: a file of that name is in the way"
                ) from exc
            except OSError as exc:
                raise DatabaseError(
                    f"cannot create directory {str(path.parent)!r} for database "
                    f"{display_url}: {exc.strerror or exc}"
                ) from exc
        engine = sa.create_engine(url)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (the API) run while the bridge writes. It is a property of the
        # file, so setting it again on each connection is cheap; :memory: answers "memory".
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")
    finally:
        cursor.close()


def short_cause(exc: BaseException, password: str | None) -> str:
    """One line saying why the driver failed, without SQL, hints or the password."""
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line[:1] not in ("\t", " ")]
    lines = [line for line in lines if line]
    if not lines:
        return type(original).__name__
    # "Multiple connection attempts failed. All failures were:" is followed by one line each.
    line = lines[-1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    cause = _CAUSE_PREFIX.sub("", line.lstrip("- ")).rstrip(".") or line
    if password:
        cause = cause.replace(password, "***")
    return cause
