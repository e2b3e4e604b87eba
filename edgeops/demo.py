"""``edgeops demo``: the walking skeleton of the whole loop, on one machine, zero setup.

It starts a broker (the embedded one unless ``EDGEOPS_MQTT_URL`` is set), migrates the
database under the data dir, connects the hub's MQTT bridge, and launches N device agents as
child processes, each with its own identity. It waits until the hub has recorded every
device online and prints the fleet. ``--headless`` then stops the agents (they publish
offline presence) and ends; otherwise it shows presence live until Ctrl-C. On every way out
each child process is stopped and reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_agent.link import MqttEndpoint
from edgeops.config import Settings
from edgeops.errors import EdgeOpsError
from edgeops.fleet import DeviceView, FleetService

if TYPE_CHECKING:
    from edgeops.hub.bridge import HubBridge

STOP_GRACE_S = 10.0


@dataclass
class AgentProcess:
    device_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def reap(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log_file.close()
        return code


def spawn_agent(settings: Settings, device_id: str, url: str, cohort: str) -> AgentProcess:
    """Start ``edgeops-agent run`` for one simulated device, logging to the data dir."""
    log_dir = settings.data_dir / "demo" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{device_id}.log"
    log_file = log_path.open("ab")
    command = [
        sys.executable, "-m", "device_agent", "run",
        "--device-id", device_id,
        "--mqtt-url", url,
        "--data-dir", str(settings.data_dir),
        "--tags", f"demo=true,cohort={cohort}",
        "--log-json",
    ]  # fmt: skip
    env = {**os.environ, "EDGEOPS_DEV_MODE": "1"}
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return AgentProcess(device_id, process, log_path, log_file)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so children are stopped either way."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fleet_table(devices: list[DeviceView]) -> Table:
    table = Table("device", "presence", "agent", "hardware", "last seen (UTC)", title="Fleet")
    for device in devices:
        hardware = ", ".join(f"{k}={v}" for k, v in sorted(device.hardware.items()))
        seen = device.last_seen.strftime("%H:%M:%S") if device.last_seen else "-"
        presence = "[green]online[/]" if device.online else "[red]offline[/]"
        table.add_row(device.device_id, presence, device.agent_version or "-", hardware, seen)
    return table


def run_demo(
    settings: Settings,
    *,
    devices: int,
    headless: bool,
    timeout_s: float,
    as_json: bool,
    console: Console,
) -> int:
    """Run the demo; returns the exit code."""
    from edgeops.broker import EmbeddedBrokerProcess
    from edgeops.db import Database
    from edgeops.hub.bridge import HubBridge

    def say(*objects: Any) -> None:
        if not as_json:
            console.print(*objects)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    device_ids = [f"demo-{i:03d}" for i in range(1, devices + 1)]
    started = time.time()
    with ExitStack() as stack, _sigterm_as_interrupt():
        database = Database(settings.database)
        stack.callback(database.dispose)
        database.check()
        database.upgrade()
        fleet = FleetService(database)

        if settings.mqtt_url:
            url = settings.mqtt_url
            say(f"broker: {MqttEndpoint.parse(url).url} (EDGEOPS_MQTT_URL)")
        else:
            broker = EmbeddedBrokerProcess(log_path=settings.data_dir / "demo" / "broker.log")
            broker.start()
            stack.callback(broker.stop)
            url = broker.url
            say(f"broker: embedded, {url}")

        bridge = HubBridge(
            MqttEndpoint.parse(url),
            fleet,
            client_id=settings.mqtt_client_id,
            tls=settings.tls_files,
        )
        bridge.start()
        stack.callback(bridge.stop)
        say(f"hub: database {settings.data_dir / 'edgeops.db'}, bridge connected")

        agents: list[AgentProcess] = []
        stack.callback(_stop_agents, agents)
        for index, device_id in enumerate(device_ids):
            cohort = "canary" if index == 0 else "main"
            agents.append(spawn_agent(settings, device_id, url, cohort))
        say(f"agents: started {', '.join(device_ids)}")

        try:
            online = _wait_for(
                bridge, fleet, agents, device_ids, started, timeout_s, want_online=True
            )
        except KeyboardInterrupt:
            say("interrupted; stopping every child process")
            return 130
        say(fleet_table(online))
        say(f"{len(online)} of {devices} devices online")

        if not headless:
            try:
                _watch(bridge, fleet, device_ids, console)
            except KeyboardInterrupt:
                say("stopping every child process")
            return 0

        _stop_agents(agents)
        offline = _wait_for(bridge, fleet, [], device_ids, started, STOP_GRACE_S, want_online=False)
        if as_json:
            sys.stdout.write(
                _json(
                    {
                        "online": [d.to_dict() for d in online],
                        "stopped": [d.device_id for d in offline],
                    }
                )
            )
        say(f"agents stopped; the hub recorded {len(offline)} of {devices} offline")
    return 0


def _json(document: Any) -> str:
    import json

    return json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"


def _stop_agents(agents: list[AgentProcess]) -> None:
    for agent in agents:
        agent.terminate()
    for agent in agents:
        if not agent.log_file.closed:
            agent.reap(STOP_GRACE_S)


def _wait_for(
    bridge: HubBridge,
    fleet: FleetService,
    agents: list[AgentProcess],
    device_ids: list[str],
    since: float,
    timeout_s: float,
    *,
    want_online: bool,
) -> list[DeviceView]:
    """Pump the bridge until every device's presence since ``since`` is ``want_online``
    (and, for online, its state report has been recorded)."""
    wanted = set(device_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        bridge.pump(0.2)
        matching = [
            d for d in fleet.list_devices()
            if d.device_id in wanted and d.online == want_online
            and (d.presence_ts or 0) >= since
            and (d.agent_version is not None or not want_online)
        ]  # fmt: skip
        if len(matching) == len(wanted):
            return matching
        for agent in agents:
            code = agent.process.poll()
            if code is not None:
                tail = agent.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise EdgeOpsError(
                    f"agent {agent.device_id} exited with code {code}: " + " | ".join(tail)
                )
        if time.monotonic() > deadline:
            missing = sorted(wanted - {d.device_id for d in matching})
            state = "online" if want_online else "offline"
            raise EdgeOpsError(
                f"timed out after {timeout_s:.0f}s waiting for {', '.join(missing)} to be {state}"
            )


def _watch(bridge: HubBridge, fleet: FleetService, device_ids: list[str], console: Console) -> None:
    wanted = set(device_ids)
    console.print("watching presence; Ctrl-C stops the demo")
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            bridge.pump(0.5)
            live.update(fleet_table([d for d in fleet.list_devices() if d.device_id in wanted]))
