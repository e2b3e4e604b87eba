"""Commands an operator configures as templates, checked, filled in and run without a shell.

A board's flash, reset or power command (the gateway's ``[mcu]`` table, the rig's serial
boards and plans) is one line split like a shell line (:func:`shlex.split`); its words may
hold ``{name}`` placeholders, filled with :meth:`str.format` (``{{`` and ``}}`` for literal
braces). :func:`parse_template` checks a template once, where it is configured;
:func:`run_in_group` runs the filled-in command in a process group of its own, so a timeout
kills every process it started (openocd under ``west flash``, a debug probe's server), not
only the first one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import string
import subprocess
from collections.abc import Collection, Sequence

__all__ = ["DRAIN_S", "TemplateError", "fill_template", "parse_template", "run_in_group"]

DRAIN_S = 2.0
"""Seconds a killed command's last output is collected for (a process outside its group may
hold its pipes)."""


class TemplateError(ValueError):
    """A command template that does not split into words or uses placeholders it may not.

    ``empty``: it splits into no word; ``unknown``: placeholders not allowed; ``missing``:
    required placeholders it lacks (none of these for a template that does not split). The
    message is one line, without the name of the setting (the caller's error names it).
    """

    def __init__(
        self,
        message: str,
        *,
        empty: bool = False,
        unknown: Sequence[str] = (),
        missing: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.empty = empty
        self.unknown = tuple(unknown)
        self.missing = tuple(missing)


def _braced(names: Collection[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def parse_template(
    template: str, allowed: Collection[str], *, required: Collection[str] = ()
) -> list[str]:
    """The words of ``template``; TemplateError if it does not split like a shell line, is
    empty, holds a placeholder not in ``allowed`` (``{}`` and ``{0}`` included) or lacks one
    of ``required``."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise TemplateError(f"not a valid command line: {exc}") from None
    if not words:
        raise TemplateError("an empty command", empty=True)
    names: set[str] = set()
    for word in words:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(word)]
        except ValueError as exc:
            raise TemplateError(f"not a valid template: {exc} in {word!r}") from None
        names.update(name for name in fields if name is not None)
    unknown = sorted(names - set(allowed))
    missing = sorted(set(required) - names)
    if unknown:
        raise TemplateError(
            f"unknown placeholder(s) {_braced(unknown)}; only {_braced(sorted(allowed))} are "
            "replaced (write {{ and }} for literal braces)",
            unknown=unknown,
            missing=missing,
        )
    if missing:
        raise TemplateError(f"{_braced(missing)} is missing", missing=missing)
    return words


def fill_template(words: Sequence[str], **values: str) -> list[str]:
    """The words of a template checked by :func:`parse_template` with its placeholders
    filled in."""
    return [word.format(**values) for word in words]


def run_in_group(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell, no input) in a process group of its own; its exit status and
    output (text; undecodable bytes replaced).

    On a timeout, or any exception while waiting (Ctrl-C), the whole group is killed; a
    timeout raises :class:`subprocess.TimeoutExpired` carrying what the command printed.
    OSError if it cannot start (``FileNotFoundError`` for a missing program).
    """
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            _kill_group(process)
            try:
                stdout, stderr = process.communicate(timeout=DRAIN_S)
            except subprocess.TimeoutExpired:
                stdout, stderr = _text(exc.stdout), _text(exc.stderr)
            raise subprocess.TimeoutExpired(
                process.args, timeout_s, output=stdout, stderr=stderr
            ) from None
        except BaseException:
            _kill_group(process)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data or ""


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL the process group ``process`` leads and reap ``process``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()
