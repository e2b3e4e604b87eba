"""``edgeops fleet simulate``: N real device agents against the configured hub.

    edgeops fleet simulate --devices N [--processes P]
        [--hardware-mix arch=x86_64:0.8,arch=armv7l:0.2]
        [--fail-install F] [--crash-after-activation F] [--degrade-accuracy F]
        [--seconds S] [--json]

The devices (``<prefix>-0001`` ...) run :mod:`edgeops.fleet.simulator`: the real agent, each
with its own MQTT connection, state directory (``<data dir>/simulator``) and synthetic
source, shipped with the release ``--release`` (default: the first released target) in slot
a and the hub's trusted root. When the hub's ``EDGEOPS_MQTT_URL`` carries credentials (the
broker wants them), every device is enrolled (an identity left by an earlier simulation is
revoked and enrolled again: its password is only ever shown once) and the broker's password
and ACL files are synced; the broker is reloaded through ``EDGEOPS_BROKER_PID_FILE`` if set.

It runs for ``--seconds`` (default: until Ctrl-C), printing progress; then every agent stops
cleanly and a summary is printed (``--json``: a JSON document). Roll a release out meanwhile
with ``edgeops devices deploy`` or ``edgeops rollout``; the hub (``edgeops hub serve``) must
run its bridge and fetch server for the devices to report and download.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgeops.errors import ConfigError

__all__ = ["fleet_app"]

fleet_app = typer.Typer(
    help="Fleet tools: a simulator of real device agents.", no_args_is_help=True
)

err = Console(stderr=True)
out = Console()
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
PROGRESS_EVERY_S = 2.0


def _broker_urls(mqtt_url: str | None) -> tuple[str, bool]:
    """The broker's URL without credentials, and whether the hub logs in with some."""
    from device_agent.link import MqttEndpoint

    endpoint = MqttEndpoint.parse(mqtt_url or DEFAULT_BROKER_URL)
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    scheme = "mqtts" if endpoint.tls else "mqtt"
    return f"{scheme}://{host}:{endpoint.port}", bool(endpoint.username and endpoint.password)


def _first_release(repository: Any) -> str:
    targets = sorted(target.path for target in repository.targets())
    if not targets:
        raise ConfigError("nothing is released yet; `edgeops release MODEL` publishes a release")
    return str(targets[0])


def _enroll(identities: Any, ids: list[str], broker_url: str) -> dict[str, str]:
    from edgeops.errors import NotFoundError
    from edgeops.fleet.simulator import enroll_fleet

    for device_id in ids:
        try:
            view = identities.get_identity(device_id)
        except NotFoundError:
            continue
        if view.identity == "active":
            identities.revoke(device_id)
    return enroll_fleet(identities, ids, broker_url, {"simulated": "true"})


def _progress(snapshot: Any, elapsed: float) -> str:
    summary = snapshot.summary()
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary["update_states"].items()))
    return (
        f"{elapsed:5.0f} s  {summary['running']}/{summary['devices']} running  {states}  "
        f"crashes {summary['crashes']}  samples {summary['samples']:,}"
    )


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table("fault", "update states", title=f"Fleet of {summary['devices']} devices")
    for fault, states in summary["by_fault"].items():
        table.add_row(fault, ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    return table


@fleet_app.command("simulate")
def simulate(
    devices: Annotated[int, typer.Option("--devices", min=1, help="how many devices")],
    processes: Annotated[
        int | None, typer.Option(min=1, help="worker processes (default: CPU count)")
    ] = None,
    hardware_mix: Annotated[
        str | None,
        typer.Option(help="hardware tags by share, e.g. arch=x86_64:0.8,arch=armv7l:0.2"),
    ] = None,
    fail_install: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share whose install fails")
    ] = 0.0,
    crash_after_activation: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="share that crashes running the new model"),
    ] = 0.0,
    degrade_accuracy: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="share whose inputs shift under the new model"),
    ] = 0.0,
    seconds: Annotated[
        float | None, typer.Option(min=0.0, help="run this long (default: until Ctrl-C)")
    ] = None,
    release: Annotated[
        str | None,
        typer.Option(help="the release the devices ship with (default: the first released)"),
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option(
            help="NPZ with x, y for the synthetic source (default: the model's "
            "dataset, test split)",
            dir_okay=False,
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="device id prefix")] = "sim",
    rate_hz: Annotated[float, typer.Option(min=0.01, help="samples/s per device")] = 2.0,
    seed: Annotated[int, typer.Option(help="seed of the hardware and fault assignment")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Run N real device agents (own MQTT connections, credentials, state) with faults."""
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import print_json, settings
    from edgeops.fleet.deploy import resolve_release
    from edgeops.fleet.simulator import (
        CRASH_AFTER_ACTIVATION,
        DEGRADE_ACCURACY,
        FAIL_INSTALL,
        FleetSimulator,
        SimSetup,
        make_devices,
        parse_hardware_mix,
        release_bundle,
        samples_for,
    )
    from edgeops.trust import repository_for

    current = settings()
    mix = parse_hardware_mix(hardware_mix)
    faults = {
        FAIL_INSTALL: fail_install,
        CRASH_AFTER_ACTIVATION: crash_after_activation,
        DEGRADE_ACCURACY: degrade_accuracy,
    }
    repository = repository_for(current)
    target = resolve_release(repository, release).path if release else _first_release(repository)
    work = current.data_dir / "simulator"
    champion = release_bundle(repository, target, work / "champion")
    broker_url, secured = _broker_urls(current.mqtt_url)
    width = max(4, len(str(devices)))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(1, devices + 1)]
    with open_hub() as hub:
        if samples is None:
            samples = samples_for(hub.datasets(), champion, work / "samples.npz")
        urls = {device_id: broker_url for device_id in ids}
        if secured:
            from edgeops.broker.auth import BrokerAuthFiles, reload_broker
            from edgeops.fleet import IdentityService
            from edgeops.fleet.identity import hub_credentials

            hub_user, hub_password = hub_credentials(current.mqtt_url)
            identities = IdentityService(hub.database, hub_user=hub_user)
            urls = _enroll(identities, ids, broker_url)
            identities.sync_broker_files(BrokerAuthFiles(*current.broker_files), hub_password)
            if current.broker_pid_file is not None:
                reload_broker(current.broker_pid_file)
            elif not as_json:
                err.print("enrolled; reload the broker so it knows the devices' passwords")
    fleet_devices = make_devices(
        devices, urls.__getitem__, prefix=prefix, hardware_mix=mix, faults=faults, seed=seed
    )
    setup = SimSetup(
        data_dir=work,
        trust_root=Path(repository.root_json_path),
        champion=champion,
        champion_target=target,
        samples=samples,
        rate_hz=rate_hz,
    )
    sim = FleetSimulator(setup, fleet_devices, processes=processes)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    interrupted = False
    try:
        if not as_json:
            err.print(
                f"starting {devices} devices in {sim.processes} processes on {broker_url} "
                f"({'own credentials' if secured else 'no credentials'}), release {target}"
            )
        sim.start()
        shown = 0.0
        while seconds is None or time.monotonic() - started < seconds:
            snapshot = sim.poll(0.5)
            elapsed = time.monotonic() - started
            if not as_json and elapsed - shown >= PROGRESS_EVERY_S:
                err.print(_progress(snapshot, elapsed))
                shown = elapsed
    except KeyboardInterrupt:
        interrupted = True
        if not as_json:
            err.print("stopping every agent ...")
    finally:
        final = sim.stop()
        signal.signal(signal.SIGTERM, previous)
    summary = final.summary()
    summary.update(
        release=target,
        seconds=round(time.monotonic() - started, 1),
        processes=sim.processes,
        interrupted=interrupted,
        faults={d.device_id: d.fault for d in fleet_devices if d.fault},
        left_running=sim.left_running,
    )
    if as_json:
        print_json(summary)
    else:
        out.print(_summary_table(summary))
        out.print(
            f"{summary['samples']:,} samples, {summary['windows']:,} telemetry windows, "
            f"{summary['crashes']} crashes; targets: "
            + ", ".join(f"{k} {v}" for k, v in summary["active_targets"].items())
        )
    if summary["errors"]:
        sys.exit(1)
