"""Training: the model zoo, seeded training, and the service that registers what it trains.

    from edgeops.train import TrainService, build_model, train_model, load_keras

    model = build_model("cnn", (8, 8, 1), 10, width=1.0, seed=0)
    model, metrics = train_model(arrays, "cnn", epochs=5, seed=0)
    version = TrainService(datasets, registry).train("digits", "cnn", epochs=5, seed=0)

TensorFlow is imported lazily, on first use. See docs/training.md.
"""

from edgeops.train.errors import (
    IncompatibleInputError,
    ModelFormatError,
    TrainError,
    UnknownArchitectureError,
)
from edgeops.train.service import DEFAULT_EPOCHS, TrainService
from edgeops.train.trainer import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LEARNING_RATE,
    NORMAL_CLASS,
    anomaly_scores,
    check_training_parameters,
    load_keras,
    predict,
    save_keras,
    train_model,
)
from edgeops.train.zoo import (
    ARCHITECTURES,
    DESCRIPTIONS,
    TASK_ANOMALY,
    TASK_CLASSIFICATION,
    build_model,
    check_architecture,
    task_of,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LEARNING_RATE",
    "DESCRIPTIONS",
    "NORMAL_CLASS",
    "TASK_ANOMALY",
    "TASK_CLASSIFICATION",
    "IncompatibleInputError",
    "ModelFormatError",
    "TrainError",
    "TrainService",
    "UnknownArchitectureError",
    "anomaly_scores",
    "build_model",
    "check_architecture",
    "check_training_parameters",
    "load_keras",
    "predict",
    "save_keras",
    "task_of",
    "train_model",
]
