"""EdgeOps hardware-in-the-loop rig: drives boards and agents from outside, as an operator would.

The hub and the agent never import this package.
"""

from device_agent._version import __version__

__all__ = ["__version__"]
