"""Releasing a registered model version: export it for a runtime and add it as a TUF target.

The target path is ``{model name}/{seq}/{runtime}/model.{tflite|onnx}`` (generated firmware:
``{model name}/{seq}/mcu/firmware-{target}.tar``) and the target's custom metadata is the
model's compatibility contract, checked by the device before it installs anything::

    {"edgeops": {"card": "{...ModelCard.to_dict() as compact JSON text...}",
                 "hardware": {"arch": ["x86_64", "aarch64"]},   # {} = any hardware
                 "min_free_memory_bytes": 123456,               # or null
                 "runtime": "litert"}}                          # litert | onnx | mcu

The card travels as JSON *text* (``json.loads`` gives the card's object): TUF signs the
canonical JSON form of metadata, which has no floating-point numbers, and a card is full of
them (quantization scales, test vectors, reference statistics, metrics).

Runtimes: ``litert`` (the .tflite as exported), ``onnx`` (the .onnx), ``mcu`` (a full-int8
.tflite for TensorFlow Lite Micro; the card's runtime becomes ``tflm``).

Generated firmware (``mcu`` with ``firmware=TARGET``): the full-int8 .tflite is turned into
the interpreter-free C library and project of a firmware target (:mod:`edgeops.firmware`)
and released as one deterministic tar archive (names sorted, mtime 0, owner 0, no
compression) under a directory ``{model name}-{seq}-{target}/``. For a target QEMU runs
(``mps2-an385``, ``mps2-an386``) with the Arm toolchain installed, the archive also holds the
built ``firmware.elf``: the library linked with the serial harness
(``firmware_templates/mps2/main_serial.c``), the image a board runs and a gateway flashes,
which answers the frames of :mod:`device_agent.runtime._serial` on the board's UART. The
card records the library's sections from ``arm-none-eabi-size`` and the instructions per
inference under ``qemu-system-arm -icount``, both measured on a build with the semihosting
harness (:mod:`edgeops.firmware.cortexm`); for the other targets it records what the
generated sources tell (arena, constant data).
The card's runtime becomes ``firmware`` and its ``firmware`` object holds these figures
(:class:`device_agent.card.Firmware`); its ``arena_bytes`` and ``flash_bytes`` are the
library's. Nothing is published if the model is not full int8, the target is unknown, or the
model does not fit the target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import TargetFile

from device_agent.card import Firmware, ModelCard
from device_agent.updater.contract import FIRMWARE_CARD_RUNTIME
from edgeops.export import UnsupportedExportError, export_artifact
from edgeops.trust.errors import HardwareTagsError, ReleaseError
from edgeops.trust.metadata import check_target_path
from edgeops.trust.repository import TrustRepository

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.firmware import GeneratedLibrary
    from edgeops.registry import Registry

__all__ = [
    "RELEASE_RUNTIMES",
    "Release",
    "build_custom",
    "card_of",
    "card_text",
    "check_firmware_target",
    "firmware_archive",
    "firmware_targets",
    "parse_hardware",
    "release_model",
    "released_cards",
    "target_path",
]

RELEASE_RUNTIMES = ("litert", "onnx", "mcu")
_FORMAT = {"litert": "tflite", "onnx": "onnx", "mcu": "tflite"}
_CARD_RUNTIME = {"litert": "litert", "onnx": "onnx", "mcu": "tflm"}
QEMU_SAMPLES = 8
"""Inputs run under QEMU for the instructions per inference: the card's test vectors, then
seeded random int8 tensors up to this count."""
_TAG = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Release:
    """One released target: where it is, what it holds, and the role versions after it."""

    path: str
    length: int
    sha256: str
    runtime: str
    model_id: str
    custom: dict[str, Any]
    versions: dict[str, int]

    @classmethod
    def of(cls, target: TargetFile, versions: Mapping[str, int]) -> Release:
        custom = dict(target.custom) if isinstance(target.custom, Mapping) else {}
        edgeops = custom.get("edgeops")
        try:
            model_id = str(card_of(custom).get("model_id", ""))
        except ReleaseError:
            model_id = ""
        return cls(
            path=target.path,
            length=target.length,
            sha256=target.hashes["sha256"],
            runtime=str(edgeops.get("runtime", "")) if isinstance(edgeops, dict) else "",
            model_id=model_id,
            custom=custom,
            versions=dict(versions),
        )

    def to_dict(self, *, with_custom: bool = False) -> dict[str, Any]:
        document: dict[str, Any] = {
            "target": self.path,
            "length": self.length,
            "sha256": self.sha256,
            "runtime": self.runtime,
            "model_id": self.model_id,
            "versions": self.versions,
        }
        if with_custom:
            document["custom"] = self.custom
        return document


def target_path(name: str, seq: int | str, runtime: str, *, firmware: str | None = None) -> str:
    """``{name}/{seq}/{runtime}/model.{tflite|onnx}``; with ``firmware`` (runtime ``mcu``
    only) ``{name}/{seq}/mcu/firmware-{target}.tar``."""
    if runtime not in RELEASE_RUNTIMES:
        raise ReleaseError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}")
    if firmware is not None:
        check_firmware_target(runtime, firmware)
        return check_target_path(f"{name}/{seq}/{runtime}/firmware-{firmware}.tar")
    return check_target_path(f"{name}/{seq}/{runtime}/model.{_FORMAT[runtime]}")


def firmware_targets() -> tuple[str, ...]:
    """The firmware targets :mod:`edgeops.firmware` generates for."""
    from edgeops.firmware import TARGETS

    return tuple(TARGETS)


def check_firmware_target(runtime: str, target: str) -> None:
    """ReleaseError unless ``target`` is a firmware target and ``runtime`` is ``mcu``."""
    if runtime != "mcu":
        raise ReleaseError(
            f"firmware is released for runtime mcu, not {runtime}; use --runtime mcu"
        )
    targets = firmware_targets()
    if target not in targets:
        raise ReleaseError(f"unknown firmware target {target!r}; targets: {', '.join(targets)}")


def parse_hardware(spec: str | None) -> dict[str, list[str]]:
    """``"arch=x86_64|aarch64,board=rpi4"`` as ``{"arch": ["x86_64", "aarch64"], ...}``."""
    if spec is None or not spec.strip():
        return {}
    tags: dict[str, list[str]] = {}
    for item in spec.split(","):
        key, sep, values = item.strip().partition("=")
        key = key.strip()
        choices = [value.strip() for value in values.split("|")]
        if not sep or not _TAG.fullmatch(key) or not all(_TAG.fullmatch(v) for v in choices):
            raise HardwareTagsError(
                f"hardware tag {item.strip()!r} must be KEY=VALUE[|VALUE...] of letters, "
                "digits, '.', '_', '-' (e.g. arch=x86_64|aarch64)"
            )
        if key in tags:
            raise HardwareTagsError(f"hardware tag {key!r} is given twice")
        tags[key] = list(dict.fromkeys(choices))
    return tags


def card_text(card: ModelCard) -> str:
    """The card as compact JSON text, as it travels in ``custom.edgeops.card``."""
    return json.dumps(card.to_dict(), separators=(",", ":"), sort_keys=True, allow_nan=False)


def card_of(custom: Mapping[str, Any]) -> dict[str, Any]:
    """The card's JSON object from a target's custom metadata (text or, if float-free, an
    object)."""
    edgeops = custom.get("edgeops")
    card = edgeops.get("card") if isinstance(edgeops, Mapping) else None
    if isinstance(card, str):
        try:
            card = json.loads(card)
        except ValueError as exc:
            raise ReleaseError(f"custom.edgeops.card is not JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ReleaseError("custom.edgeops.card is missing or not a JSON object")
    return card


def released_cards(repository: TrustRepository) -> dict[str, list[dict[str, Any]]]:
    """The cards of every target in the repository's current targets metadata, by model id.

    A model released more than once (several runtimes, or the same model again) has one card
    per target, in target path order. Targets without a readable card are left out.
    """
    cards: dict[str, list[dict[str, Any]]] = {}
    for target in repository.targets():
        custom = target.custom if isinstance(target.custom, Mapping) else {}
        try:
            card = card_of(custom)
        except ReleaseError:
            continue
        model_id = card.get("model_id")
        if isinstance(model_id, str) and model_id:
            cards.setdefault(model_id, []).append(card)
    return cards


def build_custom(
    card: ModelCard,
    runtime: str,
    hardware: Mapping[str, Sequence[str]] | None = None,
    min_free_memory_bytes: int | None = None,
) -> dict[str, Any]:
    """The custom metadata (compatibility contract) of a target; see the module docstring."""
    if runtime not in RELEASE_RUNTIMES:
        raise ReleaseError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}")
    if min_free_memory_bytes is not None and min_free_memory_bytes < 0:
        raise ReleaseError(f"minimum free memory {min_free_memory_bytes} is negative")
    return {
        "edgeops": {
            "card": card_text(card),
            "hardware": {key: list(values) for key, values in (hardware or {}).items()},
            "min_free_memory_bytes": min_free_memory_bytes,
            "runtime": runtime,
        }
    }


def release_model(
    repository: TrustRepository,
    model_ref: str,
    *,
    registry: Registry,
    datasets: DatasetService,
    runtime: str = "litert",
    hardware: Mapping[str, Sequence[str]] | None = None,
    min_free_memory_bytes: int | None = None,
    firmware: str | None = None,
) -> Release:
    """Export ``model_ref`` for ``runtime`` and publish it as a new target.

    ``firmware`` (a firmware target, runtime ``mcu`` only) publishes the generated firmware
    instead of the .tflite (see the module docstring).

    Raises TrustNotInitialisedError before any work if the repository does not exist,
    ModelNotFoundError for an unknown model, ReleaseError if the model does not fit the
    runtime (an int8 .tflite cannot become .onnx; ``mcu`` needs a full-int8 model), the
    firmware target is unknown, or the generated firmware does not fit the target. Nothing
    is published on any error.
    """
    if runtime not in RELEASE_RUNTIMES:
        raise ReleaseError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}")
    if firmware is not None:
        check_firmware_target(runtime, firmware)
    repository.root()  # TrustNotInitialisedError before the (slow) export
    view = registry.get_model(model_ref)
    path = target_path(view.name, view.seq, runtime, firmware=firmware)
    if runtime == "mcu" and view.format != "tflite":  # refused before the (slow) export
        raise ReleaseError(
            f"cannot release {view.ref} ({view.id}) for runtime mcu: it is not a full-int8 "
            f".tflite model (quantization none: a .{view.format} model); compress it with "
            "--quantize int8 first"
        )
    try:
        result = export_artifact(
            view,
            _FORMAT[runtime],
            registry=registry,
            datasets=datasets,
            runtime=_CARD_RUNTIME[runtime],
        )
    except UnsupportedExportError as exc:
        raise ReleaseError(f"cannot release {view.ref} for runtime {runtime}: {exc}") from None
    card = result.card
    artifact = result.artifact
    if runtime == "mcu":
        if card.quantization.mode != "int8" or card.arena_bytes is None:
            raise ReleaseError(
                f"cannot release {view.ref} ({view.id}) for runtime mcu: it is not a full-int8 "
                f".tflite model (quantization {card.quantization.mode}); compress it with "
                "--quantize int8 first"
            )
        card = dataclasses.replace(card, runtime=_CARD_RUNTIME[runtime])
        if firmware is not None:
            card, artifact = build_firmware_release(
                artifact, card, firmware, prefix=f"{view.name}-{view.seq}-{firmware}"
            )
    custom = build_custom(card, runtime, hardware, min_free_memory_bytes)
    target = repository.add_target(path, artifact, custom)
    return Release.of(target, repository.versions())


def build_firmware_release(
    tflite: bytes, card: ModelCard, target: str, *, prefix: str
) -> tuple[ModelCard, bytes]:
    """The card and archive of ``tflite`` generated as firmware for ``target``.

    ``card`` is the model's ``tflm`` card (test vectors, TFLM's arena); the card returned has
    runtime ``firmware`` and the :class:`~device_agent.card.Firmware` record. ReleaseError
    (one line) if the model cannot be generated, does not fit the target, or its firmware
    fails to build or run.
    """
    from edgeops.firmware import FirmwareError, generate
    from edgeops.firmware.targets import estimate_usage, get_target

    where = f"cannot release {card.name}:{card.version} as firmware for {target}"
    with tempfile.TemporaryDirectory(prefix="edgeops-firmware-") as tmp:
        work = Path(tmp)
        library_dir = work / prefix
        try:
            library = generate(tflite, library_dir, target=target)
            constants = estimate_usage(
                library.files["edgeops_model.c"],
                arena_bytes=library.arena_bytes,
                input_size=library.input_size,
                output_size=library.output_size,
            ).constant_bytes
            record = Firmware(
                target=target,
                arena_bytes=library.arena_bytes,
                constant_bytes=constants,
                tflm_arena_bytes=card.arena_bytes,
                measured_with="generated sources (arena; constant arrays and parameter structs)",
            )
            files = _directory_files(library_dir, prefix)
            if get_target(target).qemu_machine is not None:
                measured = _measure_on_qemu(library_dir, work, target, card, library)
                if measured is not None:
                    built, elf = measured
                    record = dataclasses.replace(built, constant_bytes=constants)
                    files[f"{prefix}/firmware.elf"] = (elf, 0o755)
        except FirmwareError as exc:
            raise ReleaseError(f"{where}: {exc}") from None
    archive = firmware_archive(files)
    lineage = {
        **card.lineage,
        "generated_from_sha256": hashlib.sha256(bytes(tflite)).hexdigest(),
        "artifact_sha256": hashlib.sha256(archive).hexdigest(),
    }
    released = dataclasses.replace(
        card,
        runtime=FIRMWARE_CARD_RUNTIME,
        firmware=record,
        arena_bytes=record.arena_bytes,
        flash_bytes=record.flash_bytes,
        lineage=lineage,
    )
    return released, archive


def _measure_on_qemu(
    library_dir: Path, work: Path, target: str, card: ModelCard, library: GeneratedLibrary
) -> tuple[Firmware, bytes] | None:
    """The footprint and instructions per inference of a bare-metal build with the
    semihosting harness, and the ELF built with the serial harness (the one released); None
    if the Arm toolchain or QEMU is not installed. The inputs are the card's test vectors of
    the library's input size, filled up with seeded random ones (float32 tensors that
    quantize across the whole int8 range for a model with a float input)."""
    import numpy as np

    from edgeops.firmware import cortexm
    from edgeops.firmware.conformance import random_float_inputs

    if not cortexm.toolchain_available():
        return None
    input_size, output_size = library.input_size, library.output_size
    dtype = np.float32 if library.float_input else np.int8
    elf = cortexm.build_firmware(library_dir, work / "build", target)
    footprint = cortexm.measure_footprint(library_dir, target, build_dir=work / "measure")
    vectors = [
        np.asarray(vector["input"], dtype=dtype).reshape(-1)
        for vector in card.test_vectors
        if np.asarray(vector["input"]).size == input_size
    ][:QEMU_SAMPLES]
    missing = QEMU_SAMPLES - len(vectors)
    if missing > 0 and library.float_input:
        scale, zero_point = library.input_quantization
        vectors.extend(random_float_inputs(input_size, missing, scale, zero_point))
    elif missing > 0:
        rng = np.random.default_rng(0)
        vectors.extend(rng.integers(-128, 128, (missing, input_size)).astype(np.int8))
    ran = cortexm.run_qemu(
        elf, np.stack(vectors), output_size, target, float_output=library.float_output
    )
    record = Firmware(
        target=target,
        arena_bytes=footprint.arena_bytes,
        constant_bytes=None,
        text_bytes=footprint.text,
        rodata_bytes=footprint.rodata,
        data_bytes=footprint.data,
        bss_bytes=footprint.bss,
        flash_bytes=footprint.flash_bytes,
        ram_bytes=footprint.ram_bytes,
        instructions_per_inference=ran.instructions_per_inference,
        tflm_arena_bytes=card.arena_bytes,
        measured_with=(
            "arm-none-eabi-size (the library's share of the linked harness), qemu-system-arm "
            f"-icount (mean over {len(vectors)} inputs), constants from the generated sources"
        ),
    )
    serial = cortexm.build_firmware(library_dir, work / "serial-build", target, harness="serial")
    return record, serial.read_bytes()


def _directory_files(directory: Path, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every regular file under ``directory`` as ``{prefix}/{relative path}``: (bytes, mode)."""
    files: dict[str, tuple[bytes, int]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            files[f"{prefix}/{path.relative_to(directory).as_posix()}"] = (path.read_bytes(), mode)
    return files


def firmware_archive(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """A deterministic tar of ``files`` (name: (bytes, mode)): sorted names, mtime 0, owner
    and group 0 without names, ustar format, no compression; the same files give the same
    bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in sorted(files):
            data, mode = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
