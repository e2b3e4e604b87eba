"""``edgeops train | evaluate | export``: train a zoo model, score a version, export it.

    edgeops train --dataset digits --arch cnn [--epochs N] [--seed S] [--width W] [--json]
    edgeops evaluate digits-cnn --data new.csv --label-column label [--json]
    edgeops export digits-cnn --format tflite|onnx --out DIR [--json]

Thin: each command opens the configured database (migrated) and the artifact store under
the data dir and calls the services. With ``--json`` the document goes to stdout and
progress to stderr. TensorFlow is imported only once a command runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry

__all__ = ["evaluate", "export", "train"]

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@dataclass
class _Services:
    datasets: DatasetService
    registry: Registry


@contextmanager
def _open_services() -> Iterator[_Services]:
    from edgeops.cli._hub import open_hub

    with open_hub() as hub:
        yield _Services(hub.datasets(), hub.registry())


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


ARCH_HELP = "architecture: mlp, cnn, ds-cnn, cnn1d, mobilenet, autoencoder"
"""Written out so that ``--help`` does not import the zoo; a test checks it matches."""


def train(
    dataset: Annotated[
        str, typer.Option(help="dataset name, version id or id prefix (digits, mnist5k ...)")
    ],
    arch: Annotated[str, typer.Option(help=ARCH_HELP)],
    epochs: Annotated[int, typer.Option(help="training epochs", min=1)] = 10,
    seed: Annotated[int, typer.Option(help="random seed (weights, shuffling)")] = 0,
    width: Annotated[
        float, typer.Option(help="width multiplier of every layer (MobileNet's alpha)")
    ] = 1.0,
    batch_size: Annotated[int, typer.Option(help="training batch size", min=1)] = 32,
    name: Annotated[str | None, typer.Option(help="model name (default: <dataset>-<arch>)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Train a zoo architecture on a dataset version and register the model."""
    from edgeops.train import TrainService, check_training_parameters

    # before opening anything: a typo fails fast, without importing TensorFlow
    check_training_parameters(arch, epochs=epochs, width=width, batch_size=batch_size)
    with _open_services() as services:
        version = TrainService(services.datasets, services.registry).train(
            dataset,
            arch,
            epochs=epochs,
            seed=seed,
            width=width,
            batch_size=batch_size,
            name=name,
        )
    if as_json:
        _print_json(
            {
                "id": version.id,
                "ref": version.ref,
                "name": version.name,
                "seq": version.seq,
                "run_id": version.run_id,
                "dataset_version": version.dataset_version,
                "config": version.config,
                "metrics": version.metrics,
            }
        )
        return
    _print_version(version)


def _print_version(version: ModelVersionView) -> None:
    table = Table(box=box.SIMPLE, show_header=False, title=f"model {version.ref}")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("id", version.id)
    table.add_row("run", version.run_id)
    table.add_row("dataset", version.dataset_version[:16])
    table.add_row("architecture", str(version.config.get("arch")))
    for key in sorted(version.metrics):
        table.add_row(key, _value(version.metrics[key]))
    out.print(table)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def evaluate(
    model: Annotated[str, typer.Argument(help="model version: m-<id>, NAME or NAME:SEQ")],
    data: Annotated[Path, typer.Option(help="labelled .csv, .parquet or .npz file")],
    label_column: Annotated[
        str | None, typer.Option(help="the column holding the labels (NPZ: the array, 'y')")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a model version on a labelled file through its preprocessing and device runtime."""
    from edgeops.evaluate import evaluate_file

    with _open_services() as services:
        version, report = evaluate_file(
            model,
            data,
            label_column=label_column,
            registry=services.registry,
            datasets=services.datasets,
        )
    document = {"model": version.id, "ref": version.ref, "data": str(data), **report.to_dict()}
    if as_json:
        _print_json(document)
        return
    table = Table(box=box.SIMPLE, show_header=False, title=f"{version.ref} on {data.name}")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in document.items():
        table.add_row(key, "-" if value is None else _value(value))
    out.print(table)


def export(
    model: Annotated[str, typer.Argument(help="model version: m-<id>, NAME or NAME:SEQ")],
    format: Annotated[str, typer.Option("--format", help="tflite or onnx")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="directory to write into", file_okay=False)
    ],
    as_json: JsonOption = False,
) -> None:
    """Write a model version as .tflite or .onnx with its model card (JSON and Markdown)."""
    from edgeops.export import EXPORT_FORMATS, UnsupportedExportError
    from edgeops.export import export as export_model

    if format not in EXPORT_FORMATS:
        raise UnsupportedExportError(
            f"cannot export to {format!r}; formats: {', '.join(EXPORT_FORMATS)}"
        )
    with _open_services() as services:
        paths = export_model(
            model, format, out_dir, registry=services.registry, datasets=services.datasets
        )
    if as_json:
        _print_json({"model": model, "format": format, "files": [str(p) for p in paths]})
        return
    for path in paths:
        out.print(f"wrote {path}")
