"""The distribution: the agent installs and runs with the ``agent`` extra alone.

This builds the project from the working tree into an empty virtualenv, as a device image
would, so it is slow (about a minute with a warm pip cache).
"""

from __future__ import annotations

import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty virtualenv with ``pip install '.[agent]'`` from this checkout."""
    root = tmp_path_factory.mktemp("agent-venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    # build from a copy-free source: pip builds the wheel in its own temp dir
    result = _run(
        str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off", f"{ROOT}[agent]"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    yield python


def test_agent_imports_without_tensorflow_or_fastapi(agent_venv: Path) -> None:
    probe = (
        "import importlib.util, device_agent, device_agent.daemon, device_agent.link, "
        "device_agent.config, device_agent.protocol\n"
        "missing = [m for m in ('tensorflow', 'fastapi', 'sqlmodel', 'typer') "
        "if importlib.util.find_spec(m) is None]\n"
        "print(device_agent.__version__, ','.join(missing))\n"
    )
    result = _run(str(agent_venv), "-c", probe)
    assert result.returncode == 0, result.stderr
    version, missing = result.stdout.split()
    assert version == "0.1.0"
    assert missing.split(",") == ["tensorflow", "fastapi", "sqlmodel", "typer"]
    tf = _run(str(agent_venv), "-c", "import tensorflow")
    assert tf.returncode != 0 and "No module named 'tensorflow'" in tf.stderr


def test_agent_has_its_device_runtime(agent_venv: Path) -> None:
    result = _run(str(agent_venv), "-c", "from ai_edge_litert.interpreter import Interpreter")
    assert result.returncode == 0, result.stderr


def test_agent_command_runs_from_the_agent_extra(agent_venv: Path) -> None:
    agent = agent_venv.parent / "edgeops-agent"
    assert _run(str(agent), "--help").returncode == 0
    shown = _run(str(agent), "config", "--device-id", "probe-1")
    assert shown.returncode == 0, shown.stderr
    assert '"device_id": "probe-1"' in shown.stdout


def test_agent_runs_against_a_real_broker_from_the_agent_extra(
    agent_venv: Path, mosquitto_url: str, tmp_path: Path
) -> None:
    """The daemon from the agent-only install connects and publishes its retained state."""
    from device_agent.link import Message, MqttEndpoint, MqttLink
    from device_agent.protocol import Channel, StateReport, decode, device_topic

    watcher = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="watcher")
    watcher.subscribe(device_topic("pkg-1", Channel.STATE))
    watcher.start(wait_s=10)
    agent = subprocess.Popen(
        [str(agent_venv.parent / "edgeops-agent"), "run", "--device-id", "pkg-1",
         "--mqtt-url", mosquitto_url, "--data-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        report = None
        for _ in range(200):
            event = watcher.get(timeout_s=0.1)
            if isinstance(event, Message):
                report = decode(Channel.STATE, event.payload)
                break
        assert isinstance(report, StateReport), "no state report from the agent"
        assert report.device_id == "pkg-1" and report.agent_version == "0.1.0"
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        watcher.stop()
    assert agent.returncode == 0


def test_firmware_templates_ship_as_package_data(agent_venv: Path) -> None:
    """Every file of the source tree's templates is in the installed package."""
    source = Path(__file__).resolve().parent.parent / "firmware_templates"
    expected = sorted(
        path.relative_to(source).as_posix()
        for path in source.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    )
    assert "mps2/startup.c" in expected and "zephyr/CMakeLists.txt" in expected
    probe = (
        "import sys; import firmware_templates as f; root = f.template_root(); "
        "print(all((root / name).is_file() for name in sys.argv[1:]))"
    )
    result = _run(str(agent_venv), "-c", probe, *expected)
    assert result.stdout.strip() == "True", result.stderr
