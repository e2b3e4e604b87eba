"""A model bundle: a directory holding ``card.json`` and exactly one model file.

::

    <bundle>/card.json       the model card (device_agent.card.ModelCard)
    <bundle>/model.tflite    or model.onnx: the model the card describes

Everything is checked on load, before any runtime touches the model: the card parses, its
preprocessing rule and reference statistics parse, the model file exists, is not empty and
matches the card's runtime, and the rule's model input holds as many elements as the card's
input tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from device_agent.card import CardError, ModelCard
from device_agent.features import FeatureRule, FeatureRuleError
from device_agent.runtime._errors import BundleError
from device_agent.sketch import ReferenceStats, SketchError

__all__ = ["CARD_FILE", "MODEL_FILES", "ModelBundle"]

CARD_FILE = "card.json"
MODEL_FILES = {"model.tflite": "tflite", "model.onnx": "onnx"}
"""The model file names a bundle may hold (one of them), and the format each one means."""

_FORMATS_OF_RUNTIME = {"litert": "tflite", "tflm": "tflite", "onnx": "onnx"}


@dataclass(frozen=True)
class ModelBundle:
    """A loaded, checked bundle (see the module docstring). Build it with :meth:`load`."""

    directory: Path
    card: ModelCard
    model_path: Path
    format: str
    """``"tflite"`` or ``"onnx"``."""
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
            card = ModelCard.from_json(card_path.read_bytes())
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
        rule = _rule(card, card_path)
        reference = None
        if card.reference:
            try:
                reference = ReferenceStats.from_dict(card.reference)
            except SketchError as exc:
                raise BundleError(f"{card_path}: field 'reference': {exc}") from exc
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
