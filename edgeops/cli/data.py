"""``edgeops data ...``: dataset versions from the command line.

Thin: every command opens the configured database (migrating it if needed) and the artifact
store under the data dir, calls :class:`edgeops.data.DatasetService`, and prints a table or,
with ``--json``, a JSON document. Progress goes to stderr, so ``--json`` output stays clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.data import DatasetService, DatasetView

data_app = typer.Typer(
    help="Versioned datasets: import CSV/Parquet/NPZ files, list, show. Built-in datasets "
    "(digits, mnist5k, basic_motions) are registered on first use.",
    no_args_is_help=True,
)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@contextmanager
def open_datasets() -> Iterator[DatasetService]:
    """The dataset service of the current settings, with a progress display on stderr."""
    from edgeops.cli._hub import open_hub

    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("opening the database", total=None)
    with progress, open_hub() as hub:
        yield hub.datasets(on_step=lambda step: progress.update(task, description=step))


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


@data_app.command("import")
def data_import(
    file: Annotated[Path, typer.Argument(help="a .csv, .csv.gz, .parquet, .pq or .npz file")],
    name: Annotated[str, typer.Option(help="the dataset's name")],
    label_column: Annotated[
        str | None,
        typer.Option(help="the column holding the class labels (NPZ: the label array, 'y')"),
    ] = None,
    features: Annotated[
        str,
        typer.Option(
            help="feature rule fitted on the training split: standardize, minmax, "
            "scale255 or identity"
        ),
    ] = "standardize",
    seed: Annotated[int, typer.Option(help="seed of the stratified split")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Register the labelled data in FILE as a new version of dataset NAME.

    The samples are split 70/15/15 (train/validation/test), stratified and seeded. The same
    file, name, seed and rule give the same version again.
    """
    with open_datasets() as datasets:
        view = datasets.import_file(
            file, name=name, label_column=label_column, seed=seed, features=features
        )
    if as_json:
        _print_json(view.to_dict())
        return
    out.print(
        f"dataset {view.name} version {view.version}: {view.num_samples} samples, "
        f"{len(view.classes)} classes, splits {_splits(view)}"
    )


@data_app.command("list")
def data_list(as_json: JsonOption = False) -> None:
    """List every dataset version, by name, newest first."""
    with open_datasets() as datasets:
        views = datasets.list()
    if as_json:
        _print_json([_summary(view) for view in views])
        return
    if not views:
        out.print("no datasets registered yet (built-in: digits, mnist5k, basic_motions)")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "version", "samples", "classes", "splits", "created"):
        table.add_column(column, no_wrap=column in ("version", "created"))
    for view in views:
        table.add_row(
            view.name,
            view.short_version,
            str(view.num_samples),
            str(len(view.classes)),
            _splits(view),
            view.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


@data_app.command("show")
def data_show(
    ref: Annotated[str, typer.Argument(help="a name (its newest version), version id or prefix")],
    as_json: JsonOption = False,
) -> None:
    """Show one dataset version: splits, classes, feature rule, reference statistics."""
    with open_datasets() as datasets:
        view = datasets.resolve(ref)
    if as_json:
        _print_json(view.to_dict())
        return
    rule = view.feature_rule
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("name", view.name),
        ("version", view.version),
        ("task", view.task),
        ("source", view.source),
        ("created", view.created_at.isoformat()),
        ("samples", str(view.num_samples)),
        ("splits", f"{_splits(view)} (seed {view.split_seed})"),
        ("classes", ", ".join(view.classes)),
        ("raw sample", _shape(view.input_shape)),
        ("model input", _shape(rule.model_input_shape)),
        ("transpose", "-" if rule.transpose is None else _shape(rule.transpose)),
        ("offset", _numbers(rule.offset)),
        ("scale", _numbers(rule.scale)),
        (
            "window",
            "-"
            if rule.window is None
            else f"{rule.window.length} readings every {rule.window.stride}",
        ),
        (
            "reference",
            f"{view.reference.num_features} feature(s), "
            f"{max(len(c) for c in view.reference.feature_counts)} bins at most",
        ),
        ("artifact", f"sha256:{view.artifact_sha256}"),
    ]
    if view.feature_names is not None:
        rows.insert(8, ("columns", ", ".join(view.feature_names)))
    for field, value in rows:
        table.add_row(field, value)
    out.print(table)


def _summary(view: DatasetView) -> dict[str, Any]:
    """A list entry: the metadata without the (long) rule and reference statistics."""
    document = view.to_dict()
    for key in ("feature_rule", "reference"):
        document.pop(key)
    return document


def _splits(view: DatasetView) -> str:
    return "/".join(str(view.split_sizes.get(split, 0)) for split in ("train", "val", "test"))


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _numbers(values: list[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values[:limit])
    return f"[{shown}, ... {len(values)} values]" if len(values) > limit else f"[{shown}]"
