"""``edgeops drift ...``: where each release's field data stands against its reference.

    edgeops drift status [--model ID] [--json]    # newest evaluation per release and cohort
    edgeops drift events [--model ID] [--limit N] [--json]
    edgeops drift check [--json]                  # evaluate now (the hub does it on its own)
    edgeops drift policy set NAME [--action none|notify|retrain] [--webhook URL]
                                  [--cohort-tag TAG] [--window SECONDS] [--alpha A]
                                  [--min-samples N] [--correction holm|bonferroni]
                                  [--labeler file:PATH|oracle:DATASET] [--margin M]
    edgeops drift policy list [--json] / show NAME [--json] / delete NAME

Thin: :class:`edgeops.monitor.watch.DriftService` on the configured database, the releases
read from the release repository (``<data dir>/trust``). ``edgeops hub serve`` evaluates
every release on its own (every ``EDGEOPS_DRIFT_INTERVAL_S``, 60 s); ``check`` runs one
evaluation from the command line, actions included. A bad policy field is one error line
naming it, exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.monitor.models import DriftEvaluationView, DriftPolicyView
    from edgeops.monitor.watch import DriftService

__all__ = ["drift_app"]

drift_app = typer.Typer(
    help="Drift of the field data from each release's reference: status, events, checks and "
    "the per-model policies (what happens on drift).",
    no_args_is_help=True,
)
policy_app = typer.Typer(
    help="Per-model drift policies: cohorts, window, thresholds and the action on drift.",
    no_args_is_help=True,
)
drift_app.add_typer(policy_app, name="policy")

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
ModelOption = Annotated[
    str | None, typer.Option("--model", metavar="MODEL_ID", help="only this model id")
]


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


@contextmanager
def _service() -> Iterator[DriftService]:
    from edgeops.cli._hub import open_hub
    from edgeops.cli.main import settings
    from edgeops.monitor.watch import DriftService, RepositoryReleases
    from edgeops.trust import repository_for

    releases = RepositoryReleases(repository_for(settings()))
    with open_hub() as hub:
        yield DriftService(hub.database, releases)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _evaluations_table(title: str, rows: list[DriftEvaluationView]) -> Table:
    table = Table(
        "model",
        "cohort",
        "evaluated (UTC)",
        "verdict",
        "samples",
        "devices",
        "min adj. p",
        "what drifted",
        "action",
        title=title,
    )
    for row in rows:
        report = row.report
        drifted = list(report.get("drifted_outputs", [])) + list(report.get("drifted_features", []))
        shown = ", ".join(drifted[:4]) + (f" (+{len(drifted) - 4})" if len(drifted) > 4 else "")
        adjusted = [
            t["p_adjusted"] for t in report.get("tests", []) if t.get("p_adjusted") is not None
        ]
        colour = {"drift": "red", "no_drift": "green"}.get(row.verdict, "yellow")
        action = "-"
        if row.action is not None:
            result = row.action_result
            action = f"{row.action}: " + (
                str(result["error"]) if "error" in result else json_brief(result)
            )
        table.add_row(
            row.model_name + f" ({row.model_id})" if row.model_name else row.model_id,
            row.cohort,
            row.evaluated_at.strftime("%Y-%m-%d %H:%M:%S"),
            f"[{colour}]{row.verdict}[/]" + (" (onset)" if row.onset else ""),
            str(row.samples),
            str(row.devices),
            _p(min(adjusted) if adjusted else None),
            shown or "-",
            action,
        )
    return table


def json_brief(document: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(document.items()))


@drift_app.command("status")
def drift_status(model: ModelOption = None, as_json: JsonOption = False) -> None:
    """The newest drift evaluation of every release and cohort."""
    with _service() as watch:
        rows = watch.status(model)
    if as_json:
        _print_json({"evaluations": [r.to_dict() for r in rows]})
        return
    if not rows:
        out.print("no drift evaluation yet (the hub evaluates releases that send telemetry)")
        return
    out.print(_evaluations_table("Drift status", rows))


@drift_app.command("events")
def drift_events(
    model: ModelOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Drift events (the first drift verdict of an episode), newest first, with the action."""
    with _service() as watch:
        rows = watch.events(model, limit=limit)
    if as_json:
        _print_json({"events": [r.to_dict() for r in rows]})
        return
    if not rows:
        out.print("no drift event")
        return
    out.print(_evaluations_table("Drift events", rows))


@drift_app.command("check")
def drift_check(model: ModelOption = None, as_json: JsonOption = False) -> None:
    """Evaluate now every release that sent telemetry within its window (actions included)."""
    with _service() as watch:
        rows = watch.evaluate(None if model is None else [model])
    if as_json:
        _print_json({"evaluations": [r.to_dict() for r in rows]})
        return
    if not rows:
        out.print("nothing to evaluate: no released model sent telemetry within its window")
        return
    out.print(_evaluations_table("Drift check", rows))


def _policy_document(policy: DriftPolicyView) -> dict[str, Any]:
    return policy.to_dict()


@policy_app.command("set")
def policy_set(
    name: Annotated[str, typer.Argument(help="the model's name (its card's name)")],
    action: Annotated[
        str, typer.Option("--action", help="on drift: none, notify (webhook) or retrain")
    ] = "none",
    webhook: Annotated[
        str | None, typer.Option("--webhook", metavar="URL", help="notify: where to POST")
    ] = None,
    cohort_tag: Annotated[
        str | None,
        typer.Option("--cohort-tag", metavar="TAG", help="evaluate each value of this tag apart"),
    ] = None,
    window: Annotated[
        float, typer.Option("--window", metavar="SECONDS", help="evaluation window")
    ] = 600.0,
    alpha: Annotated[
        float, typer.Option("--alpha", help="family-wise false-alarm rate per evaluation")
    ] = 0.01,
    min_samples: Annotated[
        int, typer.Option("--min-samples", help="fewer samples: insufficient, not drift")
    ] = 20,
    correction: Annotated[str, typer.Option("--correction", help="holm or bonferroni")] = "holm",
    labeler: Annotated[
        str | None,
        typer.Option(
            "--labeler",
            metavar="KIND:WHAT",
            help="retrain: who labels the devices' samples: file:PATH (a labelled CSV, Parquet "
            "or NPZ file) or oracle:DATASET (a simulated oracle that knows a dataset version)",
        ),
    ] = None,
    margin: Annotated[
        float,
        typer.Option("--margin", help="retrain: how much better the challenger must score"),
    ] = 0.005,
    as_json: JsonOption = False,
) -> None:
    """Create or replace a model's drift policy (the whole policy: options not given take
    their defaults)."""
    from edgeops.monitor.watch import DriftPolicyError

    config = {"alpha": alpha, "min_samples": min_samples, "correction": correction}
    retrain = None
    if labeler is not None:
        retrain = {"labeler": _labeler(labeler), "margin": margin}
    elif action == "retrain":
        raise DriftPolicyError(
            "labeler: the retrain action needs --labeler file:PATH or oracle:DATASET"
        )
    with _service() as watch:
        policy = watch.set_policy(
            name,
            action=action,
            webhook_url=webhook,
            cohort_tag=cohort_tag,
            window_s=window,
            config=config,
            retrain=retrain,
        )
    if as_json:
        _print_json(_policy_document(policy))
        return
    out.print(f"drift policy of {policy.model_name}: action {policy.action}", highlight=False)


def _labeler(text: str) -> dict[str, Any]:
    from edgeops.monitor.watch import DriftPolicyError

    kind, sep, what = text.partition(":")
    if not sep or not what or kind not in ("file", "oracle"):
        raise DriftPolicyError(f"labeler: expected file:PATH or oracle:DATASET, got {text!r}")
    if kind == "file":
        from pathlib import Path

        path = Path(what).expanduser().resolve()
        if not path.is_file():
            raise DriftPolicyError(f"labeler: no labelled data file at {path}")
        return {"kind": "file", "path": str(path)}
    return {"kind": "oracle", "dataset": what}


@policy_app.command("list")
def policy_list(as_json: JsonOption = False) -> None:
    """Every stored drift policy (models without one use the defaults)."""
    with _service() as watch:
        policies = watch.list_policies()
    if as_json:
        _print_json({"policies": [_policy_document(p) for p in policies]})
        return
    table = Table("model", "action", "webhook", "cohort tag", "window s", "alpha", "min samples")
    for p in policies:
        table.add_row(
            p.model_name,
            p.action,
            p.webhook_url or "-",
            p.cohort_tag or "-",
            f"{p.window_s:g}",
            f"{p.config.get('alpha', '-')}",
            f"{p.config.get('min_samples', '-')}",
        )
    out.print(table)


@policy_app.command("show")
def policy_show(
    name: Annotated[str, typer.Argument(help="the model's name")], as_json: JsonOption = False
) -> None:
    """A model's drift policy (the defaults if none is stored)."""
    with _service() as watch:
        policy = watch.get_policy(name)
    document = _policy_document(policy)
    if as_json:
        _print_json(document)
        return
    for key, value in document.items():
        out.print(f"{key}: {value}", highlight=False)


@policy_app.command("delete")
def policy_delete(name: Annotated[str, typer.Argument(help="the model's name")]) -> None:
    """Delete a model's drift policy (it goes back to the defaults)."""
    with _service() as watch:
        watch.delete_policy(name)
    out.print(f"drift policy of {name} deleted", highlight=False)
