"""The agent daemon: one MQTT identity, its retained state and presence, and a health file.

The daemon owns one :class:`MqttLink`. Its main loop runs on the caller's thread and is the
only code that acts on events; paho's callbacks merely fill the link's inbox.

On every (re)connect the agent publishes, retained, ``presence`` = online and its reported
``state``; the broker publishes the retained offline presence (the last will) if the device
vanishes. On stop (SIGTERM) it publishes offline presence itself, waits for the broker's
acknowledgement, and disconnects cleanly.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from pathlib import Path
from typing import Any

from device_agent._version import __version__
from device_agent.config import AgentSettings
from device_agent.dispatch import Dispatcher
from device_agent.fsio import atomic_write_json
from device_agent.link import Connected, Disconnected, Message, MqttLink, Will
from device_agent.protocol import (
    QOS,
    Channel,
    Presence,
    StateReport,
    device_topic,
    encode,
)

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0


def detect_hardware() -> dict[str, str]:
    """Hardware tags this agent can find out by itself; configured tags override them."""
    tags = {"arch": platform.machine() or "unknown", "os": platform.system().lower() or "unknown"}
    mem = _meminfo_bytes("MemTotal")
    if mem is not None:
        tags["ram_mib"] = str(mem // (1024 * 1024))
    return tags


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class AgentDaemon:
    """Connects as one device, keeps its reported state current, and writes a health file."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.hardware = {**detect_hardware(), **settings.hardware}
        self.dispatcher = Dispatcher()
        self.desired: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._state_published_at: float | None = None
        self._connection_ts = 0.0
        self.link = MqttLink(
            settings.endpoint,
            client_id=self.device_id,
            tls=settings.tls_files,
            will=self._next_will,
        )
        self.link.subscribe(device_topic(self.device_id, Channel.DESIRED), QOS)
        self.dispatcher.on_raw(Channel.DESIRED, self._on_desired)

    def _next_will(self) -> Will:
        """The will for the connection about to be made, stamped with its start time.

        The online presence of that connection carries the same ``ts``; the hub lets an
        offline presence win a tie, so this will ends exactly this connection, while a will
        of an older connection that arrives late (older ``ts``) changes nothing.
        """
        self._connection_ts = round(time.time(), 3)
        offline = Presence(self.device_id, online=False, ts=self._connection_ts)
        return Will(device_topic(self.device_id, Channel.PRESENCE), encode(offline))

    @property
    def health_file(self) -> Path:
        return self.settings.state_dir / "health.json"

    def stop(self) -> None:
        """Ask the main loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit code."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("agent %s starting, broker %s", self.device_id, self.link.endpoint.url)
        self.link.start()
        self._write_health("connecting")
        try:
            while not self._stop.is_set():
                event = self.link.get(timeout_s=0.25)
                if event is not None:
                    self._handle(event)
                self._heartbeat()
        finally:
            self._shutdown()
        return 0

    # -- events ----------------------------------------------------------------------------

    def _handle(self, event: Message | Connected | Disconnected) -> None:
        if isinstance(event, Connected):
            log.info("connected to %s", self.link.endpoint.url)
            online = Presence(self.device_id, online=True, ts=self._connection_ts)
            self._publish(Channel.PRESENCE, encode(online))
            self._publish_state()
            self._write_health("connected")
        elif isinstance(event, Disconnected):
            log.warning("disconnected (%s); reconnecting", event.reason)
            self._write_health("connecting")
        else:
            self.dispatcher.dispatch(event)

    def _on_desired(self, device_id: str, document: dict[str, Any]) -> None:
        self.desired = document
        atomic_write_json(self.settings.state_dir / "desired.json", document)
        log.info("desired state received", extra={"desired_keys": sorted(document)})

    def _heartbeat(self) -> None:
        due = self._state_published_at is None or (
            time.monotonic() - self._state_published_at >= self.settings.heartbeat_s
        )
        if due and self.link.connected:
            self._publish_state()
            self._write_health("connected")

    def _publish_state(self) -> None:
        report = StateReport(
            device_id=self.device_id,
            agent_version=__version__,
            hardware=self.hardware,
            free_memory_bytes=_meminfo_bytes("MemAvailable"),
        )
        self._publish(Channel.STATE, encode(report))
        self._state_published_at = time.monotonic()

    def _publish(self, channel: Channel, payload: bytes) -> None:
        self.link.publish(
            device_topic(self.device_id, channel), payload, qos=QOS, retain=channel.retained
        )

    def _write_health(self, status: str) -> None:
        atomic_write_json(
            self.health_file,
            {
                "device_id": self.device_id,
                "agent_version": __version__,
                "status": status,
                "ts": round(time.time(), 3),
                "broker": self.link.endpoint.url,
                "dropped_messages": dict(self.dispatcher.dropped),
                "desired_seen": self.desired is not None,
            },
        )

    def _shutdown(self) -> None:
        if self.link.connected:
            acked = self.link.publish(
                device_topic(self.device_id, Channel.PRESENCE),
                encode(Presence(self.device_id, online=False)),
                qos=QOS,
                retain=True,
                wait_s=ACK_TIMEOUT_S,
            )
            if not acked:
                log.warning("offline presence not acknowledged; the broker's will covers it")
        self.link.stop()
        self._write_health("stopped")
        log.info("agent %s stopped", self.device_id)
