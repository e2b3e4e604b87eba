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
from edgeops.cli.drift import drift_app
from edgeops.cli.firmware import firmware_app
from edgeops.cli.fleet import fleet_app
from edgeops.cli.models import models_app, runs_app
from edgeops.cli.pipelines import pipelines_app
from edgeops.cli.rollout import rollout_app
from edgeops.cli.tokens import tokens_app
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
app.add_typer(drift_app, name="drift")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(firmware_app, name="firmware")
app.add_typer(tokens_app, name="tokens")
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


@hub_app.command("ingest")
def hub_ingest(
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=1, max=64, help="worker processes to run")
    ] = 1,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            max=1000,
            help="most windows written in one INSERT (the broker sends each worker at most "
            "its max_inflight_messages unacknowledged windows: 100 as shipped)",
        ),
    ] = 100,
    batch_ms: Annotated[
        float,
        typer.Option(
            "--batch-ms", min=0, help="longest wait in ms for a batch to fill after its first"
        ),
    ] = 50.0,
    stats_every: Annotated[
        float,
        typer.Option("--stats-every", min=1, metavar="SECONDS", help="log counters this often"),
    ] = 30.0,
    connect_timeout: ConnectTimeoutOption = CONNECT_TIMEOUT_S,
    as_json: JsonOption = False,
) -> None:
    """Store device telemetry with worker processes sharing the stream, until Ctrl-C.

    Each worker is a process with its own MQTT connection (client id <hub id>-ingest-<n>,
    persistent session) in the shared subscription $share/edgeops/edgeops/v1/dev/+/telemetry,
    which the hub's bridge (`edgeops hub serve` with EDGEOPS_INGEST_SHARE=1) joins too: the
    broker hands each window to one of them. A worker checks each window (malformed, device
    mismatch, negative counts, unknown release, feature/class/confidence bins against the
    release's reference, replayed sequence number), writes the valid ones in batches (one INSERT
    ... ON CONFLICT DO NOTHING, idempotent by device and sequence number) and acknowledges them
    to the broker only after the commit, so a worker killed mid-batch loses nothing. Without a
    release repository (`edgeops keys init`) windows are not checked against releases.

    A worker that dies is started again under its client id. SIGINT/SIGTERM stop them all
    cleanly; the counters of each worker are printed at the end.
    """
    from edgeops.monitor.ingest import IngestOptions, run_ingest

    def event(line: str) -> None:
        typer.echo(line, err=as_json)

    report = run_ingest(
        settings(),
        workers=workers,
        options=IngestOptions(
            batch_max=batch_size,
            batch_ms=batch_ms,
            connect_timeout_s=connect_timeout,
            stats_every_s=stats_every,
        ),
        on_event=event,
    )
    if as_json:
        print_json(report.to_dict())
        return
    for name, stats in report.workers.items():
        typer.echo(f"{name}: {stats.line()}")
    typer.echo(f"total: {report.total.line()}")
    if report.restarts:
        typer.echo(f"workers started again: {report.restarts}")


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="simulated devices", min=2, max=200)] = 12,
    headless: Annotated[
        bool,
        typer.Option(
            help="end once the loop is closed and the figures are printed "
            "(EDGEOPS_DEMO_HEADLESS=1); otherwise the fleet runs on until Ctrl-C",
            envvar="EDGEOPS_DEMO_HEADLESS",
        ),
    ] = False,
    epochs: Annotated[int, typer.Option(help="training epochs of the champion", min=1)] = 15,
    steady: Annotated[
        float, typer.Option(metavar="SECONDS", help="streaming before the drift", min=0)
    ] = 20.0,
    gain: Annotated[float, typer.Option(help="the drifted sensor's gain")] = 0.5,
    offset: Annotated[float, typer.Option(help="the drifted sensor's offset")] = 6.0,
    samples: Annotated[
        int, typer.Option(help="raw samples from the drifted fleet to retrain on", min=50)
    ] = 3000,
    timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="longest wait for any one step", min=10)
    ] = 540.0,
    as_json: JsonOption = False,
) -> None:
    """The closed loop on one machine: train, compress, sign, roll out in waves, stream,
    inject drift, detect it, retrain, canary, promote, and print the timeline.

    Everything is real and local: the built-in digits dataset, a broker (embedded unless
    EDGEOPS_MQTT_URL is set), the hub (bridge, fetch server, rollout engine, drift watch,
    continuous-training pipeline) and simulated devices running the real agent. The run's
    database, artifacts, repository and logs go to a fresh directory under <data dir>/demo.
    """
    from edgeops.demo import DemoOptions, run_demo

    current = settings(dev_mode=True)
    options = DemoOptions(
        devices=devices,
        headless=headless,
        epochs=epochs,
        steady_s=steady,
        gain=gain,
        offset=offset,
        samples=samples,
        timeout_s=timeout,
    )
    raise typer.Exit(run_demo(current, options, console=out, as_json=as_json))


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
