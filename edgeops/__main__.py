"""``python -m edgeops`` is the ``edgeops`` command."""

from edgeops.cli.main import run

run()
