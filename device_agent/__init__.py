"""EdgeOps device agent: runs models on the device, reports state and telemetry over MQTT.

This package installs with the ``agent`` extra alone and never imports ``edgeops``.
"""

from device_agent._version import __version__

__all__ = ["__version__"]
