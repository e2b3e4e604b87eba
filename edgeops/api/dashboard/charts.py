"""Charts as inline SVG, drawn on the server: no chart library, nothing fetched by the browser.

Every function returns :class:`markupsafe.Markup` holding one ``<svg>`` element; text that
comes from data (labels, names) is escaped. Colours come from the stylesheet's classes
(``bar-ref``, ``bar-live``, ``dot-fit`` ...), so the charts follow the page's theme.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeGuard

from markupsafe import Markup, escape

__all__ = ["histogram_pair", "pareto_plot", "stacked_bars", "timeline"]

SERIES = 8
"""stacked bars cycle through this many colour classes (``s0`` ... ``s7``)"""


def _f(value: float) -> str:
    return f"{value:.1f}"


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    return Markup(  # noqa: S704 - every value from data in `body` and `label` is escaped
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


LARGEST = 1e15
"""numbers beyond ±this are left out of charts (no size, accuracy or count is that large)"""


def _number(value: object) -> TypeGuard[int | float]:
    """A finite int or float (not a bool) within ±:data:`LARGEST`."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= LARGEST
    )


def _span(lo: float, hi: float, least: float) -> tuple[float, float]:
    """The axis range for data from ``lo`` to ``hi``: a tenth of the width added on each
    side, never empty. Equal ends are first spread by a tenth of their size, at least
    ``least``, so a single point sits in the middle; a range too wide to compute falls back
    to 0 .. 1."""
    if hi <= lo:
        spread = max(abs(lo) * 0.1, least)
        lo, hi = lo - spread, hi + spread
    width = hi - lo
    lo, hi = lo - width * 0.1, hi + width * 0.1
    if not (math.isfinite(lo) and math.isfinite(hi) and hi - lo > 0):
        return 0.0, 1.0
    return lo, hi


def _kib(value: float) -> str:
    return f"{value / 1024:.1f} KiB" if value < 1024 * 1024 else f"{value / 1024**2:.2f} MiB"


def pareto_plot(points: Sequence[Mapping[str, Any]], *, label: str = "Pareto front") -> Markup:
    """Accuracy (y) against flash size (x) of compression candidates; each dot's area follows
    its RAM figure (``ram_bytes``; unknown RAM: a hollow square). ``points`` are
    :meth:`edgeops.compress.search.Candidate.to_dict` documents; fitting ones are filled."""
    usable = [p for p in points if _number(p.get("flash_bytes")) and _number(p.get("accuracy"))]
    width, height, left, right, top, bottom = 580, 320, 64, 44, 16, 48
    body: list[str] = []
    if not usable:
        body.append(f'<text x="{width / 2}" y="{height / 2}" class="axis" text-anchor="middle">'
                    "no candidates with size and accuracy</text>")  # fmt: skip
        return _svg(width, height, body, label)
    xs = [float(p["flash_bytes"]) for p in usable]
    ys = [float(p["accuracy"]) for p in usable]
    rams = [max(0.0, float(p["ram_bytes"])) for p in usable if _number(p.get("ram_bytes"))]
    x0, x1 = _span(min(xs), max(xs), 1.0)
    y0, y1 = _span(min(ys), max(ys), 0.05)
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    def sy(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * plot_h

    body.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        body.append(
            f'<text x="{_f(sx(xv))}" y="{height - bottom + 16}" class="axis" '
            f'text-anchor="middle">{escape(_kib(xv))}</text>'
            f'<text x="{left - 6}" y="{_f(sy(yv) + 4)}" class="axis" '
            f'text-anchor="end">{yv:.3f}</text>'
        )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" class="axis-title" '
        'text-anchor="middle">flash size</text>'
        f'<text x="14" y="{top + plot_h / 2}" class="axis-title" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">accuracy</text>'
    )
    ram_max = max(rams, default=0.0) or 1.0  # every RAM figure 0: the smallest dots
    ordered = sorted(usable, key=lambda p: float(p["flash_bytes"]))
    front = [(sx(float(p["flash_bytes"])), sy(float(p["accuracy"]))) for p in ordered]
    body.append(
        '<polyline class="front-line" points="'
        + " ".join(f"{_f(x)},{_f(y)}" for x, y in front)
        + '"/>'
    )
    for p in ordered:
        cx, cy = sx(float(p["flash_bytes"])), sy(float(p["accuracy"]))
        ram = p.get("ram_bytes")
        what = " ".join(
            str(part)
            for part in (
                f"width {p.get('width')}" if p.get("width") is not None else "",
                f"sparsity {p.get('sparsity')}" if p.get("sparsity") is not None else "",
                p.get("quantization") or "",
            )
            if part
        )
        tip = (
            f"{what}: accuracy {float(p['accuracy']):.4f}, flash {_kib(float(p['flash_bytes']))}, "
            f"RAM {_kib(float(ram)) if _number(ram) else 'unknown'}"
        )
        klass = "dot-fit" if p.get("fits") else "dot-misfit"
        if _number(ram):
            r = 4 + 10 * (max(0.0, float(ram)) / ram_max) ** 0.5
            body.append(
                f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="{_f(r)}" class="{klass}">'
                f"<title>{escape(tip)}</title></circle>"
            )
        else:
            body.append(
                f'<rect x="{_f(cx - 5)}" y="{_f(cy - 5)}" width="10" height="10" '
                f'class="{klass} hollow"><title>{escape(tip)}</title></rect>'
            )
    return _svg(width, height, body, label)


def histogram_pair(
    reference: Sequence[float],
    live: Sequence[float] | None,
    *,
    label: str,
    width: int = 220,
    height: int = 90,
) -> Markup:
    """Reference and live bin proportions side by side in each bin (counts normalised to
    sum 1, so windows of any size compare with the reference)."""
    ref_c = [max(0.0, float(c)) if _number(c) else 0.0 for c in reference]
    live_c = None if live is None else [max(0.0, float(c)) if _number(c) else 0.0 for c in live]
    bins = max(len(ref_c), len(live_c or []))
    body: list[str] = []
    ref_total = sum(ref_c) or 1.0  # no count at all: every bar 0
    live_total = sum(live_c or []) or 1.0
    ref_p = [c / ref_total for c in ref_c] + [0.0] * (bins - len(ref_c))
    live_p = (
        None if live_c is None else [c / live_total for c in live_c] + [0.0] * (bins - len(live_c))
    )
    top = max([*ref_p, *(live_p or []), 1e-9])
    base = height - 4
    body.append(f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" class="baseline"/>')
    if bins:
        slot = width / bins
        bar = slot * (0.42 if live_p is not None else 0.8)
        for i in range(bins):
            h = ref_p[i] / top * (base - 4)
            body.append(
                f'<rect x="{_f(i * slot + slot * 0.08)}" y="{_f(base - h)}" width="{_f(bar)}" '
                f'height="{_f(h)}" class="bar-ref"><title>bin {i}: reference '
                f"{ref_p[i]:.3f}</title></rect>"
            )
            if live_p is not None:
                h = live_p[i] / top * (base - 4)
                body.append(
                    f'<rect x="{_f(i * slot + slot * 0.08 + bar)}" y="{_f(base - h)}" '
                    f'width="{_f(bar)}" height="{_f(h)}" class="bar-live"><title>bin {i}: live '
                    f"{live_p[i]:.3f}</title></rect>"
                )
    return _svg(width, height, body, label)


def stacked_bars(
    rows: Sequence[tuple[str, Mapping[str, int]]], series: Sequence[str], *, label: str
) -> Markup:
    """One horizontal bar per row (a cohort), split by series (model versions) in the order
    given; segment ``i`` has class ``s{i % SERIES}``."""
    width, row_h, left = 560, 26, 150
    height = max(1, len(rows)) * row_h + 8
    body: list[str] = []
    most = max((sum(max(0, c) for c in counts.values()) for _, counts in rows), default=0) or 1
    for r, (name, counts) in enumerate(rows):
        y = 4 + r * row_h
        body.append(
            f'<text x="{left - 8}" y="{y + 16}" class="axis" text-anchor="end">'
            f"{escape(name[:24])}</text>"
        )
        x = float(left)
        for i, key in enumerate(series):
            count = counts.get(key, 0)
            if count <= 0:
                continue
            w = count / most * (width - left - 10)
            body.append(
                f'<rect x="{_f(x)}" y="{y}" width="{_f(w)}" height="{row_h - 6}" '
                f'class="s{i % SERIES}"><title>{escape(name)}: {escape(key)}: {count}'
                "</title></rect>"
            )
            x += w
    return _svg(width, height, body, label)


def timeline(events: Sequence[tuple[datetime, str, str]], *, label: str) -> Markup:
    """Drift onsets on a time axis: ``(when, what, css class)``, one dot each, the first and
    last times written under the axis."""
    width, height, pad = 720, 70, 24
    body: list[str] = [
        f'<line x1="{pad}" y1="30" x2="{width - pad}" y2="30" class="baseline"/>',
    ]
    if events:
        times = [e[0].timestamp() for e in events]
        t0, t1 = min(times), max(times)
        span = (t1 - t0) or 1.0
        for (when, what, klass), t in zip(events, times, strict=True):
            x = pad + (t - t0) / span * (width - 2 * pad) if t1 > t0 else width / 2
            body.append(
                f'<circle cx="{_f(x)}" cy="30" r="7" class="{escape(klass)}">'
                f"<title>{escape(when.strftime('%Y-%m-%d %H:%M:%S'))} {escape(what)}</title>"
                "</circle>"
            )
        first = min(events, key=lambda e: e[0])[0].strftime("%Y-%m-%d %H:%M")
        last = max(events, key=lambda e: e[0])[0].strftime("%Y-%m-%d %H:%M")
        body.append(f'<text x="{pad}" y="60" class="axis">{escape(first)}</text>')
        if last != first:
            body.append(
                f'<text x="{width - pad}" y="60" class="axis" text-anchor="end">'
                f"{escape(last)}</text>"
            )
    return _svg(width, height, body, label)
