"""``edgeops keys ...``, ``edgeops release`` and ``edgeops releases list``: the TUF repository.

    edgeops keys init [--root-keys N] [--root-threshold M] [--root-key-dir DIR]
    edgeops keys rotate ROLE [--root-key-dir DIR] [--root-keys N] [--root-threshold M]
    edgeops keys show [--json]
    edgeops release MODEL_VERSION [--runtime litert|onnx|mcu] [--firmware TARGET]
                                  [--hardware k=v1|v2,...] [--min-free-memory BYTES] [--json]
    edgeops releases list [--json]

Thin: each command opens the repository under ``<data dir>/trust`` (``Settings.trust_dir``)
with the configured expiries and calls :mod:`edgeops.trust`. Errors are one line (see
``edgeops.cli.main``): a repository not initialised, missing root keys and bad thresholds are
configuration errors (exit 2); an unknown model, a model unfit for the runtime, an unknown
firmware target or firmware that does not fit its target exit 1.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgeops.trust import TrustRepository

__all__ = ["keys_app", "release", "releases_app"]

keys_app = typer.Typer(
    help="Signing keys of the release repository: init, rotate, show.", no_args_is_help=True
)
releases_app = typer.Typer(help="Released targets of the release repository.", no_args_is_help=True)

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
RootKeyDirOption = Annotated[
    Path | None,
    typer.Option(
        "--root-key-dir",
        help="directory of the offline root keys root-<n>.pem "
        "(default: <data dir>/trust/offline-root-keys)",
        file_okay=False,
    ),
]


class Runtime(StrEnum):
    litert = "litert"
    onnx = "onnx"
    mcu = "mcu"


def _repository() -> TrustRepository:
    from edgeops.cli.main import settings
    from edgeops.trust import repository_for

    return repository_for(settings())


def _print_json(document: Any) -> None:
    from edgeops.cli.main import print_json

    print_json(document)


# -- keys -------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    root_keys: Annotated[
        int, typer.Option("--root-keys", help="number of root keys", min=1, max=32)
    ] = 1,
    root_threshold: Annotated[
        int, typer.Option("--root-threshold", help="root signatures required", min=1, max=32)
    ] = 1,
    root_key_dir: RootKeyDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create the release repository: offline root keys, online targets/snapshot/timestamp
    keys, and version 1 of every role."""
    repository = _repository()
    key_dir = repository.init(root_key_dir, root_keys=root_keys, root_threshold=root_threshold)
    document = {**repository.describe(), "root_key_dir": str(key_dir)}
    if as_json:
        _print_json(document)
    else:
        out.print(f"trust repository created in {repository.root_dir}")
        out.print(f"root: {root_keys} key(s), threshold {root_threshold}, in {key_dir}")
        out.print(f"provision devices with {repository.root_json_path}")
    if root_key_dir is None:
        typer.echo(
            f"warning: the root keys are in {key_dir}, on this machine; move that directory "
            "somewhere offline and pass --root-key-dir to `edgeops keys rotate`",
            err=True,
        )


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot or timestamp")],
    root_key_dir: RootKeyDirOption = None,
    root_keys: Annotated[
        int | None,
        typer.Option("--root-keys", help="rotating root: number of new keys", min=1, max=32),
    ] = None,
    root_threshold: Annotated[
        int | None,
        typer.Option("--root-threshold", help="rotating root: new threshold", min=1, max=32),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a role's keys; signs a new root with the offline root keys."""
    repository = _repository()
    versions = repository.rotate(
        role, root_key_dir, root_keys=root_keys, root_threshold=root_threshold
    )
    if as_json:
        _print_json({"role": role, "versions": versions})
        return
    out.print(
        f"rotated {role} keys; versions now "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )


@keys_app.command("show")
def keys_show(as_json: JsonOption = False) -> None:
    """Show every role: version, expiry, threshold, key ids and where online keys are."""
    document = _repository().describe()
    if as_json:
        _print_json(document)
        return
    out.print(f"trust repository {document['trust_dir']} ({document['targets']} targets)")
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("role", "version", "expires", "threshold", "key ids", "keys"):
        table.add_column(column, overflow="fold")
    for name, role in document["roles"].items():
        expires = role["expires"][:16].replace("T", " ")
        if role["expired"]:
            expires += " [red](expired)[/red]"
        table.add_row(
            name,
            str(role["version"]),
            expires,
            f"{role['threshold']} of {len(role['keyids'])}",
            ", ".join(keyid[:12] for keyid in role["keyids"]),
            "online" if role["online"] else "offline",
        )
    out.print(table)


# -- releases ---------------------------------------------------------------------------------


def release(
    model: Annotated[str, typer.Argument(help="model version: m-<id>, NAME or NAME:SEQ")],
    runtime: Annotated[
        Runtime, typer.Option("--runtime", help="litert, onnx, or mcu (int8 .tflite for TFLM)")
    ] = Runtime.litert,
    hardware: Annotated[
        str | None,
        typer.Option(
            "--hardware",
            help="hardware tags the model fits, KEY=V1|V2,... (e.g. arch=x86_64|aarch64)",
        ),
    ] = None,
    min_free_memory: Annotated[
        int | None,
        typer.Option("--min-free-memory", help="bytes of free memory a device needs", min=0),
    ] = None,
    firmware: Annotated[
        str | None,
        typer.Option(
            "--firmware",
            help="with --runtime mcu: release the model generated as firmware for this target "
            "(mps2-an385, mps2-an386, zephyr, arduino, esp-idf, host) instead of the .tflite",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Export a model version for a runtime and publish it as a signed target (new targets,
    snapshot and timestamp versions)."""
    from edgeops.cli._hub import open_hub
    from edgeops.trust.release import (
        card_of,
        check_firmware_target,
        parse_hardware,
        release_model,
    )

    tags = parse_hardware(hardware)
    if firmware is not None:
        check_firmware_target(runtime.value, firmware)  # before opening anything
    repository = _repository()
    repository.root()  # not initialised: fail before opening the registry
    with open_hub() as hub:
        released = release_model(
            repository,
            model,
            registry=hub.registry(),
            datasets=hub.datasets(),
            runtime=runtime.value,
            hardware=tags,
            min_free_memory_bytes=min_free_memory,
            firmware=firmware,
        )
    footprint = card_of(released.custom).get("firmware") if firmware is not None else None
    if as_json:
        document = released.to_dict()
        if footprint is not None:
            document["firmware"] = footprint
        _print_json(document)
        return
    out.print(f"released {released.path}", highlight=False)
    out.print(f"  length  {released.length} bytes", highlight=False)
    out.print(f"  sha256  {released.sha256}", highlight=False)
    if isinstance(footprint, dict):
        out.print(f"  firmware {_footprint_text(footprint)}", highlight=False)
    out.print(
        "  versions "
        + ", ".join(f"{name} {version}" for name, version in released.versions.items()),
        highlight=False,
    )


def _footprint_text(footprint: dict[str, Any]) -> str:
    parts = [str(footprint.get("target")), f"arena {footprint.get('arena_bytes')} B"]
    for key, label in (("flash_bytes", "flash"), ("ram_bytes", "RAM")):
        if footprint.get(key) is not None:
            parts.append(f"{label} {footprint[key]} B")
    if footprint.get("instructions_per_inference") is not None:
        parts.append(f"{footprint['instructions_per_inference']} instructions per inference")
    return ", ".join(parts)


@releases_app.command("list")
def releases_list(as_json: JsonOption = False) -> None:
    """List the released targets, by path."""
    from edgeops.trust import Release

    repository = _repository()
    versions = repository.versions()
    releases = [Release.of(target, versions) for target in repository.targets()]
    if as_json:
        _print_json([item.to_dict() for item in releases])
        return
    if not releases:
        out.print("nothing released yet")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("target", "runtime", "model", "length", "sha256"):
        table.add_column(column, overflow="fold")
    for item in releases:
        table.add_row(item.path, item.runtime, item.model_id, str(item.length), item.sha256[:16])
    out.print(table)
