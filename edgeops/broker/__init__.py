"""MQTT brokers for EdgeOps: the embedded one (amqtt, zero setup) and private Mosquittos.

Production runs Mosquitto with ``deploy/mosquitto/mosquitto.conf``; docs/brokers.md says which
to use when, with measurements.
"""

from edgeops.broker.auth import BrokerAuthFiles, BrokerIdentity
from edgeops.broker.embedded import EmbeddedBrokerProcess, run_embedded_broker
from edgeops.broker.mosquitto import (
    SECURE_CONFIG,
    SHIPPED_CONFIG,
    MosquittoProcess,
    TlsListener,
    find_mosquitto,
    free_port,
    render_config,
)

__all__ = [
    "SECURE_CONFIG",
    "SHIPPED_CONFIG",
    "BrokerAuthFiles",
    "BrokerIdentity",
    "EmbeddedBrokerProcess",
    "MosquittoProcess",
    "TlsListener",
    "find_mosquitto",
    "free_port",
    "render_config",
    "run_embedded_broker",
]
