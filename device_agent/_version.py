"""The one version number of the EdgeOps distribution (hub and agent ship together)."""

__version__ = "0.1.0"
