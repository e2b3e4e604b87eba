"""Drift detection: the field's telemetry sketches against the release's reference statistics.

Pure (numpy and scipy, no database). :func:`aggregate_windows` sums the windows one release
and cohort sent over an evaluation window; :func:`detect_drift` compares the sum with the
reference the release's model card carries (:class:`device_agent.sketch.ReferenceStats`)
and returns a :class:`DriftReport`.

**Histograms compared.** Every feature histogram (the model inputs over the reference's
quantile edges), the predicted-class histogram and the confidence histogram. The last two
are black-box shift detection on the model's outputs (Rabanser, Günnemann and Lipton,
"Failing Loudly", NeurIPS 2019): a change of the inputs that matters to the model shows in
what it predicts, with one or two histograms instead of one per feature.

**Tests**, each a two-sample test of the window against the reference, since the reference
is itself a sample (the training split for features, the validation split for outputs):

* ``chi2``: Pearson's chi-square test of homogeneity of the 2 x B table. With ``n`` and ``m``
  the effective sample sizes (below), ``p`` and ``q`` the window's and the reference's bin
  proportions and ``r = (n p + m q) / (n + m)`` the pooled ones, the statistic is
  ``n m / (n + m) * Σ (p_i - q_i)² / r_i`` with ``B - 1`` degrees of freedom. Adjacent bins
  are merged first, from the lowest up, until every merged bin expects at least
  ``min_expected`` counts in the smaller sample (``min(n, m) * r >= min_expected``): the
  chi-square approximation needs it, and it takes care of empty bins and of reference bins
  with no count (their window counts land in the merged neighbour). Merging on the pooled
  proportions uses only the table's margins, which the test conditions on anyway.
* ``ks``: Kolmogorov-Smirnov on the binned distributions: ``D`` is the largest gap between
  the two cumulative histograms, the p-value that of the Kolmogorov limit distribution at
  ``sqrt(n m / (n + m)) * D``. Binning can only shrink ``D``, so the test is conservative.
  Not run on the class histogram: classes have no order.
* ``psi``: the population stability index (the same formula as the rollout gates, below).
  Always reported; with ``psi`` among the config's tests it also flags a histogram whose PSI
  exceeds ``psi_threshold`` -- the common rule of thumb, which has no error rate: PSI grows
  like ``(B - 1) / n`` on small windows with no drift at all.

**Multiple testing.** Every chi-square and KS p-value of one report is one family; Holm's
step-down procedure (default) or Bonferroni's bound adjusts them so that the chance of any
false rejection in a report (the family-wise error rate) is at most ``alpha``, whatever the
dependence between the tests. The report says drift when any adjusted p-value is at most
``alpha`` (or a PSI rule fires).

**Effective sample size.** Features of time series ``(n, T, C)`` pool every position of every
sample into one histogram (:func:`device_agent.sketch.feature_matrix`), so a window of ``n``
samples holds ``n T`` strongly autocorrelated counts per feature; a test that believed them
independent would find drift in any long enough window. The tests use the window's
``samples`` instead: each sample contributes its histogram of ``T`` positions as one
observation. That is the right size, not just a convenient one: the proportion vector ``v``
of one sample's positions lies in the simplex, so ``Cov(v) = E[v vᵀ] - p pᵀ <= diag(p) - p
pᵀ`` -- the covariance of one multinomial draw -- and the pooled proportions of ``n``
independent samples vary at most as much as those of ``n`` single draws. The chi-square
statistic computed with ``n`` is then asymptotically a weighted sum of chi-square variables
with weights at most 1: never more false alarms than the nominal level, equality when a
sample's positions all fall in one bin. The pooling factor ``k = Σ counts / samples`` (``T``
for time series, 1 for tables and images) is read from the window itself; the reference, made
by the same rule, is given the effective size ``Σ reference counts / k``. For the outputs
each prediction is one observation (``Σ class_counts``).

**Minimum size.** A report on fewer than ``min_samples`` samples says ``insufficient``, not
drift; so does a histogram whose reference has fewer than ``min_samples`` effective samples
(it is skipped, and the report is ``insufficient`` if nothing is left to test).

**Calibration.** The defaults (``alpha`` 0.01, Holm, chi-square and KS on every feature and
both output histograms) bound the false-alarm rate per evaluation window by 1 % in theory;
``bench/drift.py`` measures it on held-out data (never the reference's own samples) of the
digits and BasicMotions datasets, with the figures in docs/monitoring.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from device_agent.sketch import ReferenceStats, SketchError
from device_agent.telemetry import TelemetryWindow
from edgeops.errors import EdgeOpsError

__all__ = [
    "CORRECTIONS",
    "EPSILON",
    "TARGETS",
    "TESTS",
    "VERDICTS",
    "DriftConfig",
    "DriftError",
    "DriftReport",
    "DriftTest",
    "WindowAggregate",
    "adjust_p_values",
    "aggregate_windows",
    "detect_drift",
    "js_divergence",
    "ks_binned",
    "psi",
]

EPSILON = 1e-4
"""Added to every bin's count before PSI and Jensen-Shannon divergence (no log of zero)."""

CORRECTIONS = ("holm", "bonferroni")
TESTS = ("chi2", "ks", "psi")
TARGETS = ("features", "classes", "confidence")
VERDICTS = ("drift", "no_drift", "insufficient")

Verdict = Literal["drift", "no_drift", "insufficient"]


class DriftError(EdgeOpsError, ValueError):
    """Windows, reference statistics or a drift configuration that cannot be compared."""


# -- divergences (shared with the rollout gates) ----------------------------------------------


def _normalised(counts: Sequence[float], length: int) -> list[float]:
    padded = [float(c) for c in counts] + [0.0] * (length - len(counts))
    smoothed = [c + EPSILON for c in padded]
    total = sum(smoothed)
    return [c / total for c in smoothed]


def psi(observed: Sequence[float], reference: Sequence[float]) -> float:
    """Population stability index ``Σ (p_i - q_i) ln(p_i / q_i)`` of ``observed`` against
    ``reference`` (counts; :data:`EPSILON` added to each bin, the shorter list padded)."""
    length = max(len(observed), len(reference))
    p, q = _normalised(observed, length), _normalised(reference, length)
    return sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def js_divergence(observed: Sequence[float], reference: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2, 0..1) of two histograms (counts)."""
    length = max(len(observed), len(reference))
    p, q = _normalised(observed, length), _normalised(reference, length)
    m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]

    def kl(a: list[float], b: list[float]) -> float:
        return sum(ai * math.log2(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)

    return max(0.0, min(1.0, 0.5 * kl(p, m) + 0.5 * kl(q, m)))


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    """How :func:`detect_drift` decides; validated on construction (:class:`DriftError`).

    ``alpha``: the family-wise error rate of one report (0 < alpha < 1). ``correction``:
    ``holm`` or ``bonferroni``. ``min_samples``: fewer samples (in the window, or effective
    samples in a histogram's reference) are ``insufficient``. ``psi_threshold``: the PSI
    above which the ``psi`` rule flags a histogram (only with ``psi`` in ``tests``).
    ``tests``: any of :data:`TESTS`; ``targets``: any of :data:`TARGETS` (``features``, and
    the outputs ``classes`` and ``confidence``). ``min_expected``: the smallest expected
    count of a bin in the chi-square test (smaller bins are merged with their neighbours).
    """

    alpha: float = 0.01
    correction: str = "holm"
    min_samples: int = 20
    psi_threshold: float = 0.2
    tests: tuple[str, ...] = ("chi2", "ks")
    targets: tuple[str, ...] = TARGETS
    min_expected: float = 5.0

    def __post_init__(self) -> None:
        if not _is_number(self.alpha) or not 0.0 < self.alpha < 1.0:
            raise DriftError(f"drift config: alpha must be a number in (0, 1), got {self.alpha!r}")
        if self.correction not in CORRECTIONS:
            raise DriftError(
                f"drift config: correction must be one of {', '.join(CORRECTIONS)}, "
                f"got {self.correction!r}"
            )
        if (
            isinstance(self.min_samples, bool)
            or not isinstance(self.min_samples, int)
            or self.min_samples < 1
        ):
            raise DriftError(
                f"drift config: min_samples must be an integer >= 1, got {self.min_samples!r}"
            )
        if not _is_number(self.psi_threshold) or not self.psi_threshold > 0:
            raise DriftError(
                f"drift config: psi_threshold must be a positive number, got {self.psi_threshold!r}"
            )
        if not _is_number(self.min_expected) or not self.min_expected > 0:
            raise DriftError(
                f"drift config: min_expected must be a positive number, got {self.min_expected!r}"
            )
        object.__setattr__(self, "tests", _choices("tests", self.tests, TESTS))
        object.__setattr__(self, "targets", _choices("targets", self.targets, TARGETS))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftConfig:
        """A config from a JSON/TOML object; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise DriftError(f"drift config must be an object, got {type(data).__name__}")
        known = {"alpha", "correction", "min_samples", "psi_threshold", "tests", "targets"}
        known.add("min_expected")
        unknown = sorted(set(data) - known)
        if unknown:
            raise DriftError(f"drift config: unknown field(s) {', '.join(map(repr, unknown))}")
        values = dict(data)
        for name in ("tests", "targets"):
            if name in values:
                value = values[name]
                if isinstance(value, str) or not isinstance(value, list | tuple):
                    raise DriftError(f"drift config: {name} must be a list of names")
                values[name] = tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "correction": self.correction,
            "min_samples": self.min_samples,
            "psi_threshold": self.psi_threshold,
            "tests": list(self.tests),
            "targets": list(self.targets),
            "min_expected": self.min_expected,
        }


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _choices(name: str, values: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise DriftError(f"drift config: {name} must be a list of names, got {values!r}")
    chosen = tuple(values)
    for value in chosen:
        if value not in allowed:
            raise DriftError(
                f"drift config: unknown {name[:-1]} {value!r} (known: {', '.join(allowed)})"
            )
    if not chosen:
        raise DriftError(f"drift config: {name} must name at least one of {', '.join(allowed)}")
    return tuple(v for v in allowed if v in chosen)  # canonical order, no duplicates


# -- windows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowAggregate:
    """Summed counts of telemetry windows (of one release and cohort)."""

    samples: int
    feature_counts: list[list[int]]
    class_counts: list[int]
    confidence_counts: list[int]
    windows: int = 1
    model_id: str | None = None

    def __post_init__(self) -> None:
        """Counts are checked (a :class:`DriftError` naming the histogram) and made ints."""
        object.__setattr__(self, "samples", _count(self.samples, "samples"))
        rows = _rows(self.feature_counts, "feature_counts")
        object.__setattr__(self, "feature_counts", [[int(c) for c in row] for row in rows])
        for name in ("class_counts", "confidence_counts"):
            row = _histogram(getattr(self, name), name)
            object.__setattr__(self, name, [int(c) for c in row])
        object.__setattr__(self, "windows", _count(self.windows, "windows"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "feature_counts": [list(row) for row in self.feature_counts],
            "class_counts": list(self.class_counts),
            "confidence_counts": list(self.confidence_counts),
            "windows": self.windows,
            "model_id": self.model_id,
        }


def aggregate_windows(
    windows: Iterable[TelemetryWindow | Mapping[str, Any]],
) -> WindowAggregate:
    """The sum of ``windows`` (window documents or their JSON objects).

    Windows of different models, or with histograms of different lengths, are a
    :class:`DriftError` naming the window and the histogram. A window without feature
    counts (an agent that had no reference) adds its samples and outputs only if every
    window lacks them; mixing is an error, since the feature sums would cover fewer samples
    than ``samples`` says.
    """
    samples = 0
    count = 0
    model_id: str | None = None
    features: list[np.ndarray] | None = None
    classes: np.ndarray | None = None
    confidence: np.ndarray | None = None
    for index, window in enumerate(windows):
        what = f"window {index}"
        doc = window.to_dict() if isinstance(window, TelemetryWindow) else window
        if not isinstance(doc, Mapping):
            raise DriftError(f"{what} must be a telemetry window, got {type(doc).__name__}")
        window_model = doc.get("model_id")
        if window_model is not None:
            if model_id is not None and window_model != model_id:
                raise DriftError(
                    f"{what} comes from model {window_model!r}, the windows before it from "
                    f"{model_id!r}: aggregate one release at a time"
                )
            model_id = str(window_model)
        samples += _count(doc.get("samples"), f"{what}: samples")
        rows = _rows(doc.get("feature_counts", []), f"{what}: feature_counts")
        if features is None:
            features = rows
        elif len(rows) != len(features):
            raise DriftError(
                f"{what} has {len(rows)} feature histograms, the windows before it {len(features)}"
            )
        else:
            for f, (total, row) in enumerate(zip(features, rows, strict=True)):
                if row.size != total.size:
                    raise DriftError(
                        f"{what}: feature {f} has {row.size} bins, the windows before it "
                        f"{total.size}"
                    )
                total += row
        classes = _add(classes, doc.get("class_counts", []), f"{what}: class_counts", pad=True)
        confidence = _add(
            confidence, doc.get("confidence_counts", []), f"{what}: confidence_counts", pad=False
        )
        count += 1
    if count == 0:
        raise DriftError("no telemetry windows to aggregate")
    return WindowAggregate(
        samples=samples,
        feature_counts=[[int(c) for c in row] for row in features or []],
        class_counts=[] if classes is None else [int(c) for c in classes],
        confidence_counts=[] if confidence is None else [int(c) for c in confidence],
        windows=count,
        model_id=model_id,
    )


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise DriftError(f"{what} must be a count (integer >= 0), got {value!r}")
    return int(value)


def _histogram(value: object, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise DriftError(f"{what} must be a list of counts, got {type(value).__name__}")
    return np.array([_count(v, what) for v in value], dtype=np.int64)


def _rows(value: object, what: str) -> list[np.ndarray]:
    if not isinstance(value, list | tuple):
        raise DriftError(f"{what} must be a list of histograms, got {type(value).__name__}")
    return [_histogram(row, f"{what}[{f}]") for f, row in enumerate(value)]


def _add(total: np.ndarray | None, value: object, what: str, *, pad: bool) -> np.ndarray:
    row = _histogram(value, what)
    if total is None:
        return row
    if row.size == 0:
        return total
    if total.size == 0:
        return row
    if row.size != total.size:
        if not pad:
            raise DriftError(f"{what} has {row.size} bins, the windows before it {total.size}")
        # a window that never saw the highest labels may list fewer classes
        size = max(row.size, total.size)
        total = np.pad(total, (0, size - total.size))
        row = np.pad(row, (0, size - row.size))
    summed: np.ndarray = total + row
    return summed


# -- the tests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftTest:
    """One test of one histogram.

    ``target`` names the histogram (``feature:<name>``, ``classes``, ``confidence``);
    ``test`` is ``chi2``, ``ks`` or ``psi``; ``p_value`` and ``p_adjusted`` are None for
    ``psi``, which ``rejected`` only as a rule (``psi`` among the config's tests).
    ``n_window`` and ``n_reference`` are the effective sample sizes; ``bins`` the bins
    compared (after merging, for chi-square); ``df`` the chi-square degrees of freedom.
    """

    target: str
    test: str
    statistic: float
    p_value: float | None
    p_adjusted: float | None
    rejected: bool
    n_window: float
    n_reference: float
    bins: int
    df: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "p_adjusted": self.p_adjusted,
            "rejected": self.rejected,
            "n_window": self.n_window,
            "n_reference": self.n_reference,
            "bins": self.bins,
            "df": self.df,
        }


@dataclass(frozen=True)
class DriftReport:
    """What :func:`detect_drift` found: a verdict, every test, and what drifted."""

    verdict: Verdict
    samples: int
    config: DriftConfig
    tests: list[DriftTest] = field(default_factory=list)
    drifted_features: list[str] = field(default_factory=list)
    drifted_outputs: list[str] = field(default_factory=list)
    psi: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return self.verdict == "drift"

    @property
    def min_p_adjusted(self) -> float | None:
        values = [t.p_adjusted for t in self.tests if t.p_adjusted is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "samples": self.samples,
            "config": self.config.to_dict(),
            "tests": [t.to_dict() for t in self.tests],
            "drifted_features": list(self.drifted_features),
            "drifted_outputs": list(self.drifted_outputs),
            "psi": dict(self.psi),
            "notes": list(self.notes),
        }


def adjust_p_values(p_values: Sequence[float], correction: str = "holm") -> list[float]:
    """Family-wise adjusted p-values, in the order given.

    ``bonferroni``: ``min(1, m p_i)``. ``holm``: with the p-values sorted ascending,
    ``p_(j)`` becomes ``max over i <= j of min(1, (m - i + 1) p_(i))`` (1-based ``i``), so
    rejecting every adjusted p-value ``<= alpha`` is Holm's step-down procedure.
    """
    if correction not in CORRECTIONS:
        raise DriftError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise DriftError("p-values must be a list of numbers in [0, 1]")
    m = p.size
    if m == 0:
        return []
    if correction == "bonferroni":
        return [float(v) for v in np.minimum(1.0, m * p)]
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(v) for v in adjusted]


def _merge_bins(pooled: np.ndarray, smaller: float, min_expected: float) -> list[np.ndarray]:
    """Index groups of adjacent bins, each expecting ``>= min_expected`` in the smaller sample
    (the last group absorbs a short remainder); bins no sample fills join their neighbours."""
    groups: list[list[int]] = []
    current: list[int] = []
    mass = 0.0
    for index, share in enumerate(pooled):
        current.append(index)
        mass += float(share)
        if mass * smaller >= min_expected:
            groups.append(current)
            current, mass = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def _chi2(
    p: np.ndarray, q: np.ndarray, n: float, m: float, min_expected: float
) -> tuple[float, float, int, int]:
    """Statistic, p-value, degrees of freedom and bins compared of the homogeneity test."""
    pooled = (n * p + m * q) / (n + m)
    groups = _merge_bins(pooled, min(n, m), min_expected)
    pg = np.array([p[g].sum() for g in groups])
    qg = np.array([q[g].sum() for g in groups])
    rg = np.array([pooled[g].sum() for g in groups])
    keep = rg > 0
    pg, qg, rg = pg[keep], qg[keep], rg[keep]
    df = int(rg.size) - 1
    if df < 1:
        return 0.0, 1.0, 0, int(rg.size)
    statistic = float(n * m / (n + m) * np.sum((pg - qg) ** 2 / rg))
    from scipy import stats  # type: ignore[import-untyped,unused-ignore]  # heavy: first use only

    return statistic, float(stats.chi2.sf(statistic, df)), df, int(rg.size)


def ks_binned(p: np.ndarray, q: np.ndarray, n: float, m: float) -> tuple[float, float]:
    """Kolmogorov-Smirnov on two binned distributions (proportions ``p``, ``q`` of ``n`` and
    ``m`` effective samples): the largest gap of the cumulative sums and its asymptotic
    p-value, the Kolmogorov distribution's tail at ``sqrt(n m / (n + m)) * D``."""
    gap = float(np.max(np.abs(np.cumsum(p) - np.cumsum(q)))) if p.size else 0.0
    gap = min(1.0, gap)
    scale = math.sqrt(n * m / (n + m))
    from scipy import stats  # type: ignore[import-untyped,unused-ignore]

    return gap, float(min(1.0, stats.kstwobign.sf(scale * gap)))


@dataclass
class _Histogram:
    target: str
    kind: str  # "features", "classes", "confidence"
    window: np.ndarray
    reference: np.ndarray
    n: float
    m: float
    ordered: bool


def detect_drift(
    window: WindowAggregate | TelemetryWindow | Mapping[str, Any],
    reference: ReferenceStats | Mapping[str, Any],
    config: DriftConfig | None = None,
) -> DriftReport:
    """Compare one aggregate of windows (or one window) with a release's reference.

    ``reference`` is the card's ``reference`` object or :class:`ReferenceStats`. A feature
    histogram whose length differs from the reference's, or a window with another number of
    features, classes or confidence bins, is a :class:`DriftError` naming them.
    """
    config = config or DriftConfig()
    aggregate = window if isinstance(window, WindowAggregate) else aggregate_windows([window])
    ref = _reference(reference)
    notes: list[str] = []
    if aggregate.samples < config.min_samples:
        notes.append(
            f"{aggregate.samples} samples, fewer than min_samples {config.min_samples}: "
            "not enough to test"
        )
        return DriftReport("insufficient", aggregate.samples, config, notes=notes)
    histograms = _histograms(aggregate, ref, config, notes)
    if not histograms:
        notes.append("nothing to test: no histogram has enough samples on both sides")
        return DriftReport("insufficient", aggregate.samples, config, notes=notes)

    raw: list[DriftTest] = []
    psi_values: dict[str, float] = {}
    for h in histograms:
        p = h.window / h.window.sum()
        q = h.reference / h.reference.sum()
        value = psi(h.window.tolist(), h.reference.tolist())
        psi_values[h.target] = value
        if "chi2" in config.tests:
            statistic, p_value, df, bins = _chi2(p, q, h.n, h.m, config.min_expected)
            raw.append(
                DriftTest(h.target, "chi2", statistic, p_value, None, False, h.n, h.m, bins, df)
            )
        if "ks" in config.tests and h.ordered:
            gap, p_value = ks_binned(p, q, h.n, h.m)
            raw.append(DriftTest(h.target, "ks", gap, p_value, None, False, h.n, h.m, p.size))
        if "psi" in config.tests:
            raw.append(
                DriftTest(
                    h.target,
                    "psi",
                    value,
                    None,
                    None,
                    value > config.psi_threshold,
                    h.n,
                    h.m,
                    p.size,
                )
            )
    p_values = [t.p_value for t in raw if t.p_value is not None]
    adjusted = iter(adjust_p_values(p_values, config.correction))
    tests: list[DriftTest] = []
    for t in raw:
        if t.p_value is None:
            tests.append(t)
            continue
        p_adj = next(adjusted)
        tests.append(
            DriftTest(
                t.target,
                t.test,
                t.statistic,
                t.p_value,
                p_adj,
                p_adj <= config.alpha,
                t.n_window,
                t.n_reference,
                t.bins,
                t.df,
            )
        )
    flagged = {t.target for t in tests if t.rejected}
    drifted_features = [
        h.target for h in histograms if h.kind == "features" and h.target in flagged
    ]
    drifted_outputs = [h.target for h in histograms if h.kind != "features" and h.target in flagged]
    verdict: Verdict = "drift" if flagged else "no_drift"
    return DriftReport(
        verdict,
        aggregate.samples,
        config,
        tests,
        drifted_features,
        drifted_outputs,
        psi_values,
        notes,
    )


def _reference(reference: ReferenceStats | Mapping[str, Any]) -> ReferenceStats:
    if isinstance(reference, ReferenceStats):
        return reference
    try:
        return ReferenceStats.from_dict(reference)
    except SketchError as exc:
        raise DriftError(str(exc)) from None


def _feature_name(ref: ReferenceStats, f: int) -> str:
    names = ref.feature_names
    return f"feature:{names[f]}" if names is not None else f"feature:{f}"


def _histograms(
    aggregate: WindowAggregate, ref: ReferenceStats, config: DriftConfig, notes: list[str]
) -> list[_Histogram]:
    """The histograms to test, with their effective sample sizes; skipped ones noted."""
    out: list[_Histogram] = []
    minimum = config.min_samples

    def add(
        target: str,
        kind: str,
        window: np.ndarray,
        reference: np.ndarray,
        n: float,
        m: float,
        ordered: bool,
    ) -> None:
        if window.sum() <= 0:
            notes.append(f"{target}: no counts in the window, skipped")
        elif reference.sum() <= 0:
            notes.append(f"{target}: the reference has no counts, skipped")
        elif n < minimum:
            notes.append(f"{target}: {n:.0f} samples in the window < {minimum}, skipped")
        elif m < minimum:
            notes.append(
                f"{target}: the reference holds {m:.0f} effective samples < {minimum}, skipped"
            )
        else:
            out.append(_Histogram(target, kind, window, reference, n, m, ordered))

    if "features" in config.targets:
        rows = aggregate.feature_counts
        if not rows:
            notes.append("features: the window has no feature histograms, skipped")
        elif len(rows) != ref.num_features:
            raise DriftError(
                f"the window has {len(rows)} feature histograms, the reference {ref.num_features}"
            )
        else:
            for f, (row, ref_row) in enumerate(zip(rows, ref.feature_counts, strict=True)):
                name = _feature_name(ref, f)
                if len(row) != len(ref_row):
                    raise DriftError(
                        f"{name}: the window has {len(row)} bins, the reference {len(ref_row)}"
                    )
                w = np.asarray(row, dtype=np.float64)
                r = np.asarray(ref_row, dtype=np.float64)
                # values per sample per feature: T for pooled time series, 1 otherwise
                pooling = max(1.0, float(w.sum()) / aggregate.samples)
                add(
                    name, "features", w, r, float(aggregate.samples), float(r.sum()) / pooling, True
                )
    outputs = (
        ("classes", aggregate.class_counts, ref.class_counts, False),
        ("confidence", aggregate.confidence_counts, ref.confidence_counts, True),
    )
    for name, window_counts, ref_counts, ordered in outputs:
        if name not in config.targets:
            continue
        if ref_counts is None:
            notes.append(f"{name}: the reference has no {name} histogram, skipped")
            continue
        if not window_counts:
            notes.append(f"{name}: the window has no {name} histogram, skipped")
            continue
        if len(window_counts) != len(ref_counts):
            raise DriftError(
                f"{name}: the window has {len(window_counts)} bins, the reference {len(ref_counts)}"
            )
        w = np.asarray(window_counts, dtype=np.float64)
        r = np.asarray(ref_counts, dtype=np.float64)
        add(name, name, w, r, float(w.sum()), float(r.sum()), ordered)
    return out
