"""``edgeops tokens ...``: API tokens for ``/api/v1`` and the dashboard.

    edgeops tokens create --role viewer|operator|admin [--name NAME] [--json]
    edgeops tokens list [--json]
    edgeops tokens revoke TOKEN_ID [--json]

Thin: every command opens the configured database (migrating it if needed) and calls
:class:`edgeops.api.tokens.TokenService`, as the API's ``/api/v1/tokens`` routes do. The
token is printed once, by ``create``; the hub keeps only its SHA-256. A bad role or name is
a usage error (exit 2), an unknown token id exits 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.api.tokens import TokenService

__all__ = ["tokens_app"]

tokens_app = typer.Typer(
    help="API tokens: create (shown once), list, revoke. Roles: viewer reads, operator also "
    "changes things (rollouts, stages, devices ...), admin also manages tokens.",
    no_args_is_help=True,
)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@contextmanager
def _tokens() -> Iterator[TokenService]:
    from edgeops.api.tokens import TokenService
    from edgeops.cli._hub import open_hub

    with open_hub() as hub:
        yield TokenService(hub.database)


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[
        str,
        typer.Option(
            "--role",
            "-r",
            metavar="ROLE",
            help="viewer (read only), operator (reads and changes things) or admin "
            "(also manages tokens)",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "-n",
            metavar="NAME",
            help="who or what holds the token: 1-63 letters, digits or ._@- "
            "(default: <role>-<yyyymmdd>)",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Make an API token and print it once: the hub stores only its hash.

    Callers send it as `Authorization: Bearer <token>` to /api/v1.
    """
    chosen = name if name is not None else f"{role}-{datetime.now(UTC):%Y%m%d}"
    with _tokens() as tokens:
        view, token = tokens.create(chosen, role)
    if as_json:
        _print_json({**view.to_dict(), "token": token})
        return
    typer.echo(f"token {view.id} ({view.name}, role {view.role.value}):")
    typer.echo(token)
    typer.echo("Keep it now: it is not shown again (the hub stores only its hash).")


@tokens_app.command("list")
def tokens_list(as_json: JsonOption = False) -> None:
    """List the API tokens, revoked ones too (never their secrets)."""
    with _tokens() as tokens:
        views = tokens.list()
    if as_json:
        _print_json([view.to_dict() for view in views])
        return
    if not views:
        out.print("no API tokens (make one with: edgeops tokens create --role admin)")
        return
    table = Table("id", "name", "role", "created", "revoked", box=box.SIMPLE)
    for view in views:
        table.add_row(
            view.id,
            view.name,
            view.role.value,
            f"{view.created_at:%Y-%m-%d %H:%M:%S}",
            f"{view.revoked_at:%Y-%m-%d %H:%M:%S}" if view.revoked_at else "",
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="TOKEN_ID", help="the token's id (see `edgeops tokens list`)")
    ],
    as_json: JsonOption = False,
) -> None:
    """Revoke an API token. A running hub refuses it within 1 s (at once when revoked through
    the hub's API). Revoking twice is harmless."""
    with _tokens() as tokens:
        view = tokens.revoke(token_id)
    if as_json:
        _print_json(view.to_dict())
    else:
        typer.echo(f"revoked token {view.id} ({view.name}, role {view.role.value})")
