"""``edgeops broker``: run the embedded broker; ``edgeops broker acl sync``: Mosquitto's files.

``edgeops broker [--host H] [--port P]`` runs the embedded MQTT broker as before. ``edgeops
broker acl sync`` writes the hub-managed Mosquitto password and ACL files from the database
(enrolled, not revoked devices plus the hub's own identity from ``EDGEOPS_MQTT_URL``) and, with
a pid file, sends the broker SIGHUP so it reads them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

broker_app = typer.Typer(
    help="Run the embedded MQTT broker (zero setup; for production use Mosquitto), or manage "
    "Mosquitto's identities (`acl sync`).",
    invoke_without_command=True,
)
acl_app = typer.Typer(
    help="Mosquitto's password and ACL files, managed by the hub.", no_args_is_help=True
)
broker_app.add_typer(acl_app, name="acl")

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@broker_app.callback()
def broker(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 1883,
) -> None:
    """Run the embedded MQTT broker (zero setup; for production use Mosquitto).

    `edgeops broker acl sync` instead writes the hub-managed Mosquitto password and ACL files.
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgeops.broker import run_embedded_broker
    from edgeops.cli.main import out

    out.print(f"embedded MQTT broker on mqtt://{host}:{port} (Ctrl-C stops it)")
    run_embedded_broker(host, port)


@acl_app.command("sync")
def acl_sync(
    password_file: Annotated[
        Path | None,
        typer.Option(
            help="password file to write (EDGEOPS_BROKER_PASSWORD_FILE, default "
            "<data dir>/mosquitto/passwd)",
            dir_okay=False,
        ),
    ] = None,
    acl_file: Annotated[
        Path | None,
        typer.Option(
            help="ACL file to write (EDGEOPS_BROKER_ACL_FILE, default <data dir>/mosquitto/acl)",
            dir_okay=False,
        ),
    ] = None,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            help="send SIGHUP to the Mosquitto whose pid this file holds "
            "(EDGEOPS_BROKER_PID_FILE; without it, reload the broker yourself)",
            dir_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write Mosquitto's password and ACL files from the database, then reload the broker.

    The files hold the hub's identity (user and password of EDGEOPS_MQTT_URL, which may use
    every device's topics) and every enrolled, not revoked device (only its own subtree).
    """
    from edgeops.broker.auth import BrokerAuthFiles, reload_broker
    from edgeops.cli.devices import open_identities
    from edgeops.cli.main import print_json, settings
    from edgeops.fleet.identity import hub_credentials

    current = settings()
    hub_user, hub_password = hub_credentials(current.mqtt_url)
    default_password_file, default_acl_file = current.broker_files
    files = BrokerAuthFiles(password_file or default_password_file, acl_file or default_acl_file)
    with open_identities() as identities:
        identities.hub_user = hub_user
        result = identities.sync_broker_files(files, hub_password)
    pid_file = pid_file or current.broker_pid_file
    reloaded = reload_broker(pid_file) if pid_file is not None else None
    if as_json:
        print_json({**result.to_dict(), "reloaded_pid": reloaded})
        return
    typer.echo(
        f"wrote {files.password_file} ({len(result.devices)} devices and the hub's identity "
        f"{hub_user!r}; {len(result.revoked)} revoked left out) and {files.acl_file}"
    )
    if reloaded is not None:
        typer.echo(f"sent SIGHUP to the broker (pid {reloaded}): it reloads both files")
    else:
        typer.echo(
            "reload the broker to apply them: `systemctl reload mosquitto` "
            "(or `kill -HUP <pid>`; --pid-file does it for you)"
        )
