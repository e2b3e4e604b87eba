"""The database layer: migrations, transactions and one-line errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import Session, func, select

from edgeops.db import Database, metadata
from edgeops.db.__main__ import main as db_command
from edgeops.db._migrations import import_table_modules
from edgeops.errors import DatabaseError
from edgeops.fleet import Device
from tests.fixtures.database import (
    postgres_admin,
    postgres_database_exists,
    postgres_url_for,
    temporary_postgres_database,
)

# -- migrations ---------------------------------------------------------------------------


def test_upgrade_on_an_empty_database_reaches_head(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.current_revision() is None
        assert db.upgrade() == db.head_revision()
        assert db.current_revision() == db.head_revision()
        assert {"alembic_version", "devices"} <= set(sa.inspect(db.engine).get_table_names())
    finally:
        db.dispose()


def test_upgrade_twice_changes_nothing_and_keeps_data(database: Database) -> None:
    with database.session() as session:
        session.add(Device(device_id="d-1", online=True))
    assert database.upgrade() == database.head_revision()
    assert database.current_revision() == database.head_revision()
    with database.session() as session:
        assert session.exec(select(Device.device_id)).all() == ["d-1"]


def test_tables_match_the_migrations(database: Database) -> None:
    """Autogenerate finds nothing to do: the models and the migration scripts agree."""
    import_table_modules()
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []


def test_downgrade_to_base_and_upgrade_again(database: Database, database_url: str) -> None:
    assert db_command(["--url", database_url, "downgrade", "base"]) == 0
    assert database.current_revision() is None
    assert "devices" not in sa.inspect(database.engine).get_table_names()
    assert db_command(["--url", database_url, "upgrade"]) == 0
    assert database.current_revision() == database.head_revision()


def test_upgrade_refuses_a_revision_it_does_not_know(database: Database) -> None:
    with database.engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match="is at revision '9999', which this version"):
        database.upgrade()


# -- sessions -----------------------------------------------------------------------------


def test_session_commits_when_the_block_ends(database: Database) -> None:
    with database.session() as session:
        session.add(Device(device_id="d-1"))
    with database.session() as session:
        device = session.get(Device, "d-1")
        assert device is not None
        assert device.online is False


def test_session_rolls_back_everything_on_exception(database: Database) -> None:
    with pytest.raises(RuntimeError, match="half way"), database.session() as session:
        session.add(Device(device_id="d-1"))
        session.flush()  # the first row is sent to the database ...
        session.add(Device(device_id="d-2"))
        session.flush()
        raise RuntimeError("half way")  # ... and must not stay there
    with database.session() as session:
        assert session.exec(select(func.count()).select_from(Device)).one() == 0


def test_datetimes_come_back_aware_in_utc(database: Database) -> None:
    seen = datetime(2025, 3, 1, 12, 30, 15, 250_000, tzinfo=timezone(timedelta(hours=2)))
    with database.session() as session:
        session.add(Device(device_id="d-1", last_seen=seen))
    with database.session() as session:
        device = session.get(Device, "d-1")
        assert device is not None
        assert device.last_seen == seen
        assert device.last_seen is not None and device.last_seen.tzinfo == UTC
        assert device.created_at.tzinfo == UTC


def test_naive_datetimes_are_refused(database: Database) -> None:
    with (
        pytest.raises(sa.exc.StatementError, match="has no time zone"),
        database.session() as session,
    ):
        session.add(Device(device_id="d-1", last_seen=datetime(2025, 3, 1)))


# -- batches ------------------------------------------------------------------------------


def stored_ids(database: Database) -> list[str]:
    """The device ids committed, read on a connection of its own outside any session (so
    never inside the caller's batch, and never seeing what it has not committed)."""
    with database.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT device_id FROM devices ORDER BY device_id"))
        return [str(device_id) for device_id in rows.scalars()]


def count_commits(database: Database) -> list[int]:
    """The ids of the threads whose connections commit on ``database``, one entry a commit."""
    commits: list[int] = []

    def on_commit(connection: sa.Connection) -> None:
        commits.append(threading.get_ident())

    sa.event.listen(database.engine, "commit", on_commit)
    return commits


def test_sessions_inside_a_batch_share_one_transaction_committed_at_its_end(
    database: Database,
) -> None:
    commits = count_commits(database)
    me = threading.get_ident()
    with database.batch():
        with database.session() as first:
            first.add(Device(device_id="d-1"))
        with database.session() as second:
            assert second is first
            second.add(Device(device_id="d-2"))
            second.flush()  # in the database, but not committed
        assert stored_ids(database) == []
        assert me not in commits
    assert commits.count(me) == 1
    assert stored_ids(database) == ["d-1", "d-2"]


def test_a_nested_batch_joins_the_outer_one(database: Database) -> None:
    commits = count_commits(database)
    me = threading.get_ident()
    with database.batch():
        with database.session() as outer:
            outer.add(Device(device_id="d-1"))
        with database.batch(), database.session() as inner:
            assert inner is outer
            inner.add(Device(device_id="d-2"))
            inner.flush()
        assert stored_ids(database) == []  # the inner batch's end commits nothing
        assert me not in commits
    assert commits.count(me) == 1
    assert stored_ids(database) == ["d-1", "d-2"]


def test_a_batch_that_raises_rolls_back_everything_written_inside(database: Database) -> None:
    with database.session() as session:
        session.add(Device(device_id="d-0"))
    with pytest.raises(RuntimeError, match="half way"), database.batch():
        with database.session() as session:
            session.add(Device(device_id="d-1"))
            session.flush()
        with database.session() as session:
            session.add(Device(device_id="d-2"))
            session.flush()
        raise RuntimeError("half way")
    assert stored_ids(database) == ["d-0"]
    # the thread is out of the batch: its next session is a transaction of its own
    with database.session() as session:
        session.add(Device(device_id="d-3"))
    assert stored_ids(database) == ["d-0", "d-3"]


def test_a_database_error_in_a_batch_rolls_back_the_others_and_propagates(
    database: Database,
) -> None:
    with database.session() as session:
        session.add(Device(device_id="d-0"))
    with pytest.raises(sa.exc.IntegrityError), database.batch():
        with database.session() as session:
            session.add(Device(device_id="d-1"))
        with database.session() as session:
            session.add(Device(device_id="d-0"))  # already stored: the flush fails
            session.flush()
    assert stored_ids(database) == ["d-0"]


def test_sessions_on_another_thread_are_not_part_of_a_batch(database: Database) -> None:
    batch: list[Session] = []
    others: list[tuple[Session, bool]] = []

    def write() -> None:
        with database.session() as session:
            others.append((session, batch[0].in_transaction()))
            session.add(Device(device_id="d-other"))

    writer = threading.Thread(target=write)
    with pytest.raises(RuntimeError, match="undo"), database.batch():
        with database.session() as mine:
            batch.append(mine)
            mine.add(Device(device_id="d-mine"))
        writer.start()
        if database.backend == "postgresql":  # transactions run side by side
            writer.join(timeout=60)
            assert stored_ids(database) == ["d-other"]  # committed while the batch is open
        raise RuntimeError("undo")
    writer.join(timeout=60)
    [(session, during_the_batch)] = others
    assert session is not mine
    # its session began while the batch was open (on SQLite its write then waited for the
    # batch's turn: this process's writers take turns)
    assert during_the_batch
    assert stored_ids(database) == ["d-other"]  # the batch's rollback did not touch it


def test_a_reader_does_not_wait_for_a_writing_batch(database: Database) -> None:
    seen: list[list[str]] = []

    def read() -> None:
        with database.session() as session:
            seen.append([d.device_id for d in session.exec(select(Device)).all()])

    reader = threading.Thread(target=read)
    with database.batch(), database.session() as mine:
        mine.add(Device(device_id="d-mine"))
        mine.flush()  # the batch holds this process's turn to write
        reader.start()
        reader.join(timeout=60)  # returns before the batch ends: reads take no turn
        assert not reader.is_alive()
    assert seen == [[]]  # the batch's row was not committed yet
    assert stored_ids(database) == ["d-mine"]


# -- SQLite -------------------------------------------------------------------------------


def test_sqlite_file_in_a_new_directory_with_wal_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "edgeops.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.check()
        assert path.is_file()
        with db.engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000}
    finally:
        db.dispose()


def test_sqlite_directory_blocked_by_a_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(DatabaseError, match=r"cannot create directory .* a file of that name"):
        Database(f"sqlite:///{tmp_path / 'data' / 'edgeops.db'}")


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "edgeops.db").write_bytes(b"this is not SQLite " * 64)
    db = Database(f"sqlite:///{tmp_path / 'edgeops.db'}")
    with pytest.raises(
        DatabaseError, match=r"cannot connect to database .*: file is not a database"
    ):
        db.check()


# -- URLs and connection errors -----------------------------------------------------------


def test_plain_postgresql_url_uses_psycopg_3() -> None:
    db = Database("postgresql://edgeops@db.example:5432/edgeops")
    assert db.engine.dialect.driver == "psycopg"
    assert db.backend == "postgresql"


@pytest.mark.parametrize("url", ["mysql://u:pw-77x@h/db", "postgresql+psycopg2://u:pw-77x@h/db"])
def test_unsupported_driver_is_refused_without_the_password(url: str) -> None:
    with pytest.raises(DatabaseError, match="is not supported") as caught:
        Database(url)
    assert "pw-77x" not in str(caught.value)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_postgresql_is_one_line_with_host_and_port_but_no_password() -> None:
    port = _closed_port()
    db = Database(f"postgresql://edgeops:pw-42z@127.0.0.1:{port}/edgeops")
    with pytest.raises(DatabaseError) as caught:
        db.check()
    message = str(caught.value)
    assert message.startswith("cannot connect to database postgresql://edgeops:***@")
    assert f"127.0.0.1:{port}" in message
    assert "refused" in message.lower()
    assert "pw-42z" not in message
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, sa.exc.OperationalError)


def test_unreachable_postgresql_fails_upgrade_with_the_same_clarity() -> None:
    port = _closed_port()
    db = Database(f"postgresql://edgeops:pw-42z@127.0.0.1:{port}/edgeops")
    with pytest.raises(
        DatabaseError, match=rf"cannot migrate .*127\.0\.0\.1:{port}.*refused"
    ) as caught:
        db.upgrade()
    assert "pw-42z" not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.postgres
def test_missing_postgresql_database_is_named(postgres_server: str) -> None:
    db = Database(postgres_url_for("edgeops_no_such_database"))
    with pytest.raises(DatabaseError) as caught:
        db.check()
    message = str(caught.value)
    assert message.endswith('database "edgeops_no_such_database" does not exist'), message
    assert "\n" not in message


# -- the test fixtures themselves ---------------------------------------------------------


@pytest.mark.postgres
def test_per_test_postgresql_database_is_dropped_even_if_the_test_fails() -> None:
    names: list[str] = []
    databases: list[Database] = []
    try:
        with (
            pytest.raises(RuntimeError, match="test body failed"),
            temporary_postgres_database() as url,
        ):
            name = sa.make_url(url).database
            assert name is not None
            names.append(name)
            databases.append(Database(url))
            databases[0].upgrade()  # a pooled connection stays open: DROP ... WITH (FORCE)
            raise RuntimeError("test body failed")
    finally:
        for db in databases:
            db.dispose()
    with postgres_admin() as admin:
        assert not postgres_database_exists(admin, names[0])
