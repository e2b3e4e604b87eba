"""``edgeops firmware generate``: an int8 model as an interpreter-free C99 library.

    edgeops firmware generate --model digits-cnn:2 --target host --out build/cnn
    edgeops firmware generate --tflite model.tflite --target mps2-an385 --out build/m3 [--json]
    edgeops firmware generate --tflite model.tflite --target zephyr --flash-bytes 524288 ...

Thin: reads the .tflite (from the registry or a file), calls :func:`edgeops.firmware.generate`
(which checks the target's flash and RAM limits, then writes the directory atomically) and
prints the arena bytes, the operators and the project files written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["firmware_app"]

_TARGET_HELP = (
    "target: host (the library alone), mps2-an385 (Cortex-M3 under QEMU), mps2-an386 "
    "(Cortex-M4 under QEMU), zephyr, arduino, esp-idf"
)

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
        typer.Option(
            "--tflite",
            help="an int8 .tflite file (int8 or float32 input and output)",
            dir_okay=False,
        ),
    ] = None,
    target: Annotated[str, typer.Option(help=_TARGET_HELP)] = "host",
    flash_bytes: Annotated[
        int | None,
        typer.Option("--flash-bytes", help="flash limit in bytes instead of the target's"),
    ] = None,
    ram_bytes: Annotated[
        int | None, typer.Option("--ram-bytes", help="RAM limit in bytes instead of the target's")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Write the model as a C99 library: weights as const arrays, a static arena planned at
    generation time, integer kernels bit-exact with TFLite Micro; for a target other than
    host, also its project (bare-metal QEMU harness, Zephyr app, Arduino library and sketch,
    ESP-IDF component)."""
    from edgeops.cli.main import print_json
    from edgeops.firmware import FirmwareError, generate
    from edgeops.firmware.targets import Limits, get_target

    if (model is None) == (tflite is None):
        raise typer.BadParameter("give exactly one of --model and --tflite")
    chosen = get_target(target)
    limits = Limits(flash_bytes=flash_bytes, ram_bytes=ram_bytes)
    if tflite is not None:
        try:
            flatbuffer = tflite.read_bytes()
        except OSError as exc:
            raise FirmwareError(f"cannot read {tflite}: {exc.strerror or exc}") from None
    else:
        assert model is not None
        flatbuffer = _registry_tflite(model)
    library = generate(flatbuffer, out_dir, target=chosen.name, limits=limits)
    if as_json:
        print_json({**library.summary(), "out": str(out_dir), "target": target})
        return
    typer.echo(f"wrote {out_dir} (target {target})")
    typer.echo(f"target: {chosen.description}")
    typer.echo(f"arena: {library.arena_bytes} bytes")
    input_type = "float32" if library.float_input else "int8"
    output_type = "float32" if library.float_output else "int8"
    typer.echo(
        f"input: {library.input_size} {input_type}, output: {library.output_size} {output_type}"
    )
    typer.echo(f"ops ({len(library.ops)}): {', '.join(library.ops)}")
    if library.folded:
        typer.echo(f"folded at generation time: {', '.join(library.folded)}")
    if library.usage is not None:
        typer.echo(
            f"estimated: {library.usage.flash_bytes:,} bytes of flash, "
            f"{library.usage.ram_bytes:,} bytes of RAM"
        )
    if library.project_files:
        typer.echo(f"project files: {', '.join(library.project_files)}")
