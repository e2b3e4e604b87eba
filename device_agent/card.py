"""The model card: what a model needs, does and was measured to do, as one document.

The hub writes it when a model is exported or registered; it travels inside a release's TUF
target metadata (the model's compatibility contract) and the agent reads it before installing
the model. This module is the one definition both sides use (stdlib only: it runs on devices).

A card is JSON (``to_dict`` / ``from_dict``, lossless: fields this version does not know are
kept in ``extra`` and written back) and Markdown (``to_markdown``, for people)::

    {
      "schema": 1,
      "model_id": "m-3f2a9c01b7de", "version": "4", "name": "digits-cnn",
      "task": "classification", "runtime": "litert",
      "quantization": {"mode": "int8",
                       "input":  {"scale": 0.0039, "zero_point": -128, "dtype": "int8"},
                       "output": {"scale": 0.0039, "zero_point": -128, "dtype": "int8"}},
      "input_spec":  {"name": "input", "shape": [1, 8, 8, 1], "dtype": "int8"},
      "output_spec": {"name": "output", "shape": [1, 10], "dtype": "int8"},
      "op_set": ["CONV_2D", "FULLY_CONNECTED", "SOFTMAX"],
      "arena_bytes": 12288, "flash_bytes": 20480,
      "preprocessing": {...FeatureRule.to_dict()...},
      "reference": {...ReferenceStats.to_dict()...},
      "test_vectors": [{"input": [[...]], "expected_output": [[...]]}],
      "metrics": {"accuracy": 0.97}, "lineage": {"dataset_version": "...", "parent_id": "..."},
      "min_agent_version": "0.1.0",
      "firmware": {...Firmware.to_dict()...}          # only for runtime "firmware"
    }

A card of runtime ``firmware`` describes a model generated as interpreter-free C
(``edgeops.firmware``) for a microcontroller target; its ``firmware`` object records the target
and the generated library's footprint (see :class:`Firmware`), and the card's own
``arena_bytes`` and ``flash_bytes`` are the library's. Other cards have no ``firmware`` field.

Shapes use ``null`` for a dimension fixed only at run time (a dynamic batch). Tensor
quantization parameters map real values to stored ones: ``q = round(x / scale) + zero_point``.
``version`` is the registry's per-name sequence number, as text; ``model_id`` and ``version``
are empty until the registry records the model.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from device_agent.errors import ProtocolError

__all__ = [
    "CARD_SCHEMA_VERSION",
    "QUANTIZATION_MODES",
    "RUNTIMES",
    "CardError",
    "Firmware",
    "ModelCard",
    "Quantization",
    "TensorQuantization",
    "TensorSpec",
]

CARD_SCHEMA_VERSION = 1
RUNTIMES = ("keras", "litert", "onnx", "tflm", "firmware")
"""What runs the model: ``firmware`` is the model generated as C for a microcontroller (no
interpreter); ``tflm`` a .tflite on TensorFlow Lite Micro."""
QUANTIZATION_MODES = ("none", "dynamic", "float16", "int8", "int16x8")


class CardError(ProtocolError):
    """A model card that is malformed: the message names the field, expected and actual value.

    A card reaches a device from the network, so it is untrusted input like any payload.
    """


# -- parts ------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    """One input or output tensor: its name, shape (``None`` for a run-time dimension), dtype."""

    name: str
    shape: list[int | None]
    dtype: str

    def __post_init__(self) -> None:
        # NumPy integers become ints; a negative dimension (TFLite's -1) means "at run time"
        dims: list[int | None] = []
        for dim in self.shape:
            if dim is None:
                dims.append(None)
                continue
            try:
                value = operator.index(dim)
            except TypeError:
                raise CardError(
                    f"tensor {self.name!r}: shape must hold integers or null, got {dim!r}"
                ) from None
            dims.append(None if value < 0 else value)
        self.shape = dims

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "tensor spec") -> Self:
        data = _mapping(data, where)
        shape = _field(data, "shape", list, where)
        for dim in shape:
            if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 0):
                raise CardError(
                    f"{where}: field 'shape' must hold non-negative integers or null, got {dim!r}"
                )
        return cls(
            name=_field(data, "name", str, where),
            shape=list(shape),
            dtype=_field(data, "dtype", str, where),
        )

    def describe(self) -> str:
        dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
        return f"`{self.name}` {self.dtype} [{dims}]"


@dataclass
class TensorQuantization:
    """Affine quantization of one tensor: ``q = round(x / scale) + zero_point`` in ``dtype``."""

    scale: float
    zero_point: int
    dtype: str

    def __post_init__(self) -> None:
        self.scale = float(self.scale)  # NumPy scalars from interpreters become plain numbers
        self.zero_point = operator.index(self.zero_point)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "tensor quantization") -> Self:
        data = _mapping(data, where)
        scale = _number(data, "scale", where)
        if not scale > 0:
            raise CardError(f"{where}: field 'scale' must be a positive number, got {scale!r}")
        return cls(
            scale=scale,
            zero_point=_field(data, "zero_point", int, where),
            dtype=_field(data, "dtype", str, where),
        )


@dataclass
class Quantization:
    """How the model's numbers are stored: a mode, and the parameters of its input and output.

    ``mode`` is one of :data:`QUANTIZATION_MODES`; ``input``/``output`` are set when that tensor
    is quantized (full integer models), else None (the tensor is float).
    """

    mode: str = "none"
    input: TensorQuantization | None = None
    output: TensorQuantization | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "input": None if self.input is None else self.input.to_dict(),
            "output": None if self.output is None else self.output.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "quantization") -> Self:
        data = _mapping(data, where)
        mode = _field(data, "mode", str, where)
        if mode not in QUANTIZATION_MODES:
            raise CardError(
                f"{where}: field 'mode' must be one of {', '.join(QUANTIZATION_MODES)}, "
                f"got {mode!r}"
            )
        tensors: dict[str, TensorQuantization | None] = {}
        for key in ("input", "output"):
            value = data.get(key)
            tensors[key] = (
                None if value is None else TensorQuantization.from_dict(value, f"{where}.{key}")
            )
        return cls(mode=mode, input=tensors["input"], output=tensors["output"])


@dataclass
class Firmware:
    """The generated firmware of a ``firmware`` card: its target and what it takes.

    Every size is the generated library's own share (the model and its kernels, not the
    board's start-up code or a test harness), in bytes::

        {"target": "mps2-an385", "arena_bytes": 1536, "constant_bytes": 5210,
         "text_bytes": 4100, "rodata_bytes": 5240, "data_bytes": 0, "bss_bytes": 1536,
         "flash_bytes": 9340, "ram_bytes": 1536, "instructions_per_inference": 181234,
         "tflm_arena_bytes": 3720, "measured_with": "arm-none-eabi-size, qemu-system-arm -icount"}

    ``arena_bytes`` (the static arena the memory plan needs) and ``constant_bytes`` (the
    constant data the generated model declares: weights, biases, multipliers, shifts, and
    operator parameters counted at the largest parameter struct's size) are known from the
    generated sources on any target. ``text_bytes`` .. ``bss_bytes`` are the sections
    ``arm-none-eabi-size`` reports for a build; ``flash_bytes`` is text + rodata + data and
    ``ram_bytes`` data + bss (the arena included); ``instructions_per_inference`` is the mean
    count of instructions one invoke executes under QEMU with ``-icount`` (a latency proxy).
    Those are null where nothing was built or run (targets built by the user's own SDK).
    ``tflm_arena_bytes`` is TensorFlow Lite Micro's arena for the same model, for
    comparison. ``measured_with`` says which tools gave the figures.
    """

    target: str
    arena_bytes: int
    constant_bytes: int | None = None
    text_bytes: int | None = None
    rodata_bytes: int | None = None
    data_bytes: int | None = None
    bss_bytes: int | None = None
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    instructions_per_inference: int | None = None
    tflm_arena_bytes: int | None = None
    measured_with: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields this version does not know; written back unchanged."""

    _SIZES: ClassVar[tuple[str, ...]] = (
        "constant_bytes",
        "text_bytes",
        "rodata_bytes",
        "data_bytes",
        "bss_bytes",
        "flash_bytes",
        "ram_bytes",
        "instructions_per_inference",
        "tflm_arena_bytes",
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            **_copy(self.extra),
            "target": self.target,
            "arena_bytes": self.arena_bytes,
            **{key: getattr(self, key) for key in self._SIZES},
            "measured_with": self.measured_with,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "firmware") -> Self:
        data = _mapping(data, where)
        target = _field(data, "target", str, where)
        if not target:
            raise CardError(f"{where}: field 'target' must name a firmware target, got ''")
        arena = _optional_size(data, "arena_bytes", where)
        if arena is None:
            raise CardError(f"{where}: missing field 'arena_bytes'")
        known = {"target", "arena_bytes", "measured_with", *cls._SIZES}
        return cls(
            target=target,
            arena_bytes=arena,
            measured_with=_field(data, "measured_with", str, where, default=""),
            extra={k: _copy(v) for k, v in data.items() if k not in known},
            **{key: _optional_size(data, key, where) for key in cls._SIZES},
        )

    def facts(self) -> list[tuple[str, str]]:
        """(field, value) rows for people."""
        rows = [("target", self.target), ("arena bytes", _bytes(self.arena_bytes))]
        rows += [
            (label, _bytes(getattr(self, key)))
            for label, key in (
                ("constant bytes (weights, biases, parameters)", "constant_bytes"),
                ("flash bytes (text + rodata + data)", "flash_bytes"),
                ("RAM bytes (data + bss, arena included)", "ram_bytes"),
                ("text", "text_bytes"),
                ("rodata", "rodata_bytes"),
                ("data", "data_bytes"),
                ("bss", "bss_bytes"),
                ("TFLite Micro arena bytes", "tflm_arena_bytes"),
            )
        ]
        per_inference = self.instructions_per_inference
        rows.append(
            (
                "instructions per inference",
                "n/a" if per_inference is None else f"{per_inference:,}",
            )
        )
        rows.append(("measured with", self.measured_with or "n/a"))
        return rows


# -- the card ---------------------------------------------------------------------------------


@dataclass
class ModelCard:
    """A model's card. See the module docstring for the JSON form.

    ``quantization``, ``input_spec`` and ``output_spec`` may also be given as their JSON
    objects (dicts); they are parsed into the typed parts on construction.
    """

    model_id: str
    version: str
    name: str
    task: str
    runtime: str
    quantization: Quantization
    input_spec: TensorSpec
    output_spec: TensorSpec
    op_set: list[str] = field(default_factory=list)
    arena_bytes: int | None = None
    flash_bytes: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    test_vectors: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    min_agent_version: str = "0.1.0"
    firmware: Firmware | None = None
    """The generated firmware (runtime ``firmware`` only); None for every other runtime."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of the JSON document this version does not know; written back unchanged."""

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "model_id",
        "version",
        "name",
        "task",
        "runtime",
        "quantization",
        "input_spec",
        "output_spec",
        "op_set",
        "arena_bytes",
        "flash_bytes",
        "preprocessing",
        "reference",
        "test_vectors",
        "metrics",
        "lineage",
        "min_agent_version",
        "firmware",
    )

    def __post_init__(self) -> None:
        # Lenient construction from JSON-shaped parts; from_dict does the strict checking.
        parts: Any = self
        if isinstance(parts.quantization, Mapping):
            self.quantization = Quantization.from_dict(parts.quantization)
        if isinstance(parts.input_spec, Mapping):
            self.input_spec = TensorSpec.from_dict(parts.input_spec, "input_spec")
        if isinstance(parts.output_spec, Mapping):
            self.output_spec = TensorSpec.from_dict(parts.output_spec, "output_spec")
        if isinstance(parts.firmware, Mapping):
            self.firmware = Firmware.from_dict(parts.firmware)
        if self.runtime not in RUNTIMES:
            raise CardError(
                f"model card: field 'runtime' must be one of {', '.join(RUNTIMES)}, "
                f"got {self.runtime!r}"
            )
        if (self.runtime == "firmware") != (self.firmware is not None):
            raise CardError(
                "model card: field 'firmware' must be an object for runtime 'firmware' and "
                f"absent for any other; runtime is {self.runtime!r} and firmware is "
                + ("absent" if self.firmware is None else "present")
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this card, unknown fields included (``firmware`` only when
        set, so the cards of other runtimes read as before)."""
        document = {
            **self.extra,
            "schema": CARD_SCHEMA_VERSION,
            "model_id": self.model_id,
            "version": self.version,
            "name": self.name,
            "task": self.task,
            "runtime": self.runtime,
            "quantization": self.quantization.to_dict(),
            "input_spec": self.input_spec.to_dict(),
            "output_spec": self.output_spec.to_dict(),
            "op_set": list(self.op_set),
            "arena_bytes": self.arena_bytes,
            "flash_bytes": self.flash_bytes,
            "preprocessing": _copy(self.preprocessing),
            "reference": _copy(self.reference),
            "test_vectors": _copy(self.test_vectors),
            "metrics": _copy(self.metrics),
            "lineage": _copy(self.lineage),
            "min_agent_version": self.min_agent_version,
        }
        if self.firmware is not None:
            document["firmware"] = self.firmware.to_dict()
        return document

    def to_json(self) -> str:
        """The card as JSON text (sorted keys, indented); NaN and infinity are refused."""
        try:
            return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise CardError(f"model card {self.name!r} cannot be written as JSON: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parse and check a card's JSON object; CardError names the first bad field. The
        card shares nothing with ``data``."""
        return cls._parse(data, _copy)

    @classmethod
    def _parse(cls, data: Mapping[str, Any], copy: Callable[[Any], Any]) -> Self:
        """:meth:`from_dict`, with ``copy`` applied to the free-form parts: a deep copy, or
        nothing when ``data`` was made for this card alone (:meth:`from_json`)."""
        where = "model card"
        data = _mapping(data, where)
        schema = data.get("schema", CARD_SCHEMA_VERSION)
        if schema != CARD_SCHEMA_VERSION:
            raise CardError(
                f"{where}: field 'schema' must be {CARD_SCHEMA_VERSION}, got {schema!r}; "
                "this card was written by a newer EdgeOps"
            )
        vectors = _field(data, "test_vectors", list, where, default=[])
        for index, vector in enumerate(vectors):
            label = f"{where}: test_vectors[{index}]"
            _mapping(vector, label)
            for key in ("input", "expected_output"):
                if key not in vector:
                    raise CardError(f"{label}: missing field {key!r}")
        op_set = _field(data, "op_set", list, where, default=[])
        if not all(isinstance(op, str) for op in op_set):
            raise CardError(f"{where}: field 'op_set' must be a list of strings")
        firmware = data.get("firmware")
        if firmware is not None:
            firmware = Firmware.from_dict(_field(data, "firmware", dict, where))
        return cls(
            model_id=_field(data, "model_id", str, where),
            version=_field(data, "version", str, where),
            name=_field(data, "name", str, where),
            task=_field(data, "task", str, where),
            runtime=_field(data, "runtime", str, where),
            quantization=Quantization.from_dict(
                _field(data, "quantization", dict, where), "quantization"
            ),
            input_spec=TensorSpec.from_dict(_field(data, "input_spec", dict, where), "input_spec"),
            output_spec=TensorSpec.from_dict(
                _field(data, "output_spec", dict, where), "output_spec"
            ),
            op_set=list(op_set),
            arena_bytes=_optional_size(data, "arena_bytes", where),
            flash_bytes=_optional_size(data, "flash_bytes", where),
            preprocessing=copy(_field(data, "preprocessing", dict, where, default={})),
            reference=copy(_field(data, "reference", dict, where, default={})),
            test_vectors=copy(vectors),
            metrics=copy(_field(data, "metrics", dict, where, default={})),
            lineage=copy(_field(data, "lineage", dict, where, default={})),
            min_agent_version=_field(data, "min_agent_version", str, where, default="0.1.0"),
            firmware=firmware,
            extra={k: copy(v) for k, v in data.items() if k not in {*cls._FIELDS, "schema"}},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CardError(f"model card is not valid JSON: {exc}") from exc
        return cls._parse(data, _identity)  # json.loads made data for this card alone

    def to_markdown(self) -> str:
        """The card for people: facts, tensors, resources, metrics, lineage, preprocessing."""
        title = self.name + (f" v{self.version}" if self.version else "")
        lines = [f"# Model card: {title}", ""]
        facts: list[tuple[str, str]] = [
            ("model id", self.model_id or "(not registered)"),
            ("task", self.task),
            ("runtime", self.runtime),
            ("quantization", self.quantization.mode),
            ("input", self.input_spec.describe()),
            ("output", self.output_spec.describe()),
            ("arena bytes", _bytes(self.arena_bytes)),
            ("flash bytes", _bytes(self.flash_bytes)),
            ("minimum agent version", self.min_agent_version),
            ("test vectors", str(len(self.test_vectors))),
        ]
        lines += _table(("field", "value"), facts)
        tensors = [
            (label, q)
            for label, q in (
                ("input", self.quantization.input),
                ("output", self.quantization.output),
            )
            if q is not None
        ]
        if tensors:
            lines += ["", "## Quantization parameters", ""]
            lines += _table(
                ("tensor", "dtype", "scale", "zero point"),
                [(label, q.dtype, f"{q.scale:.6g}", str(q.zero_point)) for label, q in tensors],
            )
        if self.firmware is not None:
            lines += ["", "## Firmware", ""]
            lines += _table(("field", "value"), self.firmware.facts())
        lines += ["", "## Operators", ""]
        lines.append(", ".join(f"`{op}`" for op in self.op_set) if self.op_set else "(not listed)")
        if self.metrics:
            lines += ["", "## Metrics", ""]
            lines += _table(("metric", "value"), _flat_items(self.metrics))
        if self.lineage:
            lines += ["", "## Lineage", ""]
            lines += _table(("field", "value"), _flat_items(self.lineage))
        if self.preprocessing:
            lines += ["", "## Preprocessing", "", "```json"]
            lines.append(json.dumps(self.preprocessing, indent=2, sort_keys=True, default=str))
            lines.append("```")
        if self.reference:
            lines += ["", "## Reference statistics", ""]
            lines.append(_describe_reference(self.reference))
        if self.extra:
            lines += ["", "## Other fields", ""]
            lines += _table(("field", "value"), _flat_items(self.extra))
        return "\n".join(lines) + "\n"


# -- helpers ----------------------------------------------------------------------------------

_MISSING: Any = object()


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise CardError(f"{where} must be a JSON object, got {_json_type(data)}")
    return data


def _field(
    data: Mapping[str, Any], key: str, kind: type, where: str, *, default: Any = _MISSING
) -> Any:
    if key not in data or (data[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise CardError(f"{where}: missing field {key!r}")
        return default
    value = data[key]
    if isinstance(value, bool) and kind is not bool:  # bool is an int in Python
        raise CardError(f"{where}: field {key!r} must be {kind.__name__}, got a boolean")
    if kind is dict:
        kind = Mapping
    if not isinstance(value, kind):
        raise CardError(
            f"{where}: field {key!r} must be {_JSON_NAMES.get(kind, kind.__name__)}, "
            f"got {_json_type(value)}"
        )
    return value


_JSON_NAMES: dict[type, str] = {Mapping: "an object", list: "a list", str: "a string", int: "int"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return {str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key, _MISSING)
    if value is _MISSING:
        raise CardError(f"{where}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CardError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _optional_size(data: Mapping[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CardError(f"{where}: field {key!r} must be a non-negative integer or null")
    return value


def _identity(value: Any) -> Any:
    return value


def _copy(value: Any) -> Any:
    """A deep copy of a JSON-shaped value (dicts, lists, scalars), so cards share nothing."""
    if isinstance(value, Mapping):
        return {str(k): _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,} ({value / 1024:.1f} KiB)"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def _flat_items(document: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key in sorted(document):
        value = document[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flat_items(value, name + ".")
        elif isinstance(value, float):
            rows.append((name, f"{value:.6g}"))
        else:
            rows.append(
                (name, json.dumps(value, default=str) if not isinstance(value, str) else value)
            )
    return rows


def _describe_reference(reference: Mapping[str, Any]) -> str:
    parts = []
    edges = reference.get("feature_edges")
    if isinstance(edges, list):
        bins = max((len(e) + 1 for e in edges if isinstance(e, list)), default=0)
        parts.append(f"{len(edges)} feature histograms (up to {bins} bins each)")
    classes = reference.get("class_counts")
    if isinstance(classes, list):
        parts.append(f"class histogram over {len(classes)} classes")
    if isinstance(reference.get("confidence_counts"), list):
        parts.append("confidence histogram")
    return "; ".join(parts) + "." if parts else "(present; see the JSON card)"
