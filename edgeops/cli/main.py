"""``edgeops``: the hub's command line (Typer + Rich).

Every list/show/status command takes ``--json`` for scripts. Errors are one line on stderr,
``edgeops: error: ...``: exit code 2 for usage and configuration errors, 1 for runtime
failures (unreachable broker or database ...), 130 on Ctrl-C. No tracebacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from device_agent._version import __version__
from edgeops.cli._hub import CONNECT_TIMEOUT_S, ConnectTimeoutOption
from edgeops.cli.broker import broker_app
from edgeops.cli.compress import compress
from edgeops.cli.data import data_app
from edgeops.cli.devices import devices_app
from edgeops.cli.fleet import fleet_app
from edgeops.cli.models import models_app, runs_app
from edgeops.cli.rollout import rollout_app
from edgeops.cli.train import evaluate, export, train
from edgeops.cli.trust import keys_app, release, releases_app
from edgeops.config import Settings, load_settings
from edgeops.errors import ConfigError, EdgeOpsError

PROG = "edgeops"

app = typer.Typer(
    name=PROG,
    help="EdgeOps hub: train, compress, sign and roll out models to edge devices over MQTT, "
    "and watch them in the field.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
hub_app = typer.Typer(help="Run the hub service.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(hub_app, name="hub")
app.add_typer(broker_app, name="broker")
app.add_typer(devices_app, name="devices")
app.add_typer(fleet_app, name="fleet")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(rollout_app, name="rollout")
app.command("compress")(compress)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("export")(export)
app.add_typer(keys_app, name="keys")
app.add_typer(releases_app, name="releases")
app.command("release")(release)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


class _State:
    config_file: Path | None = None
    data_dir: Path | None = None


_state = _State()


def settings(**overrides: Any) -> Settings:
    """The effective settings for this invocation (global options applied)."""
    return load_settings(_state.config_file, data_dir=_state.data_dir, **overrides)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


@app.callback()
def _global(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML settings file (default: EDGEOPS_CONFIG, then <data dir>/edgeops.toml)",
            dir_okay=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="where EdgeOps keeps everything (EDGEOPS_DATA_DIR, default ~/.edgeops)",
            file_okay=False,
        ),
    ] = None,
) -> None:
    _state.config_file = config
    _state.data_dir = data_dir


@app.command()
def version(as_json: JsonOption = False) -> None:
    """Print the EdgeOps version."""
    if as_json:
        print_json({"version": __version__})
    else:
        out.print(f"edgeops {__version__}")


@config_app.command("show")
def config_show(as_json: JsonOption = False) -> None:
    """Print the effective configuration, secrets masked."""
    shown = settings().public_dict()
    if as_json:
        print_json(shown)
        return
    table = Table("setting", "value", title="EdgeOps configuration")
    for key in sorted(shown):
        table.add_row(key, "" if shown[key] is None else str(shown[key]))
    out.print(table)


@db_app.command("upgrade")
def db_upgrade(as_json: JsonOption = False) -> None:
    """Apply database migrations up to the newest (also done when the hub starts)."""
    from device_agent.link import mask_url
    from edgeops.db import Database

    current = settings()
    database = Database(current.database)
    try:
        database.check()
        revision = database.upgrade()
    finally:
        database.dispose()
    if as_json:
        print_json({"database": mask_url(current.database), "revision": revision})
    else:
        out.print(f"database {mask_url(current.database)} is at revision {revision}")


@hub_app.command("serve")
def hub_serve(
    host: Annotated[str | None, typer.Option(help="API address (EDGEOPS_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="API port (EDGEOPS_API_PORT)")] = None,
    connect_timeout: ConnectTimeoutOption = CONNECT_TIMEOUT_S,
) -> None:
    """Run the hub: migrations, the MQTT bridge and the HTTP API, until Ctrl-C."""
    from edgeops.hub.serve import serve

    current = settings()
    serve(
        current,
        host or current.api_host,
        port or current.api_port,
        connect_timeout_s=connect_timeout,
    )


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="number of simulated devices", min=1, max=50)] = 3,
    headless: Annotated[
        bool,
        typer.Option(
            help="end once every device is online (EDGEOPS_DEMO_HEADLESS=1)",
            envvar="EDGEOPS_DEMO_HEADLESS",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the devices")] = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Start a broker (embedded unless EDGEOPS_MQTT_URL is set), the hub and device agents.

    Each agent connects with its own identity and publishes its retained state; the hub
    records them and prints the fleet. Without --headless it keeps running and shows
    presence changes until Ctrl-C; every child process is stopped on the way out.
    """
    from edgeops.demo import run_demo

    current = settings(dev_mode=True)
    raise typer.Exit(
        run_demo(
            current,
            devices=devices,
            headless=headless,
            timeout_s=timeout,
            as_json=as_json,
            console=out,
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; expected failures become one line on stderr and an exit code.

    Usage errors (unknown option, bad value) are reported by Typer in click's usual form
    ending with ``Error: ...`` and exit code 2.
    """
    try:
        app(args=argv, prog_name=PROG)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ConfigError as exc:
        typer.echo(f"{PROG}: error: {exc}", err=True)
        return 2
    except EdgeOpsError as exc:
        typer.echo(f"{PROG}: error: {exc}", err=True)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
