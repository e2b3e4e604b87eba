"""``python -m device_agent`` is ``edgeops-agent``."""

from device_agent.cli import run

run()
