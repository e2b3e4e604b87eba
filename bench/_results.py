"""What every benchmark writes: the machine it ran on, and its results as JSON + Markdown."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from device_agent.fsio import atomic_write_bytes


def run_meta(command: str, seconds: float, **extra: Any) -> dict[str, Any]:
    """When, where and how a benchmark ran."""
    return {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "command": command,
        "seconds": seconds,
        **extra,
    }


def write_results(out: Path, name: str, document: dict[str, Any], markdown: str) -> None:
    """``<out>/<name>.json`` and ``<out>/<name>.md``, each written atomically."""
    payload = json.dumps(document, indent=2, default=str) + "\n"
    atomic_write_bytes(out / f"{name}.json", payload.encode())
    atomic_write_bytes(out / f"{name}.md", markdown.encode())


def write_and_report(out: Path, name: str, document: dict[str, Any], markdown: str) -> None:
    """:func:`write_results`, then one line: how many of the document's targets were met."""
    write_results(out, name, document, markdown)
    met = sum(target["met"] for target in document["targets"])
    print(f"{met}/{len(document['targets'])} targets met; see {out / f'{name}.md'}")


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    """The Markdown table of a benchmark's targets (``target``, ``text``, ``met`` each)."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['text']} | {'yes' if t['met'] else '**no**'} |")
    return lines
