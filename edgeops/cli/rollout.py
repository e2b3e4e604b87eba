"""``edgeops rollout ...``: check a rollout spec and show the plan it makes.

    edgeops rollout validate SPEC [--document-only] [--json]
    edgeops rollout plan SPEC [--json]

Thin: the spec is read with :func:`edgeops.rollout.load_spec` (``.json`` is JSON, anything
else YAML); unless ``--document-only``, the release's contract is read from the release
repository (``<data dir>/trust``) and the devices from the database, and
:func:`edgeops.rollout.plan_rollout` does the rest. An invalid spec (a field out of range, an
unknown tag key, an unknown release, an empty target set) is one error line naming the field,
exit code 2, as for every configuration error (see ``edgeops.cli.main``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.rollout import RolloutPlan, RolloutSpec

__all__ = ["rollout_app"]

rollout_app = typer.Typer(
    help="Staged rollouts: validate a rollout spec, show its plan.", no_args_is_help=True
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
    from edgeops.trust import repository_for

    custom = release_contract(repository_for(settings()), spec.release)
    with open_hub() as hub:
        devices = FleetService(hub.database).list_devices()
    return plan_rollout(spec, devices, custom)


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
    out.print(f"rollout spec {spec_file} is valid: {spec.name} -> {spec.release}", highlight=False)
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
