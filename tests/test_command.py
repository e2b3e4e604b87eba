"""Command templates (a board's flash, reset or power command): checked once, run in a
process group of their own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_agent.command import TemplateError, fill_template, parse_template, run_in_group


def test_a_template_is_split_checked_and_filled() -> None:
    words = parse_template("openocd -c 'program {image} reset exit' -p {port}", ("image", "port"))
    assert fill_template(words, image="/x/fw.elf", port="/dev/ttyACM0") == [
        "openocd", "-c", "program /x/fw.elf reset exit", "-p", "/dev/ttyACM0",
    ]  # fmt: skip
    assert fill_template(parse_template("echo {{literal}} {image}", ("image",)), image="a") == [
        "echo", "{literal}", "a",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("template", "needle", "unknown", "missing", "empty"),
    [
        ("flash {image} {speed}", "unknown placeholder(s) {speed}", ("speed",), (), False),
        ("flash {img}", "unknown placeholder(s) {img}", ("img",), ("image",), False),
        ("st-flash write 0x8000000", "{image} is missing", (), ("image",), False),
        ("flash {} {image}", "unknown placeholder(s) {}", ("",), (), False),
        ("flash '{image}", "not a valid command line", (), (), False),
        ("flash {image", "not a valid template", (), (), False),
        ("   ", "an empty command", (), (), True),
    ],
)
def test_a_bad_template_is_one_line_naming_the_problem(
    template: str, needle: str, unknown: tuple[str, ...], missing: tuple[str, ...], empty: bool
) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(template, ("image", "port"), required=("image",))
    error = caught.value
    assert needle in str(error) and "\n" not in str(error)
    assert (error.unknown, error.missing, error.empty) == (unknown, missing, empty)


def test_a_command_that_outlives_its_timeout_is_killed_with_what_it_started(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('flashing...', file=sys.stderr, flush=True)\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_in_group([sys.executable, "-c", script], timeout_s=3.0)
    assert "flashing..." in str(caught.value.stderr)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the grandchild went with the group


def test_exit_status_and_output_are_returned() -> None:
    done = run_in_group([sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], 30.0)
    assert done.returncode == 3 and done.stdout.strip() == "bad"
    with pytest.raises(FileNotFoundError):
        run_in_group(["/nonexistent/flasher"], 5.0)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
