"""The source interface, one sample, and how bad input is recognised and counted."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np

from device_agent.errors import AgentError, ProtocolError

log = logging.getLogger(__name__)


#: Kinds of bad input counted in ``Source.errors``.
ERROR_KINDS = ("parse", "dtype", "shape", "nonfinite", "too_large", "overload", "timeout")
DEFAULT_REPLY_TIMEOUT_S = 5.0
DEFAULT_MAX_PENDING = 1000


class SourceError(AgentError):
    """A source cannot be opened or read at all (missing file, port in use, bad settings)."""


class BadSampleError(ProtocolError):
    """One input is malformed; ``kind`` is the key it is counted under (see ERROR_KINDS)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Reply = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, eq=False)
class Sample:
    """One raw sample of the source's ``input_shape``; ``received_at`` is Unix time."""

    raw: np.ndarray
    label: int | None = None
    reply: Reply | None = None
    received_at: float = field(default_factory=time.time)


class PredictionLike(Protocol):
    label: int
    confidence: float
    probabilities: np.ndarray


def reply_document(prediction: PredictionLike, model_id: str) -> dict[str, Any]:
    """The answer to a sample: ``{"label", "confidence", "probabilities", "model_id"}``."""
    return {
        "label": int(prediction.label),
        "confidence": float(prediction.confidence),
        "probabilities": [float(p) for p in np.asarray(prediction.probabilities).ravel()],
        "model_id": model_id,
    }


# -- parsing and checking one sample ----------------------------------------------------------


def shape_text(shape: Sequence[int]) -> str:
    return f"{list(shape)} ({math.prod(shape)} values)"


def check_sample(array: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """``array`` as one sample of ``input_shape`` (a flat array of the right size is reshaped).

    Raises BadSampleError (kind ``dtype``, ``shape`` or ``nonfinite``) naming the problem.
    """
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise BadSampleError("dtype", f"expected numbers, got values of type {array.dtype}")
    if array.shape != input_shape:
        if array.ndim == 1 and array.size == math.prod(input_shape):
            array = array.reshape(input_shape)
        else:
            raise BadSampleError(
                "shape",
                f"expected shape {shape_text(input_shape)}, got shape {shape_text(array.shape)}",
            )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise BadSampleError("nonfinite", f"{bad} value(s) are NaN or infinite")
    return array


def parse_sample(values: object, input_shape: tuple[int, ...]) -> np.ndarray:
    """A sample from JSON-like values (a flat or nested list of numbers) as float32."""
    if not isinstance(values, list):
        raise BadSampleError("parse", f"expected an array of numbers, got {json_type(values)}")
    kinds = _non_numbers(values)
    if kinds:
        raise BadSampleError("dtype", f"expected numbers, got {', '.join(sorted(kinds))}")
    try:
        raw = np.asarray(values, dtype=np.float64)
    except ValueError as exc:  # ragged nesting
        raise BadSampleError("shape", f"the nested arrays are ragged: {exc}") from None
    with np.errstate(over="ignore"):
        return check_sample(raw.astype(np.float32), input_shape)


def parse_line(line: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """A sample from one text line: a JSON array, or numbers separated by commas or spaces."""
    text = line.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise BadSampleError("parse", f"not a valid JSON array: {exc}") from None
        return parse_sample(values, input_shape)
    tokens = text.replace(",", " ").split()
    try:
        numbers = [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not is_number(t))
        raise BadSampleError("parse", f"{bad!r} is not a number") from None
    with np.errstate(over="ignore"):
        return check_sample(np.asarray(numbers, dtype=np.float32), input_shape)


def _non_numbers(values: list[Any]) -> set[str]:
    """The JSON types other than number among the leaves of nested lists."""
    kinds: set[str] = set()
    stack = [values]
    while stack:
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            elif isinstance(item, bool) or not isinstance(item, int | float):
                kinds.add(json_type(item))
    return kinds


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def input_shape_of(value: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value)
    if not shape or any(d < 1 for d in shape):
        raise SourceError(f"input_shape must be a non-empty list of positive integers: {value}")
    return shape


# -- the interface ----------------------------------------------------------------------------


class Source(ABC):
    """Yields samples until exhausted or closed; bad input is counted in ``errors``.

    ``errors`` is replaced, never changed in place, so any thread may read it at any time.
    """

    kind: str = ""

    def __init__(self, input_shape: Sequence[int]) -> None:
        self.input_shape = input_shape_of(input_shape)
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self._errors_lock = threading.Lock()
        self._closed = threading.Event()

    @abstractmethod
    def poll(self, timeout_s: float | None = None) -> Sample | None:
        """The next sample, or None if none came within ``timeout_s`` (None: wait) or the
        source is exhausted or closed (then :attr:`exhausted` is True)."""

    @property
    def exhausted(self) -> bool:
        """True once no more samples will come (end of input, or closed)."""
        return self._closed.is_set()

    def ready_at(self) -> float | None:
        """When (``time.monotonic()``) the next sample will be ready, for a source that
        knows (a paced one); None if it does not, or if it may be ready now: then the
        caller polls. The agent's loop waits for MQTT events until that time."""
        return None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def samples(self) -> Iterator[Sample]:
        """Every sample until the source is exhausted or closed."""
        while True:
            sample = self.poll(0.25)
            if sample is not None:
                yield sample
            elif self.exhausted:
                return

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def close(self) -> None:
        """Stop the source; iteration ends and waiting callers get an error answer."""
        self._closed.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reject(self, error: BadSampleError, where: str) -> str:
        """Count a bad input; returns the message to answer with."""
        message = f"{where}: {error}" if where else str(error)
        with self._errors_lock:
            errors = self.errors.copy()
            errors[error.kind] += 1
            first = errors[error.kind] == 1
            self.errors = errors
            self.last_error = message
        log.log(logging.WARNING if first else logging.DEBUG, "%s source: %s", self.kind, message)
        return message


class PacedSource(Source):
    """A source that makes samples on demand, at most ``rate_hz`` per second if given."""

    def __init__(self, input_shape: Sequence[int], rate_hz: float | None) -> None:
        super().__init__(input_shape)
        if rate_hz is not None and not rate_hz > 0:
            raise SourceError(f"rate_hz must be positive, got {rate_hz}")
        self._period = 1.0 / rate_hz if rate_hz else 0.0
        self._next_due: float | None = None
        self._done = False

    @property
    def exhausted(self) -> bool:
        return self._done or self._closed.is_set()

    @abstractmethod
    def _next(self) -> Sample | None:
        """The next sample, or None at the end of the input."""

    def ready_at(self) -> float | None:
        """When (``time.monotonic()``) :meth:`poll` has the next sample without waiting."""
        if self.exhausted or not self._period or self._next_due is None:
            return None
        return self._next_due

    def poll(self, timeout_s: float | None = None) -> Sample | None:
        if self.exhausted:
            return None
        if self._period:
            now = time.monotonic()
            due = now if self._next_due is None else self._next_due
            wait = due - now
            if timeout_s is not None and wait > timeout_s:
                self._closed.wait(timeout_s)
                return None
            if wait > 0 and self._closed.wait(wait):
                return None
            # no burst to catch up after a stall of more than one second
            self._next_due = max(due, time.monotonic() - 1.0) + self._period
        sample = self._next()
        if sample is None:
            self._done = True
        return sample


def without_status(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "status"}


def answer_json(document: dict[str, Any]) -> str:
    """``document`` as strict JSON, or an error document if it cannot be (NaN, objects)."""
    try:
        return json.dumps(without_status(document), allow_nan=False)
    except (TypeError, ValueError) as exc:
        return json.dumps({"error": f"the answer cannot be sent as JSON: {exc}"})
