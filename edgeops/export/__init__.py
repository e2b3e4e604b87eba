"""Export: Keras models to device formats, with a model card measured on the target runtime.

    from edgeops.export import keras_to_tflite_float, keras_to_onnx, build_card, export

    flatbuffer = keras_to_tflite_float(model)          # float32, batch 1
    onnx_bytes = keras_to_onnx(model)                  # tf2onnx, checked against Keras (ORT)
    paths = export("digits-cnn", "tflite", Path("out"), registry=registry, datasets=datasets)
    export_artifact(view, "tflite", registry=registry, datasets=datasets, runtime="tflm")  # MCU

See docs/training.md.
"""

from edgeops.export.card import DEFAULT_TEST_VECTORS, build_card, op_set, quantization_mode
from edgeops.export.convert import ONNX_ATOL, ONNX_OPSET, keras_to_onnx, keras_to_tflite_float
from edgeops.export.errors import ConversionError, ExportError, UnsupportedExportError
from edgeops.export.service import (
    CARD_RUNTIMES,
    EXPORT_FORMATS,
    ExportResult,
    export,
    export_artifact,
    export_bundle,
)

__all__ = [
    "CARD_RUNTIMES",
    "DEFAULT_TEST_VECTORS",
    "EXPORT_FORMATS",
    "ONNX_ATOL",
    "ONNX_OPSET",
    "ConversionError",
    "ExportError",
    "ExportResult",
    "UnsupportedExportError",
    "build_card",
    "export",
    "export_artifact",
    "export_bundle",
    "keras_to_onnx",
    "keras_to_tflite_float",
    "op_set",
    "quantization_mode",
]
