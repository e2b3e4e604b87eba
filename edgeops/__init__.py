"""EdgeOps hub: datasets, training, compression, registry, trust, fleet, monitoring."""

from device_agent._version import __version__

__all__ = ["__version__"]
