"""``edgeops compress MODEL ...``: one compressed version, or a budget-aware search.

    edgeops compress digits-cnn --quantize int8 [--sparsity 0.5] [--clusters 16] [--qat] [--json]
    edgeops compress digits-cnn --profile cortex-m4-256k [--profiles FILE] [--json]
    edgeops compress digits-cnn --quantize int8 --profile cortex-m4-256k   # scored on TFLM

Thin: opens the configured database (migrated) and the artifact store under the data dir,
calls :class:`edgeops.compress.CompressService`, prints a summary or a Rich table of the
Pareto front (``--json``: a JSON document on stdout, progress on stderr).
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
    from edgeops.compress import CompressService, SearchResult
    from edgeops.registry import ModelVersionView

__all__ = ["compress"]

out = Console()
PROFILES_FILE = "profiles.toml"  # <data dir>/profiles.toml extends the built-in profiles


@contextmanager
def open_compress_service() -> Iterator[CompressService]:
    """The service over the current settings' database (migrated) and artifact store."""
    from edgeops.cli.main import settings
    from edgeops.compress import CompressService
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.registry import Registry
    from edgeops.store import ArtifactStore

    current = settings()
    database = Database(current.database)
    try:
        database.upgrade()
        store = ArtifactStore(current.data_dir / "artifacts")
        yield CompressService(DatasetService(database, store), Registry(database, store))
    finally:
        database.dispose()


def _profiles_file(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    from edgeops.cli.main import settings

    default = settings().data_dir / PROFILES_FILE
    return default if default.is_file() else None


def _size(value: Any) -> str:
    if value is None:
        return "-"
    number = float(value)
    for unit in ("B", "KiB", "MiB"):
        if number < 1024 or unit == "MiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return f"{number:.1f} MiB"  # pragma: no cover


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


def compress(
    model: Annotated[str, typer.Argument(help="Keras model version: m-<id>, NAME or NAME:SEQ")],
    quantize: Annotated[
        str | None,
        typer.Option("--quantize", "-q", help="int8 | int16x8 | float16 | dynamic"),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="prune to this fraction of zero weights first (0 < S < 1)"),
    ] = None,
    clusters: Annotated[
        int | None,
        typer.Option(
            help="then cluster each kernel into this many shared values (zeros preserved)",
        ),
    ] = None,
    qat: Annotated[bool, typer.Option("--qat", help="quantization-aware training")] = False,
    max_loss_pp: Annotated[
        float,
        typer.Option(
            "--max-loss-pp",
            help="int8 losing more accuracy than this (percentage points) tries QAT, then 16x8",
        ),
    ] = 1.0,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs for pruning and QAT", min=1)] = 2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    profile: Annotated[
        str | None,
        typer.Option(
            help="search width x sparsity x quantization for this device profile; with "
            "--quantize: compress for it (an MCU profile scores on tflite-micro)",
        ),
    ] = None,
    profiles: Annotated[
        Path | None,
        typer.Option(
            "--profiles",
            help="TOML file of extra device profiles (default: <data dir>/profiles.toml)",
            dir_okay=False,
        ),
    ] = None,
    widths: Annotated[
        str | None, typer.Option(help="search: comma-separated width multipliers")
    ] = None,
    sparsities: Annotated[str, typer.Option(help="search: comma-separated sparsities")] = "0,0.5",
    modes: Annotated[
        str | None,
        typer.Option(help="search: comma-separated quantization modes (default: profile's)"),
    ] = None,
    workers: Annotated[int, typer.Option(help="search: parallel processes", min=1)] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Compress a Keras model version (prune, quantize, QAT), or search for a device profile.

    With --quantize: makes one compressed .tflite version, scored on the LiteRT interpreter
    (with --profile of an MCU: on the tflite-micro interpreter), and prints it. With --profile
    alone: evaluates a grid of candidates in parallel and prints the Pareto front of accuracy
    vs flash vs RAM vs latency, marking what fits the device.
    """
    if quantize is None and profile is None:
        raise typer.BadParameter("give --quantize MODE, --profile NAME, or both")
    if quantize is None and profile is not None:
        grid_modes = tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else None
        with open_compress_service() as service:
            result = service.search(
                model,
                profile,
                profiles_file=_profiles_file(profiles),
                widths=_floats(widths, "--widths"),
                sparsities=_floats(sparsities, "--sparsities") or (0.0,),
                modes=grid_modes,
                seed=seed,
                workers=workers,
                progress=True,
            )
        if as_json:
            _print_json(result.to_dict())
        else:
            _print_search(result)
        return
    assert quantize is not None
    with open_compress_service() as service:
        version = service.compress(
            model,
            quantize=quantize,
            sparsity=sparsity,
            clusters=clusters,
            qat=qat,
            max_loss_pp=max_loss_pp,
            epochs=epochs,
            seed=seed,
            profile=profile,
            profiles_file=_profiles_file(profiles) if profile is not None else None,
            progress=True,
        )
    if as_json:
        _print_json(
            {
                "id": version.id,
                "ref": version.ref,
                "parent_id": version.parent_id,
                "run_id": version.run_id,
                "name": version.name,
                "metrics": version.metrics,
                "compression": version.config.get("compression"),
            }
        )
    else:
        _print_version(version)


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


def _print_version(version: ModelVersionView) -> None:
    compression = version.config.get("compression", {})
    metrics = version.metrics
    key = "auc" if "auc" in metrics and metrics.get("accuracy") is None else "accuracy"
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("id", version.id)
    facts.add_row("version", version.ref)
    facts.add_row("parent", str(version.parent_id))
    chosen = compression.get("quantization", "?")
    facts.add_row("quantization", f"{'QAT ' if compression.get('qat') else ''}{chosen}")
    if compression.get("sparsity"):
        facts.add_row("sparsity", f"{metrics.get('kernel_sparsity', 0):.1%} of kernel weights")
    if compression.get("clusters"):
        facts.add_row(
            "clusters",
            f"{compression['clusters']} per kernel (at most "
            f"{metrics.get('kernel_distinct_values', '?')} distinct values, zero included)",
        )
    facts.add_row("why", str(compression.get("reason", "")))
    nan = float("nan")
    score, baseline = metrics.get(key, nan), metrics.get(f"float_{key}", nan)
    runtime = {"litert": "LiteRT", "tflm": "tflite-micro"}.get(
        str(metrics.get("runtime")), str(metrics.get("runtime", "?"))
    )
    facts.add_row(
        f"test {key} ({runtime})",
        f"{score:.4f} (float {baseline:.4f}, {metrics.get('loss_pp', nan):+.2f} pp)",
    )
    facts.add_row(
        "size",
        f"{_size(metrics.get('size_bytes'))} (float {_size(metrics.get('float_size_bytes'))})",
    )
    facts.add_row(
        "gzip",
        f"{_size(metrics.get('gzip_bytes'))} (float {_size(metrics.get('float_gzip_bytes'))})",
    )
    facts.add_row("TFLM arena", _size(metrics.get("arena_bytes")))
    latency = metrics.get("latency_ms_median")
    facts.add_row("latency", "-" if latency is None else f"{latency:.3f} ms (median, this CPU)")
    out.print(facts)


def _print_search(result: SearchResult) -> None:
    profile = result.profile
    ops = "any op" if profile.ops is None else f"{len(profile.ops)} ops"
    table = Table(
        title=f"Pareto front for {profile.name}: flash {_size(profile.flash_bytes)}, "
        f"RAM {_size(profile.ram_bytes)}, {profile.runtime}, {ops}",
        box=box.SIMPLE_HEAD,
    )
    metric = "acc" if result.metric == "accuracy" else result.metric
    for column in ("width", "sparsity", "quant", f"val {metric}", f"test {metric}"):
        table.add_column(column, no_wrap=True)
    for column in ("flash", "gzip", "RAM", "ms"):
        table.add_column(column, no_wrap=True, justify="right")
    table.add_column("fits", overflow="fold")
    best = result.best
    for candidate in result.front:
        fits = "[green]yes[/]" if candidate.fits else f"[red]no[/]: {'; '.join(candidate.misfits)}"
        if candidate is best:
            fits += " [bold](best)[/]"
        table.add_row(
            f"{candidate.width:g}",
            f"{candidate.sparsity:.0%}",
            candidate.quantization,
            f"{candidate.accuracy:.4f}",
            f"{candidate.test_accuracy:.4f}",
            _size(candidate.flash_bytes),
            _size(candidate.gzip_bytes),
            _size(candidate.ram_bytes),
            f"{candidate.latency_ms:.3f}",
            fits,
        )
    # Piped output has no terminal width: do not squeeze the table into 80 columns.
    console = out if out.is_terminal else Console(width=max(out.width, 140))
    console.print(table)
    fitting = sum(c.fits for c in result.candidates)
    console.print(
        f"{len(result.front)} of {len(result.candidates)} candidates on the front, "
        f"{fitting} fit; latency: median LiteRT invoke on this CPU; run {result.run_id}"
    )
