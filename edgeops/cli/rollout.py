"""``edgeops rollout ...``: check a rollout spec, show its plan, and run it live.

    edgeops rollout validate SPEC [--document-only] [--json]
    edgeops rollout plan SPEC [--json]
    edgeops rollout create SPEC [--json]           # plan and store it; prints the id
    edgeops rollout list [--json]
    edgeops rollout status ID [--json] [--watch]   # waves, counts, gates; a live view
    edgeops rollout pause ID / resume ID
    edgeops rollout abort ID [--reason TEXT]       # targeted devices get their release back
    edgeops rollout run ID [--interval S]          # tick in the foreground until it ends

The hub (``edgeops hub serve``) ticks every running rollout each second; ``run`` does the
same in the foreground for one rollout (scripts, tests, a hub-less setup). Commands that
change desired state (``abort`` with targeted devices, ``run``) need the broker
(EDGEOPS_MQTT_URL) to publish it.

Thin: the spec is read with :func:`edgeops.rollout.load_spec` (``.json`` is JSON, anything
else YAML); unless ``--document-only``, the release's contract is read from the release
repository (``<data dir>/trust``) and the devices from the database, and
:func:`edgeops.rollout.plan_rollout` does the rest. An invalid spec (a field out of range, an
unknown tag key, an unknown release, an empty target set) is one error line naming the field,
exit code 2, as for every configuration error (see ``edgeops.cli.main``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from edgeops.errors import ConfigError, EdgeOpsError

if TYPE_CHECKING:
    from edgeops.rollout import RolloutPlan, RolloutSpec
    from edgeops.rollout.engine import RolloutEngine

__all__ = ["rollout_app"]

rollout_app = typer.Typer(
    help="Staged rollouts: validate a spec, show its plan, create, follow, pause, resume, "
    "abort and run rollouts.",
    no_args_is_help=True,
)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
SpecArgument = Annotated[
    Path, typer.Argument(help="the rollout spec, YAML or JSON (.json)", dir_okay=False)
]
_SHOWN_IDS = 8


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


def _plan(spec: RolloutSpec) -> RolloutPlan:
    """The plan of ``spec`` on the configured release repository and fleet."""
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.fleet import FleetService
    from edgeops.rollout import plan_rollout, release_contract
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.trust import repository_for

    custom = release_contract(repository_for(settings()), spec.release)
    with open_hub() as hub:
        devices = FleetService(hub.database).list_devices()
        busy = RolloutEngine(hub.database, None).busy_devices()
    return plan_rollout(spec, devices, custom, busy)


def _ids(ids: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(ids[:_SHOWN_IDS])
    return shown + (f" ... (+{len(ids) - _SHOWN_IDS})" if len(ids) > _SHOWN_IDS else "")


@rollout_app.command("validate")
def rollout_validate(
    spec_file: SpecArgument,
    document_only: Annotated[
        bool,
        typer.Option(
            "--document-only",
            help="check the document alone, not the release repository and the fleet",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check a rollout spec: every field and threshold, and (unless --document-only) that
    the release exists, every tag key is known and the selection matches devices."""
    from edgeops.rollout import load_spec

    spec = load_spec(spec_file)
    plan = None if document_only else _plan(spec)
    if as_json:
        document: dict[str, Any] = {"valid": True, "spec": spec.to_dict()}
        if plan is not None:
            document["counts"] = plan.to_dict()["counts"]
        _print_json(document)
        return
    out.print(
        f"rollout spec {spec_file} is valid: {spec.name} -> {spec.release}",
        highlight=False,
        soft_wrap=True,
    )
    if plan is not None:
        out.print(
            f"{len(plan.selected)} selected, {len(plan.compatible)} compatible, "
            f"{len(plan.excluded)} excluded, {len(plan.waves)} waves",
            highlight=False,
        )
        if not plan.compatible:
            typer.echo("warning: the release fits none of the selected devices", err=True)


@rollout_app.command("plan")
def rollout_plan(spec_file: SpecArgument, as_json: JsonOption = False) -> None:
    """Show the plan of a rollout: the selected devices, those excluded by the release's
    compatibility contract (and why), and the waves."""
    from edgeops.rollout import load_spec

    spec = load_spec(spec_file)
    plan = _plan(spec)
    if as_json:
        _print_json(plan.to_dict())
        return
    counts = plan.to_dict()["counts"]
    out.print(f"rollout {spec.name}: {spec.release}", highlight=False)
    out.print(
        f"selected {counts['selected']}: {_ids(plan.selected)}",
        highlight=False,
    )
    out.print(
        f"compatible {counts['compatible']}, excluded {counts['excluded']}; "
        f"{counts['waves']} waves over {counts['minutes']} minute(s) of notifications, "
        f"plus a {spec.gates.soak_seconds} s soak after each wave",
        highlight=False,
    )
    if plan.excluded:
        table = Table(title="excluded", box=box.SIMPLE_HEAD)
        for column in ("device", "kind", "why"):
            table.add_column(column, overflow="fold")
        for device in plan.excluded:
            table.add_row(device.device_id, device.kind, device.reason)
        out.print(table)
    notes = [device for device in plan.compatible if device.notes]
    if notes:
        out.print(
            f"{len(notes)} compatible device(s) with notes, e.g. {notes[0].device_id}: "
            f"{notes[0].notes[0]}",
            highlight=False,
        )
    if plan.waves:
        table = Table(title="waves", box=box.SIMPLE_HEAD)
        for column in ("wave", "kind", "rate/min", "minutes", "devices", "first devices"):
            table.add_column(column, overflow="fold")
        for wave in plan.waves:
            first, last = wave.start_minute, wave.start_minute + len(wave.minutes) - 1
            table.add_row(
                str(wave.index),
                wave.kind,
                "-" if wave.rate_per_minute is None else str(wave.rate_per_minute),
                str(first) if first == last else f"{first}-{last}",
                str(wave.size),
                _ids(wave.devices[:3]) + (" ..." if wave.size > 3 else ""),
            )
        out.print(table)
    else:
        out.print("no waves: the release fits none of the selected devices")


# -- the live engine --------------------------------------------------------------------------

IdArgument = Annotated[str, typer.Argument(metavar="ID", help="the rollout's id (r-...)")]
_STATUS_STYLE = {
    "running": "cyan",
    "paused": "yellow",
    "aborted": "red",
    "failed": "red",
    "succeeded": "green",
}


@contextmanager
def _engine(*, publish: bool = False) -> Iterator[RolloutEngine]:
    """A rollout engine on the configured database and release repository; with a connected
    desired-state publisher if ``publish`` (ConfigError if no broker is configured)."""
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.hub.desired import DesiredPublisher
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.trust import repository_for

    current = settings()
    publisher = None
    if publish:
        endpoint = current.mqtt_endpoint
        if endpoint is None:
            raise ConfigError(
                "no broker configured: set EDGEOPS_MQTT_URL (the hub's broker identity) to "
                "publish desired state"
            )
        publisher = DesiredPublisher(
            endpoint, client_id=current.mqtt_client_id, tls=current.tls_files
        )
        publisher.start()
    try:
        with open_hub() as hub:
            yield RolloutEngine(hub.database, publisher, repository=repository_for(current))
    finally:
        if publisher is not None:
            publisher.stop()


@rollout_app.command("create")
def rollout_create(spec_file: SpecArgument, as_json: JsonOption = False) -> None:
    """Plan a rollout on the fleet now and store it, running; prints its id. The hub
    (`edgeops hub serve`) or `edgeops rollout run ID` carries it out."""
    from edgeops.rollout import load_spec

    spec = load_spec(spec_file)
    with _engine() as engine:
        rollout_id = engine.create(spec)
        document = engine.status(rollout_id)
    if as_json:
        _print_json(document)
        return
    counts = document["counts"]
    typer.echo(rollout_id)
    typer.echo(
        f"rollout {spec.name}: {spec.release} to {counts['pending']} device(s) in "
        f"{len(document['waves'])} wave(s), {counts['excluded']} excluded",
        err=True,
    )


@rollout_app.command("list")
def rollout_list(as_json: JsonOption = False) -> None:
    """Every rollout, newest first."""
    with _engine() as engine:
        rollouts = engine.list_rollouts()
    if as_json:
        _print_json(rollouts)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "name", "release", "status", "wave", "created"):
        table.add_column(column, overflow="fold")
    for r in rollouts:
        table.add_row(
            r["id"],
            r["name"],
            r["release"],
            r["status"],
            f"{r['current_wave']}/{r['waves']}",
            r["created_at"][:19],
        )
    out.print(table)


def _gate_text(gate: dict[str, Any]) -> str:
    value = "-" if gate["value"] is None else f"{gate['value']:.4g}"
    mark = "ok" if gate["passed"] else "FAIL"
    return f"{gate['name']} {value} {gate['comparison']} {gate['threshold']:g} {mark}"


def status_view(document: dict[str, Any]) -> Group:
    """The Rich renderable of a rollout's status document."""
    style = _STATUS_STYLE.get(document["status"], "")
    counts = document["counts"]
    header = Text.assemble(
        (f"rollout {document['id']} ", "bold"),
        f"{document['name']}: {document['release']['target']}  ",
        (document["status"], f"bold {style}"),
    )
    summary = Text(
        "  ".join(f"{name} {count}" for name, count in counts.items() if count),
    )
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("wave", "kind", "size", "state", "devices", "gates"):
        table.add_column(column, overflow="fold")
    for wave in document["waves"]:
        gates = wave["gates"]
        gate_text = "\n".join(_gate_text(g) for g in gates) if gates else "-"
        if wave["state"] == "soaking" and wave["soak_until"]:
            gate_text = f"soak until {wave['soak_until'][11:19]}\n" + gate_text
        table.add_row(
            str(wave["index"]),
            wave["kind"],
            str(wave["size"]),
            wave["state"],
            ", ".join(f"{k} {v}" for k, v in wave["counts"].items()) or "-",
            gate_text,
        )
    parts: list[Any] = [header, summary, table]
    if document["reason"]:
        parts.append(Text(f"reason: {document['reason']}", style=style))
    return Group(*parts)


@rollout_app.command("status")
def rollout_status(
    rollout_id: IdArgument,
    as_json: JsonOption = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="a live view, refreshed until the rollout ends")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between refreshes with --watch")
    ] = 1.0,
) -> None:
    """A rollout's waves, device counts and quality gates (measured value vs threshold)."""
    with _engine() as engine:
        document = engine.status(rollout_id)
        if as_json:
            _print_json(document)
            return
        if not watch:
            out.print(status_view(document))
            return
        from rich.live import Live

        with Live(status_view(document), console=out, refresh_per_second=4) as live:
            while document["status"] in ("running", "paused"):
                time.sleep(interval)
                document = engine.status(rollout_id)
                live.update(status_view(document))


@rollout_app.command("pause")
def rollout_pause(rollout_id: IdArgument) -> None:
    """Hold a running rollout where it stands (no new devices, no decisions)."""
    with _engine() as engine:
        engine.pause(rollout_id)
    typer.echo(f"rollout {rollout_id} paused")


@rollout_app.command("resume")
def rollout_resume(rollout_id: IdArgument) -> None:
    """Carry a paused rollout on; its timeouts and soak move on by the pause's length."""
    with _engine() as engine:
        engine.resume(rollout_id)
    typer.echo(f"rollout {rollout_id} resumed")


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: IdArgument,
    reason: Annotated[str, typer.Option(help="why, kept with the rollout")] = (
        "aborted by the operator"
    ),
) -> None:
    """Abort a rollout: every device it targeted gets its previous desired release back
    (published: needs EDGEOPS_MQTT_URL when devices were targeted)."""
    with _engine() as engine:
        touched = engine.status(rollout_id)["counts"]
    needs_broker = any(touched[s] for s in ("targeted", "succeeded", "failed", "timed_out"))
    with _engine(publish=needs_broker) as engine:
        rolled_back = engine.abort(rollout_id, reason)
    typer.echo(f"rollout {rollout_id} aborted; {rolled_back} device(s) set back")


@rollout_app.command("run")
def rollout_run(
    rollout_id: IdArgument,
    interval: Annotated[float, typer.Option(min=0.05, help="seconds between ticks")] = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Tick one rollout in the foreground until it ends; exit 0 if it succeeded, 1 if not.
    Needs EDGEOPS_MQTT_URL (desired state is published)."""
    with _engine(publish=True) as engine:
        engine.status(rollout_id)  # NotFoundError before anything else
        while engine.advance(rollout_id) or engine.status(rollout_id)["status"] == "paused":
            time.sleep(interval)
        document = engine.status(rollout_id)
    if as_json:
        _print_json(document)
    else:
        out.print(status_view(document))
    if document["status"] != "succeeded":
        raise EdgeOpsError(
            f"rollout {rollout_id} {document['status']}: {document['reason'] or 'no reason'}"
        )
