"""What a plan run found, and the three files it is written to.

:class:`PlanResult` holds one :class:`StepResult` per step (status, duration, message,
metrics, series for plots) and the timeline of what happened (faults, state changes).
:func:`write_reports` writes, each atomically (temporary file, fsync, rename):

- ``results.json``: everything, as :meth:`PlanResult.to_dict` (read back with
  :meth:`PlanResult.from_dict`);
- ``junit.xml``: one ``testsuite`` per plan, one ``testcase`` per step with its time, a
  ``failure``, ``error`` or ``skipped`` element carrying the message, and the step's
  metrics as ``properties`` (the schema Jenkins' JUnit plugin and GitLab read);
- ``report.html``: one self-contained page (inline CSS and inline SVG, no script and no
  external reference) with the steps, their timings, a step timeline with the faults on it
  and, for steps that measured latencies, a histogram and a per-sample plot.
"""

from __future__ import annotations

import html
import json
import math
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.fsio import atomic_write_bytes

__all__ = [
    "STATUSES",
    "PlanResult",
    "StepResult",
    "TimelineEvent",
    "render_html",
    "render_junit",
    "write_reports",
]

STATUSES = ("passed", "failed", "skipped", "error")

Metric = float | int | str | bool | None


@dataclass
class TimelineEvent:
    """Something that happened at ``t_s`` seconds after the plan started."""

    t_s: float
    what: str
    """``fault``, ``state``, ``step`` or ``note``."""
    text: str
    board: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"t_s": self.t_s, "what": self.what, "text": self.text, "board": self.board}


@dataclass
class StepResult:
    """One step's outcome."""

    name: str
    action: str
    status: str = "passed"
    """``passed``, ``failed`` (an assertion did not hold), ``skipped`` or ``error`` (the step
    could not be carried out)."""
    message: str = ""
    started_s: float = 0.0
    """When the step started, in seconds after the plan started."""
    duration_s: float = 0.0
    metrics: dict[str, Metric] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    """Named sample series; names ending in ``_ms`` are latencies in milliseconds."""
    rows: list[dict[str, Metric]] = field(default_factory=list)
    """A table of per-item results (one row per model and target, per board ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "status": self.status,
            "message": self.message,
            "started_s": self.started_s,
            "duration_s": self.duration_s,
            "metrics": dict(self.metrics),
            "series": {k: list(v) for k, v in self.series.items()},
            "rows": [dict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        return cls(
            name=str(data["name"]),
            action=str(data["action"]),
            status=str(data["status"]),
            message=str(data.get("message", "")),
            started_s=float(data.get("started_s", 0.0)),
            duration_s=float(data.get("duration_s", 0.0)),
            metrics=dict(data.get("metrics", {})),
            series={k: [float(x) for x in v] for k, v in data.get("series", {}).items()},
            rows=[dict(r) for r in data.get("rows", [])],
        )


@dataclass
class PlanResult:
    """A whole run."""

    plan: str
    description: str = ""
    seed: int = 0
    started_at: str = ""
    """ISO 8601 UTC time the run started."""
    duration_s: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    timeline: list[TimelineEvent] = field(default_factory=list)
    boards: dict[str, str] = field(default_factory=dict)
    """Board name -> what it is (``qemu mps2-an385``), or why it was skipped."""
    interrupted: bool = False
    """The run was stopped (Ctrl-C, the plan's timeout) before every step ran."""

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for step in self.steps:
            out[step.status] = out.get(step.status, 0) + 1
        return out

    @property
    def passed(self) -> bool:
        """No step failed or erred and the run was not interrupted (skipped steps pass)."""
        counts = self.counts()
        return not self.interrupted and counts["failed"] == 0 and counts["error"] == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "plan": self.plan,
            "description": self.description,
            "seed": self.seed,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "passed": self.passed,
            "interrupted": self.interrupted,
            "counts": self.counts(),
            "boards": dict(self.boards),
            "steps": [s.to_dict() for s in self.steps],
            "timeline": [e.to_dict() for e in self.timeline],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanResult:
        return cls(
            plan=str(data["plan"]),
            description=str(data.get("description", "")),
            seed=int(data.get("seed", 0)),
            started_at=str(data.get("started_at", "")),
            duration_s=float(data.get("duration_s", 0.0)),
            steps=[StepResult.from_dict(s) for s in data.get("steps", [])],
            timeline=[TimelineEvent(**e) for e in data.get("timeline", [])],
            boards=dict(data.get("boards", {})),
            interrupted=bool(data.get("interrupted", False)),
        )


# -- JUnit -------------------------------------------------------------------------------------

# XML 1.0 allows tab, newline, carriage return and U+0020 upwards (minus surrogates and two
# non-characters); anything else in a message (a board's garbled UART output, bytes decoded
# with surrogateescape) is replaced.
_XML_BAD = (
    {c: "?" for c in range(0x20) if c not in (0x9, 0xA, 0xD)}
    | {c: "?" for c in range(0xD800, 0xE000)}
    | {0xFFFE: "?", 0xFFFF: "?"}
)


def _xml_text(value: object) -> str:
    return str(value).translate(_XML_BAD)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:500]


def _metric_text(value: Metric) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return ""
    return str(value)


def render_junit(result: PlanResult) -> bytes:
    """The run as JUnit XML (``testsuites`` > ``testsuite`` > ``testcase``)."""
    counts = result.counts()
    attrs = {
        "name": f"hil.{result.plan}",
        "tests": str(len(result.steps)),
        "failures": str(counts["failed"]),
        "errors": str(counts["error"]),
        "skipped": str(counts["skipped"]),
        "time": f"{result.duration_s:.3f}",
    }
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            **attrs,
            "timestamp": result.started_at,
            "hostname": _xml_text(socket.gethostname()),
        },
    )
    props = ET.SubElement(suite, "properties")
    suite_props: dict[str, Metric] = {"seed": result.seed, "interrupted": result.interrupted}
    suite_props.update({f"board.{k}": v for k, v in result.boards.items()})
    for key, value in suite_props.items():
        ET.SubElement(props, "property", {"name": key, "value": _xml_text(_metric_text(value))})
    for step in result.steps:
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": f"hil.{result.plan}",
                "name": _xml_text(step.name),
                "time": f"{step.duration_s:.3f}",
            },
        )
        if step.metrics:
            case_props = ET.SubElement(case, "properties")
            for key, value in step.metrics.items():
                ET.SubElement(
                    case_props,
                    "property",
                    {"name": _xml_text(key), "value": _xml_text(_metric_text(value))},
                )
        message = _xml_text(step.message)
        if step.status == "failed":
            element = ET.SubElement(
                case, "failure", {"message": _first_line(message), "type": "AssertionError"}
            )
            element.text = message
        elif step.status == "error":
            element = ET.SubElement(
                case, "error", {"message": _first_line(message), "type": "StepError"}
            )
            element.text = message
        elif step.status == "skipped":
            ET.SubElement(case, "skipped", {"message": _first_line(message)})
        elif message:
            out = ET.SubElement(case, "system-out")
            out.text = message
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


# -- HTML --------------------------------------------------------------------------------------

_COLOURS = {
    "passed": "#2e7d32",
    "failed": "#c62828",
    "error": "#ef6c00",
    "skipped": "#9e9e9e",
}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;color:#fff;font-weight:600}
.passed{background:#2e7d32}.failed{background:#c62828}.error{background:#ef6c00}
.skipped{background:#9e9e9e}.msg{white-space:pre-wrap;font-family:monospace;font-size:12px}
.summary span{margin-right:1.2em}svg{background:#fafafa;border:1px solid #eee}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Metric) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def _timeline_svg(result: PlanResult) -> str:
    steps = result.steps
    if not steps:
        return ""
    total = max(
        [result.duration_s, *(s.started_s + s.duration_s for s in steps), 1e-3]
        + [e.t_s for e in result.timeline]
    )
    label_w, width, row_h, top = 210, 860, 18, 10
    faults = [e for e in result.timeline if e.what == "fault"]
    height = top + row_h * len(steps) + 40 + (14 if faults else 0)
    plot_w = width - label_w - 10

    def x(t: float) -> float:
        return label_w + plot_w * max(0.0, t) / total

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="step timeline">']
    for i, step in enumerate(steps):
        y = top + i * row_h
        colour = _COLOURS.get(step.status, "#555")
        w = max(1.5, x(step.started_s + step.duration_s) - x(step.started_s))
        parts.append(f'<text x="4" y="{y + 12}">{_e(step.name[:32])}</text>')
        parts.append(
            f'<rect x="{x(step.started_s):.1f}" y="{y + 2}" width="{w:.1f}" '
            f'height="{row_h - 4}" fill="{colour}"><title>{_e(step.name)}: {_e(step.status)}, '
            f"{step.duration_s:.2f} s</title></rect>"
        )
    axis_y = top + row_h * len(steps) + 4
    parts.append(
        f'<line x1="{label_w}" y1="{axis_y}" x2="{width - 10}" y2="{axis_y}" stroke="#888"/>'
    )
    for k in range(6):
        t = total * k / 5
        parts.append(
            f'<text x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="middle">{t:.1f} s</text>'
        )
    for event in faults:
        fx = x(event.t_s)
        parts.append(
            f'<line x1="{fx:.1f}" y1="{top}" x2="{fx:.1f}" y2="{axis_y}" stroke="#c62828" '
            f'stroke-dasharray="3,2"><title>{_e(event.text)}</title></line>'
        )
        parts.append(
            f'<path d="M{fx - 4:.1f},{axis_y + 30} L{fx + 4:.1f},{axis_y + 30} '
            f'L{fx:.1f},{axis_y + 22} Z" fill="#c62828"><title>{event.t_s:.2f} s: '
            f"{_e(event.text)}</title></path>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _histogram_svg(values: Sequence[float], unit: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    width, height, left, bottom = 420, 200, 46, 30
    lo, hi = min(finite), max(finite)
    bins = max(1, min(30, int(math.sqrt(len(finite))) + 1))
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1 or 1.0
    if hi == lo:
        lo -= span / 2
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    peak = max(counts)
    plot_w, plot_h = width - left - 10, height - bottom - 10
    bar_w = plot_w / bins
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="histogram">']
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        parts.append(
            f'<rect x="{left + i * bar_w:.1f}" y="{10 + plot_h - h:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#1565c0">'
            f"<title>{lo + i * span / bins:.3g}-{lo + (i + 1) * span / bins:.3g} {_e(unit)}: "
            f"{c}</title></rect>"
        )
    base = 10 + plot_h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#888"/>')
    parts.append(f'<text x="{left}" y="{base + 14}">{lo:.3g}</text>')
    parts.append(f'<text x="{width - 10}" y="{base + 14}" text-anchor="end">{lo + span:.3g}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{base + 26}" text-anchor="middle">{_e(unit)}</text>'
    )
    parts.append(f'<text x="4" y="18">{peak}</text><text x="4" y="{base}">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def _samples_svg(values: Sequence[float], unit: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    width, height, left, bottom = 420, 200, 46, 30
    lo, hi = min(0.0, min(finite)), max(finite)
    span = hi - lo or 1.0
    plot_w, plot_h = width - left - 10, height - bottom - 10
    n = len(values)

    def point(i: int, v: float) -> str:
        px = left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)
        py = 10 + plot_h - plot_h * (v - lo) / span
        return f"{px:.1f},{py:.1f}"

    pts = " ".join(point(i, v) for i, v in enumerate(values) if math.isfinite(v))
    base = 10 + plot_h
    return (
        f'<svg width="{width}" height="{height}" '
        f'role="img" aria-label="per-sample plot">'
        f'<polyline points="{pts}" fill="none" stroke="#1565c0" stroke-width="1.2"/>'
        f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#888"/>'
        f'<text x="4" y="18">{hi:.3g}</text><text x="4" y="{base}">{lo:.3g}</text>'
        f'<text x="{left}" y="{base + 14}">1</text>'
        f'<text x="{width - 10}" y="{base + 14}" text-anchor="end">{n}</text>'
        f'<text x="{left + plot_w / 2:.0f}" y="{base + 26}" text-anchor="middle">'
        f"sample ({_e(unit)})</text></svg>"
    )


def _series_unit(name: str) -> str:
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("_bytes", "bytes"), ("_cycles", "cycles")):
        if name.endswith(suffix):
            return unit
    return ""


def _rows_table(rows: Sequence[Mapping[str, Metric]]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{_e(_fmt(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(result: PlanResult) -> str:
    """The run as one self-contained HTML page."""
    counts = result.counts()
    verdict = "passed" if result.passed else "failed"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>HIL plan {_e(result.plan)}: {verdict}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>HIL plan <code>{_e(result.plan)}</code> <span class="badge {verdict}">'
        f"{verdict}</span></h1>",
    ]
    if result.description:
        out.append(f"<p>{_e(result.description)}</p>")
    out.append(
        '<p class="summary">'
        + "".join(f"<span>{_e(k)}: <b>{v}</b></span>" for k, v in counts.items())
        + f"<span>seed: <b>{result.seed}</b></span>"
        + f"<span>started: <b>{_e(result.started_at)}</b></span>"
        + f"<span>duration: <b>{result.duration_s:.1f} s</b></span>"
        + ("<span><b>interrupted</b></span>" if result.interrupted else "")
        + "</p>"
    )
    if result.boards:
        out.append("<h2>Boards</h2><table><tr><th>board</th><th>what</th></tr>")
        out.extend(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in result.boards.items())
        out.append("</table>")
    out.append(
        "<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>action</th><th>status</th>"
        "<th>start (s)</th><th>time (s)</th><th>message</th></tr>"
    )
    for i, step in enumerate(result.steps, 1):
        out.append(
            f'<tr><td class="num">{i}</td><td><a href="#step-{i}">{_e(step.name)}</a></td>'
            f"<td>{_e(step.action)}</td>"
            f'<td><span class="badge {_e(step.status)}">{_e(step.status)}</span></td>'
            f'<td class="num">{step.started_s:.2f}</td><td class="num">{step.duration_s:.2f}</td>'
            f'<td class="msg">{_e(_first_line(step.message))}</td></tr>'
        )
    out.append("</table>")
    out.append("<h2>Timeline</h2>")
    out.append(_timeline_svg(result))
    events = [e for e in result.timeline if e.what != "step"]
    if events:
        out.append("<table><tr><th>t (s)</th><th>what</th><th>board</th><th>event</th></tr>")
        out.extend(
            f'<tr><td class="num">{e.t_s:.2f}</td><td>{_e(e.what)}</td>'
            f"<td>{_e(e.board or '')}</td><td>{_e(e.text)}</td></tr>"
            for e in events
        )
        out.append("</table>")
    out.append("<h2>Step details</h2>")
    for i, step in enumerate(result.steps, 1):
        out.append(
            f'<h3 id="step-{i}">{i}. {_e(step.name)} <span class="badge {_e(step.status)}">'
            f"{_e(step.status)}</span></h3>"
        )
        if step.message:
            out.append(f'<div class="msg">{_e(step.message)}</div>')
        if step.metrics:
            out.append("<table><tr><th>metric</th><th>value</th></tr>")
            out.extend(
                f'<tr><td>{_e(k)}</td><td class="num">{_e(_fmt(v))}</td></tr>'
                for k, v in step.metrics.items()
            )
            out.append("</table>")
        if step.rows:
            out.append(_rows_table(step.rows))
        for name, values in step.series.items():
            if len(values) < 2:
                continue
            unit = _series_unit(name)
            out.append(f"<p><b>{_e(name)}</b> ({len(values)} samples)</p>")
            out.append(_histogram_svg(values, unit))
            out.append(" ")
            out.append(_samples_svg(values, unit))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# C0 controls other than whitespace are not allowed in HTML text, nor lone surrogates in UTF-8
_HTML_BAD = {c: "?" for c in range(0x20) if c not in (0x9, 0xA, 0xC, 0xD)} | {
    c: "?" for c in range(0xD800, 0xE000)
}


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_reports(result: PlanResult, directory: Path) -> dict[str, Path]:
    """Write ``results.json``, ``junit.xml`` and ``report.html`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(result.to_dict()), indent=2, default=str, allow_nan=False)
    files = {
        "results.json": (text + "\n").encode(),
        "junit.xml": render_junit(result),
        # a lone surrogate (bytes decoded with surrogateescape) cannot be encoded: "?"
        "report.html": render_html(result).translate(_HTML_BAD).encode(),
    }
    written: dict[str, Path] = {}
    for name, data in files.items():
        path = directory / name
        atomic_write_bytes(path, data)
        written[name] = path
    return written
