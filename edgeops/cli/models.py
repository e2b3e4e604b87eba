"""``edgeops models ...`` and ``edgeops runs ...``: the registry from the command line.

Thin: every command opens the configured database (migrating it if needed) and the artifact
store under the data dir, calls :class:`edgeops.registry.Registry`, and prints a table or,
with ``--json``, a JSON document.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.registry import ModelVersionView, Registry, RunView

models_app = typer.Typer(
    help="Model versions: list, show (with lineage and card), promote.", no_args_is_help=True
)
runs_app = typer.Typer(help="Recorded runs (training, compression ...).", no_args_is_help=True)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
_STAGE_STYLE = {"candidate": "cyan", "staging": "yellow", "production": "green", "archived": "dim"}


@contextmanager
def open_registry() -> Iterator[Registry]:
    """The registry of the current settings: database migrated, store under the data dir."""
    from edgeops.cli._hub import open_hub

    with open_hub() as hub:
        yield hub.registry()


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


# -- models -----------------------------------------------------------------------------------


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="only versions of this model name")] = None,
    stage: Annotated[
        str | None, typer.Option(help="only this stage: candidate, staging, production, archived")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List model versions by name and version number (JSON: without their cards)."""
    with open_registry() as registry:
        models = registry.list_models(name=name, stage=stage)
    if as_json:
        _print_json([_summary(model) for model in models])
        return
    if not models:
        out.print("no model versions registered yet")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "version", "stage", "format", "size", "metric"):
        table.add_column(column, overflow="fold", min_width=len(column))
    for model in models:
        table.add_row(
            model.id,
            model.ref,
            _stage(model.stage),
            model.format,
            _size(model.size_bytes),
            _headline_metric(model.metrics),
        )
    out.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="m-<id>, NAME (newest), NAME:SEQ or NAME@STAGE")],
    as_json: JsonOption = False,
) -> None:
    """Show one model version: lineage, configuration, metrics and model card."""
    with open_registry() as registry:
        model = registry.get_model(ref)
        chain = registry.lineage(model.id)
    if as_json:
        _print_json({**model.to_dict(), "lineage": [_summary(link) for link in chain]})
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("id", model.id)
    facts.add_row("version", model.ref)
    facts.add_row("stage", _stage(model.stage))
    facts.add_row("format", model.format)
    facts.add_row("artifact", f"sha256:{model.artifact_sha256} ({_size(model.size_bytes)})")
    facts.add_row("dataset version", model.dataset_version)
    facts.add_row("run", model.run_id)
    facts.add_row("code version", model.code_version)
    facts.add_row("created", model.created_at.isoformat(timespec="seconds"))
    facts.add_row("stage changed", model.updated_at.isoformat(timespec="seconds"))
    facts.add_row("lineage", " <- ".join(f"{link.id} ({link.ref})" for link in chain))
    out.print(facts)
    _print_document("config", model.config)
    _print_document("metrics", model.metrics)
    if model.card is None:
        out.print("\nno model card")
        return
    from rich.markdown import Markdown

    from device_agent.card import CardError, ModelCard

    try:
        markdown = ModelCard.from_dict(model.card).to_markdown()
    except CardError as exc:
        out.print(f"\nthe stored model card cannot be read: {exc}")
        return
    out.print()
    out.print(Markdown(markdown))


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="m-<id>, NAME (newest), NAME:SEQ or NAME@STAGE")],
    stage: Annotated[
        str,
        typer.Option(help="staging, production or archived (one step forward, or archived)"),
    ],
    as_json: JsonOption = False,
) -> None:
    """Move a model version to a stage; production archives the previous production version."""
    with open_registry() as registry:
        before = registry.get_model(ref)
        previous = [
            other.id
            for other in registry.list_models(name=before.name, stage="production")
            if other.id != before.id
        ]
        after = registry.promote(before.id, stage)
    archived = previous if after.stage == "production" else []
    if as_json:
        _print_json(
            {
                "model": _summary(after),
                "from_stage": before.stage,
                "to_stage": after.stage,
                "archived": archived,
            }
        )
        return
    out.print(f"{after.id} ({after.ref}): {before.stage} -> {_stage(after.stage)}")
    for model_id in archived:
        out.print(f"{model_id}: production -> {_stage('archived')}")


# -- runs -------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    kind: Annotated[str | None, typer.Option(help="only runs of this kind (train ...)")] = None,
    as_json: JsonOption = False,
) -> None:
    """List recorded runs, oldest first (JSON: without their log lines)."""
    with open_registry() as registry:
        runs = registry.list_runs(kind=kind)
    if as_json:
        _print_json([{k: v for k, v in run.to_dict().items() if k != "logs"} for run in runs])
        return
    if not runs:
        out.print("no runs recorded yet")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "kind", "status", "started", "duration"):
        table.add_column(column, no_wrap=True)
    table.add_column("result")
    for run in runs:
        table.add_row(
            run.id,
            run.kind,
            _status(run.status),
            run.started_at.strftime("%m-%d %H:%M"),
            _duration(run.duration_s),
            run.error or ", ".join(run.model_ids),
        )
    out.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="the run id, r-<12 hex>")],
    as_json: JsonOption = False,
) -> None:
    """Show one run: parameters, metrics, status, duration, log and the models it made."""
    with open_registry() as registry:
        run = registry.get_run(run_id)
    if as_json:
        _print_json(run.to_dict())
        return
    _print_run(run)


def _print_run(run: RunView) -> None:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("id", run.id)
    facts.add_row("kind", run.kind)
    facts.add_row("status", _status(run.status))
    facts.add_row("started", run.started_at.isoformat(timespec="seconds"))
    facts.add_row("ended", run.ended_at.isoformat(timespec="seconds") if run.ended_at else "")
    facts.add_row("duration", _duration(run.duration_s))
    facts.add_row("code version", run.code_version)
    facts.add_row("models", ", ".join(run.model_ids) or "(none)")
    if run.error:
        facts.add_row("error", run.error)
    out.print(facts)
    _print_document("params", run.params)
    _print_document("metrics", run.metrics)
    if run.logs:
        out.print("\n[bold]log[/bold]")
        for line in run.logs:
            out.print(line, markup=False, highlight=False)


# -- formatting -------------------------------------------------------------------------------


def _summary(model: ModelVersionView) -> dict[str, Any]:
    """A model version as JSON, without its card (``has_card`` says if it has one)."""
    document = model.to_dict()
    document["has_card"] = document.pop("card") is not None
    return document


def _print_document(title: str, document: dict[str, Any]) -> None:
    if not document:
        return
    table = Table(title, "value", title_justify="left")
    for key, value in _flatten(document):
        table.add_row(key, value)
    out.print(table)


def _flatten(document: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key in sorted(document):
        value = document[key]
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            rows.append((f"{prefix}{key}", f"{value:.6g}"))
        else:
            rows.append((f"{prefix}{key}", str(value)))
    return rows


def _headline_metric(metrics: dict[str, Any]) -> str:
    for key in ("accuracy", "auc", "int8_accuracy", "float_accuracy"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{key} {value:.4g}"
    return ""


def _stage(stage: str) -> str:
    style = _STAGE_STYLE.get(stage)
    return f"[{style}]{stage}[/{style}]" if style else stage


def _status(status: str) -> str:
    style = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.2f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s"
