"""Telemetry computed on the device: windows of compact sketches against the model's reference.

:class:`WindowAggregator` takes every prediction of the champion (and, in shadow mode, the
challenger's agreement) and, when a window is due (``window_samples`` predictions or
``window_seconds`` seconds, whichever comes first), closes it into a
:class:`TelemetryWindow`:

* ``feature_counts[f]``: the model inputs' feature ``f`` counted in the reference's quantile
  bins, by :func:`device_agent.sketch.bin_counts` on :func:`device_agent.sketch.feature_matrix`
  of the batch of model inputs, the very maths the hub used for the reference (empty without
  a reference);
* ``class_counts``: the predicted labels (length: the number of classes);
* ``confidence_counts``: the confidence (largest probability) over the reference's
  confidence edges, or :data:`~device_agent.sketch.CONFIDENCE_EDGES`;
* ``latency_ms``: p50, p95, p99 of the runtime's own latency (null without samples);
* ``errors``: counts by kind (bad input, runtime failures ...);
* ``cpu_percent`` (process CPU time over wall time in the window, 100 = one core) and
  ``rss_bytes`` (resident set size at the window's close);
* ``raw_samples``: at most ``raw_sample_rate`` raw inputs per window, drawn uniformly
  (reservoir sampling, seeded), for retraining;
* ``shadow``: the challenger's ``model_id``, ``agreement`` (fraction of samples where its
  label equals the champion's), ``samples`` and ``latency_ms``;
* ``dropped_windows``: windows the offline buffer dropped at its bound since the last
  report.

The window's ``seq`` is assigned by the offline buffer when the window is stored
(:meth:`TelemetryWindow.payload_factory`), so numbers are persistent and monotonic across
restarts. The document is registered for :attr:`Channel.TELEMETRY` in
:data:`device_agent.protocol.DOCUMENTS`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import numpy as np

from device_agent.errors import ProtocolError
from device_agent.protocol import (
    DOCUMENTS,
    MAX_PAYLOAD_BYTES,
    Channel,
    Document,
    _require,
    encode,
    validate_device_id,
)
from device_agent.sketch import CONFIDENCE_EDGES, ReferenceStats, bin_counts, feature_matrix

__all__ = [
    "LATENCY_QUANTILES",
    "PredictionLike",
    "ShadowResult",
    "TelemetryWindow",
    "WindowAggregator",
]

LATENCY_QUANTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0}
MAX_LATENCIES = 10_000  # latencies kept per window (a uniform reservoir beyond that)
_FOLD_EVERY = 1024  # model inputs batched before they are counted into the histograms


class PredictionLike(Protocol):
    """What the aggregator reads of a prediction (:class:`device_agent.runtime.Prediction`)."""

    @property
    def probabilities(self) -> np.ndarray: ...
    @property
    def label(self) -> int: ...
    @property
    def confidence(self) -> float: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def model_inputs(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ShadowResult:
    """The challenger's run on one sample: did its label agree with the champion's?"""

    model_id: str
    agreed: bool
    latency_s: float


# -- the document ----------------------------------------------------------------------------


@dataclass
class TelemetryWindow(Document):
    """One window of sketches, published on ``telemetry`` (QoS 1, not retained).

    ``seq`` is 0 until the offline buffer assigns it; on the wire it is at least 1.
    """

    TYPE: ClassVar[str] = "telemetry"
    _FIELDS: ClassVar[set[str]] = {
        "device_id",
        "model_id",
        "seq",
        "start_ts",
        "end_ts",
        "samples",
        "feature_counts",
        "class_counts",
        "confidence_counts",
        "latency_ms",
        "errors",
        "cpu_percent",
        "rss_bytes",
        "raw_samples",
        "shadow",
        "dropped_windows",
    }

    device_id: str
    model_id: str
    seq: int
    start_ts: float
    end_ts: float
    samples: int
    feature_counts: list[list[int]] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    confidence_counts: list[int] = field(default_factory=list)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    raw_samples: list[list[float]] = field(default_factory=list)
    shadow: dict[str, Any] | None = None
    dropped_windows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self._envelope(
            {
                "device_id": self.device_id,
                "model_id": self.model_id,
                "seq": self.seq,
                "start_ts": self.start_ts,
                "end_ts": self.end_ts,
                "samples": self.samples,
                "feature_counts": [list(row) for row in self.feature_counts],
                "class_counts": list(self.class_counts),
                "confidence_counts": list(self.confidence_counts),
                "latency_ms": dict(self.latency_ms),
                "errors": dict(self.errors),
                "cpu_percent": self.cpu_percent,
                "rss_bytes": self.rss_bytes,
                "raw_samples": [list(row) for row in self.raw_samples],
                "shadow": None if self.shadow is None else dict(self.shadow),
                "dropped_windows": self.dropped_windows,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        doc = "telemetry window"
        seq = _count(data, "seq", doc)
        if seq < 1:
            raise ProtocolError(f"{doc}: field 'seq' must be at least 1, got {seq}")
        start_ts = _finite(data, "start_ts", doc)
        end_ts = _finite(data, "end_ts", doc)
        if end_ts < start_ts:
            raise ProtocolError(f"{doc}: end_ts {end_ts} is before start_ts {start_ts}")
        shadow = data.get("shadow")
        if shadow is not None and not isinstance(shadow, dict):
            raise ProtocolError(
                f"{doc}: field 'shadow' must be an object or null, got {type(shadow).__name__}"
            )
        cpu = data.get("cpu_percent")
        rss = data.get("rss_bytes")
        return cls(
            device_id=validate_device_id(_require(data, "device_id", str, doc)),
            model_id=_require(data, "model_id", str, doc),
            seq=seq,
            start_ts=start_ts,
            end_ts=end_ts,
            samples=_count(data, "samples", doc),
            feature_counts=[
                _counts(row, "feature_counts", doc)
                for row in _list(data.get("feature_counts", []), "feature_counts", doc)
            ],
            class_counts=_counts(data.get("class_counts", []), "class_counts", doc),
            confidence_counts=_counts(data.get("confidence_counts", []), "confidence_counts", doc),
            latency_ms=_latencies(data.get("latency_ms", {}), doc),
            errors=_error_counts(data.get("errors", {}), doc),
            cpu_percent=None if cpu is None else _finite(data, "cpu_percent", doc),
            rss_bytes=None if rss is None else _count(data, "rss_bytes", doc),
            raw_samples=[
                _numbers(row, "raw_samples", doc)
                for row in _list(data.get("raw_samples", []), "raw_samples", doc)
            ],
            shadow=None if shadow is None else dict(shadow),
            dropped_windows=_as_count(data.get("dropped_windows", 0), "dropped_windows", doc),
            extra=cls._extra(data, cls._FIELDS),
        )

    def payload_factory(
        self, dropped_windows: Callable[[], int] | None = None
    ) -> Callable[[int], bytes]:
        """A factory for :meth:`OfflineBuffer.append`: this window, numbered ``seq``, encoded.

        ``dropped_windows`` (pass the buffer's ``take_dropped``) is asked inside the
        buffer's transaction, so the loss it reports is counted in exactly one stored window.
        """

        def build(seq: int) -> bytes:
            dropped = self.dropped_windows + (dropped_windows() if dropped_windows else 0)
            return encode(dataclasses.replace(self, seq=seq, dropped_windows=dropped))

        return build


DOCUMENTS[Channel.TELEMETRY] = TelemetryWindow


# -- the aggregator --------------------------------------------------------------------------


class WindowAggregator:
    """Accumulates one window of sketches at a time; not thread-safe (the daemon loop owns it).

    ``window_samples`` and ``window_seconds`` bound a window (whichever comes first; at
    least one must be given). ``raw_sample_rate`` is the most raw samples kept per window.
    """

    def __init__(
        self,
        device_id: str,
        model_id: str,
        reference: ReferenceStats | None,
        *,
        window_samples: int | None = None,
        window_seconds: float | None = None,
        raw_sample_rate: float = 0.0,
        seed: int = 0,
        start_ts: float | None = None,
    ) -> None:
        if window_samples is None and window_seconds is None:
            raise ValueError("a window needs window_samples or window_seconds (or both)")
        if window_samples is not None and window_samples < 1:
            raise ValueError(f"window_samples must be at least 1, got {window_samples}")
        if window_seconds is not None and not window_seconds > 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        if not raw_sample_rate >= 0:
            raise ValueError(f"raw_sample_rate must be >= 0, got {raw_sample_rate}")
        self.device_id = validate_device_id(device_id)
        self.model_id = model_id
        self.reference = reference
        self.window_samples = window_samples
        self.window_seconds = window_seconds
        self.raw_limit = int(raw_sample_rate)
        self._rng = random.Random(seed)
        self._feature_edges = (
            [np.asarray(e, dtype=np.float64) for e in reference.feature_edges]
            if reference is not None
            else []
        )
        confidence = reference.confidence_edges if reference is not None else None
        self._confidence_edges = list(confidence if confidence is not None else CONFIDENCE_EDGES)
        self._reset(time.time() if start_ts is None else start_ts)

    # -- feeding -------------------------------------------------------------------------------

    @property
    def samples(self) -> int:
        """Predictions in the current window."""
        return self._samples

    def add(
        self,
        prediction: PredictionLike,
        raw: np.ndarray,
        *,
        error: str | None = None,
        shadow: ShadowResult | None = None,
    ) -> None:
        """Count one prediction of the champion (and the challenger's result on it)."""
        self._samples += 1
        if error is not None:
            self._errors[error] += 1
        label = int(prediction.label)
        if label >= len(self._class_counts):
            self._class_counts.extend([0] * (label + 1 - len(self._class_counts)))
        if label >= 0:
            self._class_counts[label] += 1
        else:
            self._errors["negative_label"] += 1
        n_classes = int(np.asarray(prediction.probabilities).size)
        if n_classes > len(self._class_counts):
            self._class_counts.extend([0] * (n_classes - len(self._class_counts)))
        confidence = float(prediction.confidence)
        if math.isnan(confidence):
            self._errors["nan_confidence"] += 1
        else:
            self._confidence_counts[bisect.bisect_right(self._confidence_edges, confidence)] += 1
        self._keep(self._latencies, float(prediction.latency_s), self._samples)
        if self._feature_edges:
            self._add_model_inputs(prediction.model_inputs)
        if self.raw_limit:
            self._keep_raw(raw)
        if shadow is not None:
            self._add_shadow(shadow)

    def add_error(self, kind: str) -> None:
        """Count an error that produced no prediction (bad input, a failed inference)."""
        self._errors[kind] += 1

    def due(self, now: float) -> bool:
        """True when the window is full or old enough. An empty window is never due: once
        its time is up it starts over at ``now`` (idle time is not reported)."""
        if self.window_samples is not None and self._samples >= self.window_samples:
            return True
        if self.window_seconds is None or now - self._start_ts < self.window_seconds:
            return False
        if self._samples == 0 and not self._errors:
            self._reset(now)
            return False
        return True

    def close_window(self, now: float) -> TelemetryWindow:
        """The current window as a document (``seq`` 0: the buffer assigns it); starts the next."""
        self._fold()
        cpu_now = _cpu_seconds()
        wall = now - self._start_ts
        cpu_percent = round(100.0 * (cpu_now - self._cpu_start) / wall, 2) if wall > 0 else None
        window = TelemetryWindow(
            device_id=self.device_id,
            model_id=self.model_id,
            seq=0,
            start_ts=round(self._start_ts, 3),
            end_ts=round(max(now, self._start_ts), 3),
            samples=self._samples,
            feature_counts=[[int(c) for c in row] for row in self._feature_counts],
            class_counts=list(self._class_counts),
            confidence_counts=list(self._confidence_counts),
            latency_ms=_quantiles_ms(self._latencies),
            errors=dict(sorted(self._errors.items())),
            cpu_percent=cpu_percent,
            rss_bytes=_rss_bytes(),
            raw_samples=self._raw,
            shadow=self._shadow_summary(),
        )
        _fit_payload(window)
        self._reset(now, cpu_now)
        return window

    # -- internals -----------------------------------------------------------------------------

    def _reset(self, now: float, cpu_now: float | None = None) -> None:
        self._start_ts = now
        self._cpu_start = _cpu_seconds() if cpu_now is None else cpu_now
        self._samples = 0
        self._errors: Counter[str] = Counter()
        self._class_counts: list[int] = []
        self._confidence_counts = [0] * (len(self._confidence_edges) + 1)
        self._latencies: list[float] = []
        self._feature_counts = [np.zeros(e.size + 1, dtype=np.int64) for e in self._feature_edges]
        self._inputs: list[np.ndarray] = []
        self._raw: list[list[float]] = []
        self._raw_seen = 0
        self._shadow_model: str | None = None
        self._shadow_samples = 0
        self._shadow_agreed = 0
        self._shadow_latencies: list[float] = []

    def _add_model_inputs(self, model_inputs: np.ndarray) -> None:
        x = np.asarray(model_inputs, dtype=np.float64)
        # one sample: add the batch axis the reference was computed with
        matrix = feature_matrix(x[None])
        if matrix.shape[1] != len(self._feature_edges):
            self._errors["feature_mismatch"] += 1
            return
        self._inputs.append(matrix)
        if len(self._inputs) >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        if not self._inputs:
            return
        batch = np.concatenate(self._inputs, axis=0)
        self._inputs = []
        for f, edges in enumerate(self._feature_edges):
            self._feature_counts[f] += bin_counts(batch[:, f], edges)

    def _keep(self, kept: list[float], value: float, seen: int) -> None:
        """Reservoir sampling: ``kept`` stays a uniform sample of at most MAX_LATENCIES."""
        if len(kept) < MAX_LATENCIES:
            kept.append(value)
            return
        slot = self._rng.randrange(seen)
        if slot < MAX_LATENCIES:
            kept[slot] = value

    def _keep_raw(self, raw: np.ndarray) -> None:
        values = np.asarray(raw, dtype=np.float64).ravel()
        if not np.isfinite(values).all():
            return  # JSON cannot carry NaN or infinity; such inputs are refused earlier anyway
        self._raw_seen += 1
        if len(self._raw) < self.raw_limit:
            self._raw.append(values.tolist())
            return
        slot = self._rng.randrange(self._raw_seen)
        if slot < self.raw_limit:
            self._raw[slot] = values.tolist()

    def _add_shadow(self, shadow: ShadowResult) -> None:
        if shadow.model_id != self._shadow_model:
            # a new challenger: the window reports the latest one only
            self._shadow_model = shadow.model_id
            self._shadow_samples = self._shadow_agreed = 0
            self._shadow_latencies = []
        self._shadow_samples += 1
        self._shadow_agreed += int(bool(shadow.agreed))
        self._keep(self._shadow_latencies, float(shadow.latency_s), self._shadow_samples)

    def _shadow_summary(self) -> dict[str, Any] | None:
        if self._shadow_model is None or self._shadow_samples == 0:
            return None
        return {
            "model_id": self._shadow_model,
            "agreement": round(self._shadow_agreed / self._shadow_samples, 6),
            "samples": self._shadow_samples,
            "latency_ms": _quantiles_ms(self._shadow_latencies),
        }


# -- helpers ---------------------------------------------------------------------------------


def _quantiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    values = np.asarray([v for v in latencies_s if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return dict.fromkeys(LATENCY_QUANTILES)
    points = np.percentile(values * 1000.0, list(LATENCY_QUANTILES.values()))
    return {name: round(float(p), 4) for name, p in zip(LATENCY_QUANTILES, points, strict=True)}


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _rss_bytes() -> int | None:
    """The resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as statm:  # noqa: PTH123 - hot path, no Path
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # Unix only, and needed only where /proc is missing

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * 1024 if peak else None


def _fit_payload(window: TelemetryWindow) -> None:
    """Drop raw samples until the encoded window fits the protocol's payload limit."""
    budget = MAX_PAYLOAD_BYTES - 1024  # room for seq and dropped_windows
    while window.raw_samples and len(json.dumps(window.to_dict())) > budget:
        window.raw_samples = window.raw_samples[: len(window.raw_samples) // 2]
        window.errors["raw_samples_truncated"] = window.errors.get("raw_samples_truncated", 0) + 1


def _count(data: Mapping[str, Any], key: str, doc: str) -> int:
    return _as_count(_require(data, key, int, doc), key, doc)


def _as_count(value: Any, name: str, doc: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{doc}: field {name!r} must be a count (int >= 0), got {value!r}")
    return value


def _finite(data: Mapping[str, Any], key: str, doc: str) -> float:
    return _as_finite(_require(data, key, (int, float), doc), key, doc)


def _as_finite(value: Any, name: str, doc: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"{doc}: field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _list(value: Any, name: str, doc: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"{doc}: field {name!r} must be a list, got {type(value).__name__}")
    return value


def _counts(value: Any, name: str, doc: str) -> list[int]:
    items = _list(value, name, doc)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ProtocolError(f"{doc}: field {name!r} holds {item!r}, not a count (int >= 0)")
    return list(items)


def _numbers(value: Any, name: str, doc: str) -> list[float]:
    items = _list(value, name, doc)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ProtocolError(f"{doc}: field {name!r} holds {item!r}, not a finite number")
    return [float(item) for item in items]


def _latencies(value: Any, doc: str) -> dict[str, float | None]:
    if not isinstance(value, dict):
        raise ProtocolError(
            f"{doc}: field 'latency_ms' must be an object, got {type(value).__name__}"
        )
    result: dict[str, float | None] = {}
    for name, item in value.items():
        if item is None:
            result[str(name)] = None
            continue
        result[str(name)] = _as_finite(item, f"latency_ms.{name}", doc)
    return result


def _error_counts(value: Any, doc: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{doc}: field 'errors' must be an object, got {type(value).__name__}")
    return {str(k): _as_count(v, f"errors.{k}", doc) for k, v in value.items()}
