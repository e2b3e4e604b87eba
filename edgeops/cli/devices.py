"""``edgeops devices ...``: enroll, list, show and revoke device identities; deploy a release
to devices and show their twins.

Thin: every command opens the configured database (migrating it if needed), calls
:class:`edgeops.fleet.IdentityService` or :class:`edgeops.fleet.FleetService`, and prints a
table or, with ``--json``, a JSON document. Enrollment and revocation change the database
only; ``edgeops broker acl sync`` then writes the broker's password and ACL files from it.
``deploy`` sets the devices' desired release and publishes it (:mod:`edgeops.fleet.deploy`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeops.cli._hub import CONNECT_TIMEOUT_S, ConnectTimeoutOption
from edgeops.cli.trust import Runtime
from edgeops.errors import ConfigError

if TYPE_CHECKING:
    from edgeops.fleet import IdentityService, IdentityView

devices_app = typer.Typer(
    help="Devices: enroll (broker credentials), list, show, revoke; deploy a release, twin.",
    no_args_is_help=True,
)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
_IDENTITY_STYLE = {"active": "green", "revoked": "red", "none": "dim"}


@contextmanager
def open_identities() -> Iterator[IdentityService]:
    """The identity service on the current settings' database (migrated if behind)."""
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.fleet import IdentityService

    current = settings()
    endpoint = current.mqtt_endpoint
    hub_user = endpoint.username if endpoint is not None and endpoint.username else None
    with open_hub() as hub:
        if hub_user is None:
            yield IdentityService(hub.database)
        else:
            yield IdentityService(hub.database, hub_user=hub_user)


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


def _tags(value: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` parsed, or a usage error naming the bad tag."""
    if value is None:
        return {}
    from edgeops.fleet.identity import parse_tags

    try:
        return parse_tags(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--tags'") from None


def _device_name(value: str) -> str:
    """Typer callback: a valid, unreserved device id, or a usage error saying why."""
    from device_agent.protocol import validate_device_id
    from edgeops.errors import ProtocolError
    from edgeops.fleet.identity import is_reserved_name

    try:
        validate_device_id(value)
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc)) from None
    if is_reserved_name(value):
        raise typer.BadParameter(f"device id {value!r} is reserved for the hub's own identity")
    return value


def _broker_url(value: str | None) -> str | None:
    if value is None:
        return None
    from device_agent.link import MqttEndpoint

    try:
        endpoint = MqttEndpoint.parse(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if endpoint.username or endpoint.password:
        raise typer.BadParameter("give the broker's address without user or password")
    return value


NameArgument = Annotated[
    str, typer.Argument(help="device id: 1-63 letters, digits, _ . -", callback=_device_name)
]


@devices_app.command("enroll")
def devices_enroll(
    name: NameArgument,
    tags: Annotated[
        str | None,
        typer.Option(help="the device's tags, key=value,key=value"),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            help="the broker as the device reaches it, e.g. mqtts://broker.example:8883 "
            "(default: the hub's EDGEOPS_MQTT_URL without its credentials)",
            callback=_broker_url,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Enroll a device: its row with tags and its own MQTT credentials (password shown once)."""
    tag_values = _tags(tags)
    with open_identities() as identities:
        enrollment = identities.enroll(name, tag_values)
    url = broker_url or _hub_broker_url()
    if as_json:
        _print_json(enrollment.to_dict(url))
        return
    device = enrollment.device
    shown_tags = ", ".join(f"{k}={v}" for k, v in sorted(device.tags.items())) or "none"
    agent_url = enrollment.agent_url(url)
    lines = [
        f"enrolled device {device.device_id} (tags: {shown_tags})",
        "",
        f"MQTT user:     {device.device_id}",
        f"MQTT password: {enrollment.password}",
        "The password is shown only now: the hub keeps nothing but a salted hash of it.",
        "",
        "Agent configuration (agent.toml; or EDGEOPS_AGENT_DEVICE_ID / EDGEOPS_AGENT_MQTT_URL):",
        f'  device_id = "{device.device_id}"',
        f'  mqtt_url = "{agent_url}"',
    ]
    if agent_url.startswith("mqtts://"):
        lines.append('  mqtt_ca_file = "<the CA certificate that signed the broker\'s>"')
    lines += [
        "",
        "Next: `edgeops broker acl sync` writes the broker's password and ACL files; the device",
        "can connect once Mosquitto has reloaded them.",
    ]
    typer.echo("\n".join(lines))


@devices_app.command("list")
def devices_list(as_json: JsonOption = False) -> None:
    """List every known device with its identity (active, revoked or none) and tags."""
    with open_identities() as identities:
        devices = identities.list_identities()
    if as_json:
        _print_json([device.to_dict() for device in devices])
        return
    if not devices:
        out.print("no devices yet (`edgeops devices enroll NAME` adds one)")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("device", "identity", "tags", "online", "enrolled"):
        table.add_column(column, overflow="fold", min_width=len(column))
    for device in devices:
        table.add_row(
            Text(device.device_id),
            _identity(device),
            Text(", ".join(f"{k}={v}" for k, v in sorted(device.tags.items()))),
            "yes" if device.online else "no",
            _when(device.enrolled_at),
        )
    out.print(table)


@devices_app.command("show")
def devices_show(
    name: Annotated[str, typer.Argument(help="device id")],
    as_json: JsonOption = False,
) -> None:
    """Show one device: identity, tags, what it last reported, and how its last update and
    last conformance test on an attached board ended (and why)."""
    with open_identities() as identities:
        device = identities.get_identity(name)
    update, conformance = _last_update_events(name)
    if as_json:
        _print_json({**device.to_dict(), "last_update": update, "last_conformance": conformance})
        return
    table = Table(box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("device", Text(device.device_id)),
        ("identity", _identity(device)),
        ("enrolled", _when(device.enrolled_at)),
        ("revoked", _when(device.revoked_at)),
        ("tags", Text(", ".join(f"{k}={v}" for k, v in sorted(device.tags.items())))),
        ("online", "yes" if device.online else "no"),
        ("last seen", _when(device.last_seen)),
        ("agent version", Text(device.agent_version or "")),
        ("hardware", Text(", ".join(f"{k}={v}" for k, v in sorted(device.hardware.items())))),
        ("update state", Text(device.update_state or "")),
    ]
    if update is not None:
        rows.append(("last update", Text(_update_text(update))))
    if conformance is not None:
        rows.append(("conformance", Text(_conformance_text(conformance))))
    for field_name, value in rows:
        table.add_row(field_name, value)
    out.print(table)


def _last_update_events(device_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The detail of the device's last ``update`` event (with its ``ts``) and of its last
    ``conformance`` event, None where it sent none."""
    from edgeops.cli._hub import open_hub
    from edgeops.fleet import FleetService

    found: list[dict[str, Any] | None] = []
    with open_hub() as hub:
        fleet = FleetService(hub.database)
        for kind in ("update", "conformance"):
            last = fleet.last_event(device_id, kind)
            found.append({**last.detail, "ts": last.ts} if last is not None else None)
    return found[0], found[1]


def _update_text(update: dict[str, Any]) -> str:
    text = f"{update.get('state')} {update.get('target') or ''}".strip()
    reason = update.get("reason")
    return f"{text}: {reason}" if reason else text


def _conformance_text(detail: dict[str, Any]) -> str:
    vectors, failed = detail.get("vectors"), detail.get("failed") or []
    where = f"{detail.get('model_id')} on {detail.get('board')} ({detail.get('target')})"
    if detail.get("passed"):
        text = f"passed: {vectors} test vectors, {where}"
    else:
        text = f"FAILED: {len(failed)} of {vectors} test vectors differ, {where}"
    figures = [
        f"{label} {detail[key]}{unit}"
        for label, key, unit in (
            ("latency mean", "latency_ms_mean", " ms"),
            ("max", "latency_ms_max", " ms"),
            ("cycles mean", "mean_cycles", ""),
            ("max error", "max_error", ""),
        )
        if detail.get(key) is not None
    ]
    text += "; " + ", ".join(figures) if figures else ""
    reason = detail.get("reason")
    return f"{text}; {reason}" if reason else text


@devices_app.command("revoke")
def devices_revoke(
    name: Annotated[str, typer.Argument(help="device id")],
    as_json: JsonOption = False,
) -> None:
    """Revoke a device's identity; `edgeops broker acl sync` then locks it out of the broker."""
    with open_identities() as identities:
        device, changed = identities.revoke(name)
    if as_json:
        _print_json({**device.to_dict(), "changed": changed})
        return
    if changed:
        typer.echo(
            f"revoked device {device.device_id}; `edgeops broker acl sync` and a broker reload "
            "disconnect it and refuse it from then on"
        )
    else:
        when = device.revoked_at.isoformat() if device.revoked_at else "earlier"
        typer.echo(f"device {device.device_id} was already revoked ({when})")


# -- the desired twin ----------------------------------------------------------------------


def _device_names(values: list[str]) -> list[str]:
    """Typer callback: every ``--device`` a valid device id."""
    return [_device_name(value) for value in values]


@devices_app.command("deploy")
def devices_deploy(
    release: Annotated[
        str,
        typer.Argument(
            metavar="TARGET_OR_MODEL",
            help="a released target path (NAME/SEQ/RUNTIME/model.tflite), or a model version "
            "(NAME: its newest released version, NAME:SEQ, m-<id>, NAME@STAGE)",
        ),
    ],
    device: Annotated[
        list[str],
        typer.Option(
            "--device",
            "-d",
            metavar="ID",
            help="a device to point at the release (repeat for several)",
            callback=_device_names,
        ),
    ],
    runtime: Annotated[
        Runtime | None,
        typer.Option(help="choose among a model version's targets: litert, onnx or mcu"),
    ] = None,
    connect_timeout: ConnectTimeoutOption = CONNECT_TIMEOUT_S,
    as_json: JsonOption = False,
) -> None:
    """Point devices at a signed release: set desired.release and publish it (retained).

    Everything is checked first (the release is in the release repository, every device is
    known, the broker answers within --connect-timeout); then the devices' desired state is
    set in one transaction and published. Needs EDGEOPS_MQTT_URL (the hub's broker identity).
    """
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.errors import BrokerError
    from edgeops.fleet import FleetService
    from edgeops.fleet.deploy import apply_deploy, plan_deploy
    from edgeops.hub.desired import DesiredPublisher
    from edgeops.trust import repository_for

    current = settings()
    endpoint = current.mqtt_endpoint
    if endpoint is None:
        raise ConfigError(
            "no broker configured: set EDGEOPS_MQTT_URL (or mqtt_url in edgeops.toml) to the "
            "hub's broker URL, e.g. mqtt://edgeops-hub:<password>@127.0.0.1:1883; "
            "nothing was deployed"
        )
    repository = repository_for(current)
    repository.root()  # TrustNotInitialisedError before anything else
    with open_hub() as hub:
        fleet = FleetService(hub.database)
        plan = plan_deploy(
            fleet,
            repository,
            release,
            device,
            runtime=runtime.value if runtime is not None else None,
            registry=hub.registry() if "@" in release else None,
        )
        publisher = DesiredPublisher(
            endpoint, client_id=current.mqtt_client_id, tls=current.tls_files
        )
        try:
            publisher.start(wait_s=connect_timeout)
        except BrokerError as exc:
            raise BrokerError(f"{exc}; nothing was deployed") from None
        try:
            result = apply_deploy(fleet, publisher, plan)
        finally:
            publisher.stop()
    if result.unacknowledged:
        raise BrokerError(
            f"desired release {result.release.path} stored for {len(result.devices)} device(s), "
            "but the broker did not acknowledge it for "
            + ", ".join(result.unacknowledged)
            + "; run the same deploy again to publish it"
        )
    if as_json:
        _print_json(result.to_dict())
        return
    changed = set(result.changed)
    typer.echo(f"deployed {result.release.path} ({result.release.model_id or 'no model id'})")
    for view in result.devices:
        what = "desired state" if view.device_id in changed else "unchanged, re-published"
        typer.echo(f"  {view.device_id}: {what} version {view.desired_version}")
    typer.echo("`edgeops devices twin ID` shows when a device runs it.")


@devices_app.command("twin")
def devices_twin(
    name: Annotated[str, typer.Argument(help="device id")],
    as_json: JsonOption = False,
) -> None:
    """Show a device's twin: what the hub wants, what the device reports, where they differ."""
    from edgeops.cli._hub import open_hub
    from edgeops.fleet import FleetService
    from edgeops.fleet.desired import active_release, reported_challenger

    with open_hub() as hub:
        twin = FleetService(hub.database).twin(name)
    if as_json:
        _print_json(twin.to_dict())
        return
    release = twin.desired.get("release")
    challenger = twin.desired.get("challenger")
    target, model_id = active_release(twin.reported)
    running = reported_challenger(twin.reported)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("", "desired", "reported"):
        table.add_column(column, overflow="fold")
    table.add_row(
        "release",
        Text(_release_text(release)),
        Text(f"{target or '-'}" + (f" ({model_id})" if model_id else "")),
    )
    table.add_row(
        "challenger",
        Text(str(challenger.get("model_id")) if isinstance(challenger, dict) else "-"),
        Text(running or "-"),
    )
    config = twin.desired.get("config")
    table.add_row("config", Text(json.dumps(config, sort_keys=True) if config else "-"), "")
    table.add_row("update state", "", Text(twin.update_state or "-"))
    table.add_row(
        "version",
        Text(f"{twin.desired_version} ({_when(twin.desired_at)})" if twin.desired_at else "0"),
        Text(f"ts {twin.reported_ts}" if twin.reported_ts is not None else "never reported"),
    )
    table.add_row("online", "", "yes" if twin.online else "no")
    out.print(Text(f"device {twin.device_id}", style="bold"))
    out.print(table)
    if twin.in_sync:
        out.print(Text("in sync: the device runs what the hub wants", style="green"))
        return
    out.print(Text("differences:", style="yellow"))
    for difference in twin.differences:
        out.print(
            Text(
                f"  {difference.field}: desired {difference.desired or '-'}, reported "
                f"{difference.reported or '-'} ({difference.note})"
            ),
            soft_wrap=True,
        )


def _release_text(release: Any) -> str:
    if not isinstance(release, dict):
        return "-"
    model_id = release.get("model_id")
    return f"{release.get('target')}" + (f" ({model_id})" if model_id else "")


def _hub_broker_url() -> str:
    from edgeops.cli.main import settings

    endpoint = settings().mqtt_endpoint
    if endpoint is None:
        return DEFAULT_BROKER_URL
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{'mqtts' if endpoint.tls else 'mqtt'}://{host}:{endpoint.port}"


def _identity(device: IdentityView) -> Text:
    return Text(device.identity, style=_IDENTITY_STYLE.get(device.identity, ""))


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""
