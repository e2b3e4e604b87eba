"""The one way into TensorFlow: Keras 2 (``tf_keras``), quiet logs, lazy import.

Every hub module that needs TensorFlow calls :func:`load_tf` inside a function, never at
module import time, so ``edgeops --help`` stays fast and the device agent never pulls it in::

    from edgeops._tf import load_tf

    tf, tf_keras = load_tf()

``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to ``tf_keras`` (Keras 2), which is what
tensorflow-model-optimization and the TFLite converter's Keras path expect. The variables are
set before the first ``import tensorflow``; setting them later has no effect, so import
TensorFlow only through here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType

__all__ = ["enable_determinism", "load_tf", "native_stderr_silenced"]

_ENVIRONMENT = {
    "TF_USE_LEGACY_KERAS": "1",  # tf.keras is tf_keras (Keras 2)
    "TF_CPP_MIN_LOG_LEVEL": "3",  # no C++ log lines (Python exceptions still carry errors)
    "TF_ENABLE_ONEDNN_OPTS": "0",  # oneDNN reorders float sums: results would vary by CPU
}


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block.

    Native libraries print lines no setting silences: TensorFlow's "Could not find cuda
    drivers" before absl is initialised, LiteRT's "Created TensorFlow Lite XNNPACK delegate".
    Python-level errors still surface: they are raised after the descriptor is restored.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@cache
def load_tf() -> tuple[ModuleType, ModuleType]:
    """Import TensorFlow once, configured; return ``(tf, tf_keras)``."""
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    warnings.filterwarnings("ignore", module=r"tensorflow.*")
    warnings.filterwarnings("ignore", module=r"tf_keras.*")
    warnings.filterwarnings("ignore", module=r"tf2onnx.*")
    warnings.filterwarnings("ignore", module=r"tensorflow_model_optimization.*")
    with native_stderr_silenced():
        import tensorflow as tf
        import tf_keras

    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tf, tf_keras


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TF ops deterministic.

    What this cannot fix is documented in docs/training.md (thread scheduling of some
    kernels on other machines, different CPUs/instruction sets, other TF versions).
    """
    tf, tf_keras = load_tf()
    tf_keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
