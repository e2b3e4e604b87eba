"""Releasing a registered model version: export it for a runtime and add it as a TUF target.

The target path is ``{model name}/{seq}/{runtime}/model.{tflite|onnx}`` and the target's
custom metadata is the model's compatibility contract, checked by the device before it
installs anything::

    {"edgeops": {"card": "{...ModelCard.to_dict() as compact JSON text...}",
                 "hardware": {"arch": ["x86_64", "aarch64"]},   # {} = any hardware
                 "min_free_memory_bytes": 123456,               # or null
                 "runtime": "litert"}}                          # litert | onnx | mcu

The card travels as JSON *text* (``json.loads`` gives the card's object): TUF signs the
canonical JSON form of metadata, which has no floating-point numbers, and a card is full of
them (quantization scales, test vectors, reference statistics, metrics).

Runtimes: ``litert`` (the .tflite as exported), ``onnx`` (the .onnx), ``mcu`` (a full-int8
.tflite for TensorFlow Lite Micro; the card's runtime becomes ``tflm``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import TargetFile

from device_agent.card import ModelCard
from edgeops.export import UnsupportedExportError, export_artifact
from edgeops.trust.errors import HardwareTagsError, ReleaseError
from edgeops.trust.metadata import check_target_path
from edgeops.trust.repository import TrustRepository

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import Registry

__all__ = [
    "RELEASE_RUNTIMES",
    "Release",
    "build_custom",
    "card_of",
    "card_text",
    "parse_hardware",
    "release_model",
    "released_cards",
    "target_path",
]

RELEASE_RUNTIMES = ("litert", "onnx", "mcu")
_FORMAT = {"litert": "tflite", "onnx": "onnx", "mcu": "tflite"}
_CARD_RUNTIME = {"litert": "litert", "onnx": "onnx", "mcu": "tflm"}
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


def target_path(name: str, seq: int | str, runtime: str) -> str:
    """``{name}/{seq}/{runtime}/model.{tflite|onnx}``."""
    if runtime not in RELEASE_RUNTIMES:
        raise ReleaseError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}")
    return check_target_path(f"{name}/{seq}/{runtime}/model.{_FORMAT[runtime]}")


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
) -> Release:
    """Export ``model_ref`` for ``runtime`` and publish it as a new target.

    Raises TrustNotInitialisedError before any work if the repository does not exist,
    ModelNotFoundError for an unknown model, ReleaseError if the model does not fit the
    runtime (an int8 .tflite cannot become .onnx; ``mcu`` needs a full-int8 model).
    """
    if runtime not in RELEASE_RUNTIMES:
        raise ReleaseError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}")
    repository.root()  # TrustNotInitialisedError before the (slow) export
    view = registry.get_model(model_ref)
    path = target_path(view.name, view.seq, runtime)
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
    if runtime == "mcu":
        if card.quantization.mode != "int8" or card.arena_bytes is None:
            raise ReleaseError(
                f"cannot release {view.ref} ({view.id}) for runtime mcu: it is not a full-int8 "
                f".tflite model (quantization {card.quantization.mode}); compress it with "
                "--quantize int8 first"
            )
        card = dataclasses.replace(card, runtime=_CARD_RUNTIME[runtime])
    custom = build_custom(card, runtime, hardware, min_free_memory_bytes)
    target = repository.add_target(path, result.artifact, custom)
    return Release.of(target, repository.versions())
