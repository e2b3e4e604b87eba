"""Publishing desired twins: retained, QoS 1, on ``edgeops/v1/dev/{id}/desired``.

:class:`DesiredPublisher` owns one :class:`MqttLink` with the hub's identity and a client id of
its own (``<hub client id>-desired-<random>``, so it never takes over the bridge's persistent
session, and two publishers never take over each other's). The broker keeps the last desired
document of every device and hands it to the agent whenever it (re)subscribes, so a device
that is offline now gets it when it comes back.

    with DesiredPublisher(endpoint) as publisher:            # BrokerError if unreachable
        views = fleet.set_desired_many(ids, {"release": {...}})
        missing = publisher.publish_many(views)              # ids the broker did not ack
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from device_agent.errors import LinkError
from device_agent.link import MqttEndpoint, MqttLink, TlsFiles, acknowledged
from device_agent.protocol import QOS, Channel, device_topic
from edgeops.errors import BrokerError
from edgeops.fleet.desired import encode_desired
from edgeops.fleet.models import DeviceView

__all__ = ["DesiredPublisher"]

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 10.0
ACK_WAIT_S = 10.0


class DesiredPublisher:
    """Publishes devices' desired documents (see the module docstring)."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str = "edgeops-hub",
        tls: TlsFiles | None = None,
    ) -> None:
        self.client_id = f"{client_id[:48]}-desired-{secrets.token_hex(3)}"
        self.link = MqttLink(endpoint, client_id=self.client_id, tls=tls)
        self._started = False

    def start(self, wait_s: float = CONNECT_WAIT_S) -> None:
        """Connect; BrokerError naming the broker and the cause if not connected in time."""
        try:
            self.link.start(wait_s=wait_s)
        except LinkError as exc:
            raise BrokerError(str(exc)) from None
        self._started = True

    def publish(self, device: DeviceView, wait_s: float = ACK_WAIT_S) -> None:
        """Publish ``device``'s desired document; BrokerError if the broker did not
        acknowledge it within ``wait_s``."""
        if self.publish_many([device], wait_s=wait_s):
            raise BrokerError(
                f"the broker {self.link.endpoint.url} did not acknowledge the desired state of "
                f"{device.device_id!r} within {wait_s:g} s"
            )

    def publish_many(self, devices: Iterable[DeviceView], wait_s: float = ACK_WAIT_S) -> list[str]:
        """Publish every device's desired document at once and wait for the acknowledgements;
        the ids of the devices the broker did not acknowledge within ``wait_s``."""
        pending = []
        for device in devices:
            payload = encode_desired(device)
            topic = device_topic(device.device_id, Channel.DESIRED)
            try:
                info = self.link.publish_info(topic, payload, qos=QOS, retain=True)
            except LinkError as exc:
                raise BrokerError(str(exc)) from None
            pending.append((device.device_id, info))
        deadline = time.monotonic() + wait_s
        while any(not acknowledged(info) for _, info in pending):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        missing = [device_id for device_id, info in pending if not acknowledged(info)]
        if missing:
            log.warning("desired state not acknowledged for %s", ", ".join(missing))
        return missing

    def stop(self) -> None:
        if self._started:
            self.link.stop()
            self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
