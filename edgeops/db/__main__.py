"""Developer commands for the migrations: ``python -m edgeops.db --help``.

``revision -m MSG`` writes the next script (``NNNN_slug.py``) from the difference between
the tables and the migrations, compared on a scratch SQLite database upgraded to the newest
revision, or on ``--url`` (which must be at the newest revision). Without changes it writes
nothing. The other commands act on ``--url``, else on the database of the current settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError

from edgeops.db import Database, _migrations
from edgeops.errors import DatabaseError, EdgeOpsError


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failure)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "heads":
            _say(_migrations.head_revision())
        elif args.command == "revision":
            _say(_revision(args.url, args.message, autogenerate=not args.empty))
        else:
            _run_on_database(args.url or _settings_url(), args.command, args.revision)
    except EdgeOpsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgeops.db", description=__doc__)
    parser.add_argument("--url", help="database URL (default: the configured database)")
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="write the next migration script")
    revision.add_argument("-m", "--message", required=True, help="what the change does")
    revision.add_argument("--empty", action="store_true", help="an empty script to fill in")
    commands.add_parser("upgrade", help="migrate to the newest revision")
    downgrade = commands.add_parser("downgrade", help="migrate back to REVISION")
    downgrade.add_argument("revision", help="a revision id, or 'base' for an empty database")
    commands.add_parser("current", help="print the revision of the database")
    commands.add_parser("heads", help="print the newest revision shipped")
    parser.set_defaults(revision=None)
    return parser


def _run_on_database(url: str, action: str, revision: str | None) -> None:
    database = Database(url)
    try:
        if action == "upgrade":
            _say(database.upgrade())
        elif action == "current":
            _say(database.current_revision() or "(none)")
        elif action == "downgrade" and revision is not None:
            with database.engine.begin() as connection:
                command.downgrade(_migrations.alembic_config(connection), revision)
            _say(database.current_revision() or "(none)")
    except CommandError as exc:
        raise DatabaseError(f"cannot {action} database {database.display_url}: {exc}") from exc
    finally:
        database.dispose()


def _revision(url: str | None, message: str, *, autogenerate: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="edgeops-revision-") as scratch:
        database = Database(url or f"sqlite:///{Path(scratch) / 'scratch.db'}")
        try:
            if url is None:
                database.upgrade()
            elif autogenerate and database.current_revision() != database.head_revision():
                raise DatabaseError(
                    f"database {database.display_url} is not at revision "
                    f"{database.head_revision()!r}; upgrade it first"
                )
            with database.engine.begin() as connection:
                config = _migrations.alembic_config(connection)
                _format_with_ruff(config)
                script = command.revision(
                    config,
                    message=message,
                    autogenerate=autogenerate,
                    rev_id=_migrations.next_revision_id(),
                    process_revision_directives=_drop_if_unchanged if autogenerate else None,
                )
        except CommandError as exc:
            raise DatabaseError(f"cannot write a revision: {exc}") from exc
        finally:
            database.dispose()
    if isinstance(script, list) or script is None:
        return "no changes: the tables match the migrations; nothing written"
    return f"wrote {script.path}; read it through before committing"


def _format_with_ruff(config: Config) -> None:
    """Have Alembic run ``ruff check --fix`` and ``ruff format`` on the new script."""
    if importlib.util.find_spec("ruff") is None:
        return
    script = "REVISION_SCRIPT_FILENAME"
    hooks = {
        "ruff_fix": f"check --fix --exit-zero --quiet {script}",
        "ruff_format": f"format --quiet {script}",
    }
    config.set_section_option("post_write_hooks", "hooks", ", ".join(hooks))
    for name, options in hooks.items():
        config.set_section_option("post_write_hooks", f"{name}.type", "module")
        config.set_section_option("post_write_hooks", f"{name}.module", "ruff")
        config.set_section_option("post_write_hooks", f"{name}.options", options)


def _drop_if_unchanged(
    _context: MigrationContext,
    _revision: str | Iterable[str | None] | Iterable[str],
    directives: list[MigrationScript],
) -> None:
    if all(ops.is_empty() for script in directives for ops in script.upgrade_ops_list):
        directives.clear()


def _settings_url() -> str:
    from edgeops.config import load_settings

    return load_settings().database


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
