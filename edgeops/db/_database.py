"""The :class:`Database` facade: one engine, its sessions, its migrations."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine
from sqlmodel import Session

from device_agent.link import mask_url
from edgeops.db import _engine, _migrations
from edgeops.errors import DatabaseError

# Any constant shared by every hub process: two hubs starting together migrate one by one.
_MIGRATION_LOCK_KEY = 0x6564_6765_6F70  # "edgeop"


_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})


class _FairLock:
    """A reentrant lock granted in the order it was asked for.

    SQLite has one writer at a time and lets the others poll with growing sleeps, so a
    thread that writes back to back (the hub's bridge, under a fleet's burst of reports) can
    keep another (the rollout engine) waiting for seconds. Taking turns in this process
    first makes every writing transaction wait at most for the writers queued before it;
    readers do not take part (WAL lets them read beside a writer).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[int] = deque()

    def acquire(self, timeout_s: float) -> bool:
        me = threading.get_ident()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            self._queue.append(me)
            while self._owner is not None or self._queue[0] != me:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._queue.remove(me)
                    self._cond.notify_all()
                    return False
                self._cond.wait(remaining)
            self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()


class Database:
    """One database, SQLite or PostgreSQL, given by its SQLAlchemy URL.

    Creating it does not connect; :meth:`check` does. Every failure to reach or migrate the
    database raises :class:`~edgeops.errors.DatabaseError` with a one-line message that names
    the URL with its password masked.
    """

    def __init__(self, url: str) -> None:
        self.display_url = mask_url(url)
        """The URL as given, password masked: fit for logs and messages."""
        self._url = _engine.parse_url(url)
        self.engine: Engine = _engine.create_engine(self._url, self.display_url)
        self._local = threading.local()  # .batch: the session of this thread's batch
        # SQLite: this process's writing transactions take turns (see _FairLock)
        self._turns = _FairLock() if self.backend == "sqlite" else None
        if self._turns is not None:
            sa.event.listen(self.engine, "before_cursor_execute", self._take_turn_to_write)

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._url.get_backend_name()

    def check(self) -> None:
        """Connect once; raise DatabaseError saying why if that fails."""
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            raise DatabaseError(
                f"cannot connect to database {self.display_url}: {self._cause(exc)}"
            ) from exc

    def upgrade(self) -> str:
        """Apply the shipped migrations up to the newest; returns that revision.

        Already at the newest revision, this changes nothing. On PostgreSQL the whole upgrade
        is one transaction, so a failed migration leaves the schema as it was.
        """
        head = _migrations.head_revision()
        try:
            with self.engine.begin() as connection:
                if self.backend == "postgresql":
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                current = _migrations.current_revision(connection)
                if current is not None and current not in self._known_revisions():
                    raise DatabaseError(
                        f"database {self.display_url} is at revision {current!r}, which this "
                        f"version of EdgeOps does not know (newest here: {head!r}); "
                        "upgrade EdgeOps or use another database"
                    )
                command.upgrade(_migrations.alembic_config(connection), "head")
        except (sa.exc.SQLAlchemyError, CommandError) as exc:
            raise DatabaseError(
                f"cannot migrate database {self.display_url} to revision {head!r}: "
                f"{self._cause(exc)}"
            ) from exc
        return head

    def current_revision(self) -> str | None:
        """The migration revision of the database; None if it was never migrated."""
        try:
            with self.engine.connect() as connection:
                return _migrations.current_revision(connection)
        except sa.exc.SQLAlchemyError as exc:
            raise DatabaseError(
                f"cannot read the revision of database {self.display_url}: {self._cause(exc)}"
            ) from exc

    @staticmethod
    def head_revision() -> str:
        """The newest migration revision shipped with this code."""
        return _migrations.head_revision()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commits when the block ends, rolls back if it raises.

        Objects stay readable after the block (``expire_on_commit=False``). A lost or
        refused connection surfaces as DatabaseError; other errors pass through unchanged.
        """
        outer: Session | None = getattr(self._local, "batch", None)
        if outer is not None:
            yield outer  # inside :meth:`batch`: its transaction, committed when it ends
            return
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"database {self.display_url} failed: {self._cause(exc)}") from exc
        finally:
            local.depth -= 1
            if local.depth == 0 and getattr(local, "writing", False):
                local.writing = False
                assert self._turns is not None
                self._turns.release()

    def _take_turn_to_write(
        self, conn: Any, cursor: Any, statement: str, *args: Any, **kwargs: Any
    ) -> None:
        """SQLite: before the first write of this thread's session, wait for its turn
        (:class:`_FairLock`), held until the outermost session ends. Reads never wait."""
        local = self._local
        if getattr(local, "depth", 0) == 0 or getattr(local, "writing", False):
            return
        words = statement.lstrip()[:8].upper().split()
        if not words or words[0] not in _WRITES:
            return
        assert self._turns is not None
        timeout_s = _engine.SQLITE_BUSY_TIMEOUT_MS / 1000.0
        if not self._turns.acquire(timeout_s):
            raise DatabaseError(
                f"database {self.display_url} failed: still busy after {timeout_s:g} s "
                "(other writers of this process)"
            )
        local.writing = True

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for every :meth:`session` this thread opens inside the block.

        For a writer that records many small things in a row (the hub's bridge): one commit
        instead of one per message. All or nothing: if the block raises, everything it wrote
        is rolled back and the exception propagates, so the caller can replay its items one
        by one; the sessions inside must not catch database errors and go on. Nested
        batches join the outer one.
        """
        if getattr(self._local, "batch", None) is not None:
            yield
            return
        with self.session() as session:
            self._local.batch = session
            try:
                yield
            finally:
                self._local.batch = None

    def dispose(self) -> None:
        """Close every pooled connection. The object stays usable; it reconnects on demand."""
        self.engine.dispose()

    def _cause(self, exc: BaseException) -> str:
        return _engine.short_cause(exc, self._url.password)

    @staticmethod
    def _known_revisions() -> set[str]:
        return {script.revision for script in _migrations.script_directory().walk_revisions()}
