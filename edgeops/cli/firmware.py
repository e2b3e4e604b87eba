"""``edgeops firmware generate``: an int8 model as an interpreter-free C99 library.

    edgeops firmware generate --model digits-cnn:2 --target host --out build/cnn
    edgeops firmware generate --tflite model.tflite --target host --out build/model [--json]

Thin: reads the .tflite (from the registry or a file), calls :func:`edgeops.firmware.generate`
(which writes the directory atomically) and prints the arena bytes and the operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["firmware_app"]

firmware_app = typer.Typer(
    help="Generate C code for microcontrollers from int8 models.", no_args_is_help=True
)


def _registry_tflite(ref: str) -> bytes:
    from edgeops.cli._hub import open_hub
    from edgeops.firmware import FirmwareError

    with open_hub() as hub:
        registry = hub.registry()
        view = registry.get_model(ref)
        if view.format != "tflite":
            raise FirmwareError(
                f"model {view.ref} ({view.id}) is a .{view.format} model; generate from a "
                "full-integer int8 .tflite version (edgeops compress MODEL --quantize int8)"
            )
        return registry.load_artifact(view.id)


@firmware_app.command("generate")
def generate_command(
    out_dir: Annotated[
        Path, typer.Option("--out", help="directory to create (must not exist)", file_okay=False)
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", help="registered int8 .tflite version: m-<id>, NAME or NAME:SEQ"),
    ] = None,
    tflite: Annotated[
        Path | None,
        typer.Option("--tflite", help="a full-integer int8 .tflite file", dir_okay=False),
    ] = None,
    target: Annotated[str, typer.Option(help="target: host (the library alone)")] = "host",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Write the model as a C99 library: weights as const arrays, a static arena planned at
    generation time, integer kernels bit-exact with TFLite Micro."""
    from edgeops.cli.main import print_json
    from edgeops.firmware import FirmwareError, generate

    if (model is None) == (tflite is None):
        raise typer.BadParameter("give exactly one of --model and --tflite")
    if tflite is not None:
        try:
            flatbuffer = tflite.read_bytes()
        except OSError as exc:
            raise FirmwareError(f"cannot read {tflite}: {exc.strerror or exc}") from None
    else:
        assert model is not None
        flatbuffer = _registry_tflite(model)
    library = generate(flatbuffer, out_dir, target=target)
    if as_json:
        print_json({**library.summary(), "out": str(out_dir), "target": target})
        return
    typer.echo(f"wrote {out_dir} (target {target})")
    typer.echo(f"arena: {library.arena_bytes} bytes")
    typer.echo(f"input: {library.input_size} int8, output: {library.output_size} int8")
    typer.echo(f"ops ({len(library.ops)}): {', '.join(library.ops)}")
    if library.folded:
        typer.echo(f"folded at generation time: {', '.join(library.folded)}")
