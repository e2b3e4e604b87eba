"""A model bundle: a directory holding ``card.json`` and exactly one model file.

::

    <bundle>/card.json       the model card (device_agent.card.ModelCard)
    <bundle>/model.tflite    or model.onnx: the model the card describes
    <bundle>/firmware.tar    or, for a card of runtime ``firmware``, the released firmware
                             archive: it holds ``<prefix>/firmware.elf``, the image a
                             microcontroller runs (flashed by :mod:`device_agent.gateway`)

Everything is checked on load, before any runtime touches the model: the card parses, its
preprocessing rule and reference statistics parse, the model file exists, is not empty and
matches the card's runtime, and the rule's model input holds as many elements as the card's
input tensor.

Parsing a card is most of a bundle's load (a card carries its test vectors and reference
histograms), and an update loads the same card several times (install, smoke test, activation,
the state report). :func:`parse_card` therefore parses a card's bytes once per process: the
last :data:`PARSED_CARDS` distinct cards are kept, keyed by the SHA-256 of their bytes, with the
preprocessing rule and reference statistics derived from them. Only what follows from those
exact bytes is kept (a card that does not parse is parsed, and refused, every time); what
depends on the directory (the model file, its format) is checked at every load. Bundles loaded
from the same bytes share the card and these objects, which nothing in the agent changes.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from device_agent.card import CardError, ModelCard
from device_agent.features import FeatureRule, FeatureRuleError
from device_agent.runtime._errors import BundleError
from device_agent.sketch import ReferenceStats, SketchError

__all__ = [
    "CARD_FILE",
    "MODEL_FILES",
    "MODEL_FILE_OF_FORMAT",
    "PARSED_CARDS",
    "ModelBundle",
    "model_file_name",
    "parse_card",
]

CARD_FILE = "card.json"
MODEL_FILES = {"model.tflite": "tflite", "model.onnx": "onnx", "firmware.tar": "firmware"}
"""The model file names a bundle may hold (one of them), and the format each one means."""

MODEL_FILE_OF_FORMAT = {fmt: name for name, fmt in MODEL_FILES.items()}
"""The file name of each format."""

_FORMATS_OF_RUNTIME = {"litert": "tflite", "tflm": "tflite", "onnx": "onnx", "firmware": "firmware"}

PARSED_CARDS = 8
"""Distinct cards kept parsed per process (the two slots' and a download's, with room)."""


class _ParsedCards:
    """The last :data:`PARSED_CARDS` cards parsed, by the SHA-256 of their bytes, each with
    what a bundle derives from it (filled on the first load of a bundle holding it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._cards: OrderedDict[bytes, ModelCard] = OrderedDict()
        self._derived: dict[bytes, tuple[FeatureRule, ReferenceStats | None]] = {}

    def card(self, data: bytes) -> tuple[bytes, ModelCard]:
        """The digest of ``data`` and the card it holds (CardError if it holds none)."""
        digest = hashlib.sha256(data).digest()
        with self._lock:
            card = self._cards.get(digest)
            if card is not None:
                self._cards.move_to_end(digest)
                return digest, card
        card = ModelCard.from_json(data)  # outside the lock: other agents' loads go on
        with self._lock:
            self._cards[digest] = card
            self._cards.move_to_end(digest)
            while len(self._cards) > self.size:
                old, _ = self._cards.popitem(last=False)
                self._derived.pop(old, None)
        return digest, card

    def derived(self, digest: bytes) -> tuple[FeatureRule, ReferenceStats | None] | None:
        with self._lock:
            return self._derived.get(digest)

    def keep_derived(
        self, digest: bytes, rule: FeatureRule, reference: ReferenceStats | None
    ) -> None:
        with self._lock:
            if digest in self._cards:
                self._derived[digest] = (rule, reference)


_PARSED = _ParsedCards(PARSED_CARDS)


def model_file_name(card: ModelCard) -> str:
    """The name of the model file a bundle of ``card`` holds (``model.tflite`` if the card's
    runtime names no other format)."""
    return MODEL_FILE_OF_FORMAT[_FORMATS_OF_RUNTIME.get(card.runtime, "tflite")]


def parse_card(data: bytes) -> ModelCard:
    """``ModelCard.from_json(data)``, parsed once per process for the same bytes (see the
    module docstring); CardError if ``data`` is not a valid card. Treat the card as
    read-only: it may be shared."""
    return _PARSED.card(data)[1]


@dataclass(frozen=True)
class ModelBundle:
    """A loaded, checked bundle (see the module docstring). Build it with :meth:`load`."""

    directory: Path
    card: ModelCard
    model_path: Path
    format: str
    """``"tflite"``, ``"onnx"`` or ``"firmware"`` (a firmware archive for an attached
    microcontroller)."""
    rule: FeatureRule
    reference: ReferenceStats | None

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @classmethod
    def load(cls, directory: Path) -> ModelBundle:
        """Read and check the bundle in ``directory``; BundleError naming the path if bad."""
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"model bundle {directory}: not a directory")
        card_path = directory / CARD_FILE
        try:
            digest, card = _PARSED.card(card_path.read_bytes())
        except FileNotFoundError:
            raise BundleError(f"model bundle {directory}: {CARD_FILE} is missing") from None
        except OSError as exc:
            raise BundleError(f"model bundle {directory}: cannot read {card_path}: {exc}") from exc
        except CardError as exc:
            raise BundleError(f"model bundle {directory}: {card_path}: {exc}") from exc
        model_path, format = _model_file(directory)
        expected = _FORMATS_OF_RUNTIME.get(card.runtime)
        if expected != format:
            raise BundleError(
                f"model bundle {directory}: the card's runtime is {card.runtime!r}, which does "
                f"not run {model_path.name}"
            )
        derived = _PARSED.derived(digest)
        if derived is not None:
            rule, reference = derived
        else:
            rule = _rule(card, card_path)
            reference = None
            if card.reference:
                try:
                    reference = ReferenceStats.from_dict(card.reference)
                except SketchError as exc:
                    raise BundleError(f"{card_path}: field 'reference': {exc}") from exc
            _PARSED.keep_derived(digest, rule, reference)
        return cls(
            directory=directory,
            card=card,
            model_path=model_path,
            format=format,
            rule=rule,
            reference=reference,
        )


def _model_file(directory: Path) -> tuple[Path, str]:
    present = [(directory / name, fmt) for name, fmt in MODEL_FILES.items()]
    present = [(path, fmt) for path, fmt in present if path.exists()]
    if not present:
        raise BundleError(
            f"model bundle {directory}: no model file; expected one of {', '.join(MODEL_FILES)}"
        )
    if len(present) > 1:
        raise BundleError(
            f"model bundle {directory}: holds {' and '.join(p.name for p, _ in present)}; "
            "a bundle holds exactly one model file"
        )
    path, format = present[0]
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"model bundle {directory}: cannot read {path}: {exc}") from exc
    if not path.is_file() or size == 0:
        raise BundleError(f"model file {path} is empty or not a regular file")
    return path, format


def _rule(card: ModelCard, card_path: Path) -> FeatureRule:
    """The card's preprocessing rule; an identity rule over the input tensor if it has none."""
    model_dims = card.input_spec.shape[1:]
    try:
        if card.preprocessing:
            rule = FeatureRule.from_dict(card.preprocessing)
        elif model_dims and all(d is not None for d in model_dims):
            rule = FeatureRule(
                input_shape=tuple(int(d) for d in model_dims if d is not None),
                offset=[0.0],
                scale=[1.0],
            )
        else:
            raise BundleError(
                f"{card_path}: no preprocessing rule, and the input tensor's shape "
                f"{card.input_spec.shape} does not say what one sample is"
            )
    except FeatureRuleError as exc:
        raise BundleError(f"{card_path}: field 'preprocessing': {exc}") from exc
    if model_dims and all(d is not None for d in model_dims):
        elements = math.prod(int(d) for d in model_dims if d is not None)
        if elements != math.prod(rule.model_input_shape):
            raise BundleError(
                f"{card_path}: the preprocessing rule makes model inputs of shape "
                f"{list(rule.model_input_shape)}, the input tensor is "
                f"{card.input_spec.shape}"
            )
    return rule
