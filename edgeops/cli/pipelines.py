"""``edgeops pipelines ...``: persisted pipeline runs, and the continuous-training pipeline.

    edgeops pipelines run ct --model NAME [--labels FILE --label-column COL] [--margin M]
                             [--epochs N] [--canary N] [--soak S] [--no-rollout]
                             [--promote-wait S] [--json]
    edgeops pipelines list [--pipeline ct] [--limit N] [--json]
    edgeops pipelines show RUN_ID [--json]      # steps: status, attempts, durations, in/out
    edgeops pipelines resume [--json]           # carry on runs whose process died
    edgeops pipelines cancel RUN_ID

Thin: opens the configured database (migrated), artifact store and release repository and
calls :class:`edgeops.pipelines.PipelineRunner` with :func:`edgeops.pipelines.ct.ct_pipeline`.
``run`` executes the run in the foreground; a run this process could not finish (killed,
machine down) is taken over by ``resume`` once its lease expired. A failed run prints its
steps, then one error line, exit code 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.pipelines import PipelineRunner, PipelineRunView

__all__ = ["pipelines_app"]

pipelines_app = typer.Typer(
    help="Persisted pipelines: run continuous training, list, show, resume and cancel runs.",
    no_args_is_help=True,
)
run_app = typer.Typer(help="Start a pipeline run and execute it here.", no_args_is_help=True)
pipelines_app.add_typer(run_app, name="run")

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


@contextmanager
def _runner(lease_s: float = 60.0) -> Iterator[PipelineRunner]:
    """A runner knowing the CT pipeline, over the configured stores and release repository."""
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.pipelines import PipelineRunner
    from edgeops.pipelines.ct import CTServices, ct_pipeline
    from edgeops.trust import repository_for

    repository = repository_for(settings())
    with open_hub() as hub:
        registry = hub.registry()
        services = CTServices(
            database=hub.database,
            store=hub.store,
            datasets=hub.datasets(),
            registry=registry,
            repository=repository,
        )
        yield PipelineRunner(
            hub.database, [ct_pipeline(services)], registry=registry, lease_s=lease_s
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _short(document: Any, limit: int = 90) -> str:
    import json

    if document is None:
        return "-"
    text = json.dumps(document, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_run(view: PipelineRunView, *, details: bool) -> None:
    out.print(
        f"pipeline run {view.id} ({view.pipeline}): {view.status}, {_seconds(view.duration_s)}",
        highlight=False,
    )
    if view.error:
        out.print(f"  error: {view.error}", highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("step", "status", "attempts", "duration", "outputs" if details else "error"):
        table.add_column(column, overflow="fold")
    for step in view.steps:
        attempts = str(step.attempts)
        if step.interruptions:
            attempts += f" ({step.interruptions} interrupted)"
        last = _short(step.outputs) if details else (step.error or "")
        table.add_row(step.name, step.status, attempts, _seconds(step.duration_s), last)
    out.print(table)
    if details:
        for step in view.steps:
            if step.inputs or step.error:
                out.print(f"[bold]{step.name}[/bold]")
            if step.inputs:
                out.print(f"  inputs: {_short(step.inputs, 400)}", highlight=False, soft_wrap=True)
            if step.error:
                out.print(f"  error: {step.error}", highlight=False, soft_wrap=True)


def _fail_if_failed(view: PipelineRunView) -> None:
    from edgeops.pipelines import PipelineError

    if view.status == "failed":
        raise PipelineError(f"pipeline run {view.id} failed: {view.error}")


@run_app.command("ct")
def run_ct(
    model: Annotated[str, typer.Option(help="model name; its production version is the champion")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="labelled CSV, Parquet or NPZ file of device samples (default: the simulated "
            "oracle, which knows the champion's dataset)",
            dir_okay=False,
        ),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="the label column of --labels (NPZ: the array, 'y')")
    ] = None,
    oracle_noise: Annotated[
        float, typer.Option(help="simulated oracle: fraction of wrong labels", min=0.0, max=0.99)
    ] = 0.0,
    margin: Annotated[
        float,
        typer.Option(help="the challenger must beat the champion by this much (0.01 = 1 pp)"),
    ] = 0.005,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs (default: the champion's)", min=1)
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="share of the new samples kept to evaluate on")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="seeds the split of the new samples")] = 0,
    max_windows: Annotated[
        int, typer.Option(help="newest telemetry windows to collect from", min=1)
    ] = 500,
    max_samples: Annotated[int, typer.Option(help="most raw samples to collect", min=1)] = 5000,
    min_samples: Annotated[
        int, typer.Option(help="fewest labelled samples to go on with", min=1)
    ] = 20,
    runtime: Annotated[
        str | None,
        typer.Option(help="release runtime: litert, onnx or mcu (default: from the profile)"),
    ] = None,
    hardware: Annotated[
        str | None, typer.Option(help="hardware tags of the release, KEY=V1|V2,...")
    ] = None,
    canary: Annotated[int, typer.Option(help="devices in the canary wave", min=1)] = 1,
    soak: Annotated[
        int, typer.Option("--soak", help="seconds each wave's gates are watched", min=0)
    ] = 300,
    no_rollout: Annotated[
        bool, typer.Option("--no-rollout", help="release a winner but start no rollout")
    ] = False,
    promote_wait: Annotated[
        int,
        typer.Option(
            "--promote-wait",
            metavar="SECONDS",
            min=0,
            help="how long to wait for the rollout to end before promoting the challenger to "
            "production (0: do not wait, promote by hand: edgeops models promote)",
        ),
    ] = 3600,
    as_json: JsonOption = False,
) -> None:
    """Continuous training: collect device samples, label, retrain, compress, evaluate
    against the champion, and release and roll out the challenger if it wins."""
    from edgeops.pipelines.ct import CT_PIPELINE, CTParams, RolloutSettings
    from edgeops.trust.release import parse_hardware

    labeler: dict[str, Any]
    if labels is not None:
        labeler = {"kind": "file", "path": str(labels.resolve()), "label_column": label_column}
    else:
        labeler = {"kind": "oracle", "noise": oracle_noise}
    params = CTParams(
        model=model,
        labeler=labeler,
        margin=margin,
        epochs=epochs,
        holdout=holdout,
        seed=seed,
        max_windows=max_windows,
        max_samples=max_samples,
        min_samples=min_samples,
        runtime=runtime,
        hardware={k: list(v) for k, v in parse_hardware(hardware).items()},
        rollout=RolloutSettings(
            enabled=not no_rollout,
            canary_count=canary,
            soak_seconds=soak,
            promote_wait_seconds=promote_wait,
        ),
    )
    if labels is not None:
        # read it now: an unreadable file fails before any work
        from edgeops.pipelines import LabelledFileLabeler

        LabelledFileLabeler(labels, label_column=label_column)
    with _runner() as runner:
        view = runner.run(CT_PIPELINE, params.to_dict())
    if as_json:
        _print_json(view.to_dict())
    else:
        _print_run(view, details=False)
        decision = next((s for s in view.steps if s.name == "decide"), None)
        if decision is not None and decision.outputs:
            out.print(str(decision.outputs.get("reason", "")), highlight=False, soft_wrap=True)
    _fail_if_failed(view)


@pipelines_app.command("list")
def pipelines_list(
    pipeline: Annotated[str | None, typer.Option(help="only runs of this pipeline")] = None,
    limit: Annotated[int, typer.Option(help="newest runs to show", min=1)] = 50,
    as_json: JsonOption = False,
) -> None:
    """Pipeline runs, newest first: status, steps done, duration."""
    with _runner() as runner:
        views = runner.list_runs(pipeline=pipeline, limit=limit)
    if as_json:
        _print_json([view.to_dict() for view in views])
        return
    if not views:
        out.print("no pipeline runs")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "pipeline", "status", "steps", "created", "duration", "error"):
        table.add_column(column, overflow="fold")
    for view in views:
        done = sum(1 for step in view.steps if step.status == "succeeded")
        table.add_row(
            view.id,
            view.pipeline,
            view.status,
            f"{done}/{len(view.steps)}",
            view.created_at.isoformat()[:19].replace("T", " "),
            _seconds(view.duration_s),
            view.error or "",
        )
    out.print(table)


@pipelines_app.command("show")
def pipelines_show(
    run_id: Annotated[str, typer.Argument(help="the pipeline run id (p-...)")],
    as_json: JsonOption = False,
) -> None:
    """One run: its parameters and every step's status, attempts, duration, inputs and
    outputs."""
    with _runner() as runner:
        view = runner.get(run_id)
    if as_json:
        _print_json(view.to_dict())
        return
    _print_run(view, details=True)


@pipelines_app.command("resume")
def pipelines_resume(as_json: JsonOption = False) -> None:
    """Carry on every run left pending or running by a process that died (its lease
    expired); finished steps are not run again."""
    with _runner() as runner:
        taken = runner.resume()
        views = [runner.get(run_id) for run_id in taken]
    if as_json:
        _print_json([view.to_dict() for view in views])
        return
    if not views:
        out.print("nothing to resume")
    for view in views:
        _print_run(view, details=False)


@pipelines_app.command("cancel")
def pipelines_cancel(
    run_id: Annotated[str, typer.Argument(help="the pipeline run id (p-...)")],
    as_json: JsonOption = False,
) -> None:
    """Cancel a pending or running run (a step in progress is abandoned, not killed)."""
    with _runner() as runner:
        view = runner.cancel(run_id)
    if as_json:
        _print_json(view.to_dict())
        return
    out.print(f"pipeline run {view.id} cancelled", highlight=False)
