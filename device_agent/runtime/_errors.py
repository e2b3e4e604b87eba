"""Errors of the runtime package (the tree is drawn in ``device_agent/runtime/__init__.py``)."""

from __future__ import annotations

from device_agent.errors import AgentError, ProtocolError

__all__ = ["BundleError", "InferenceError", "InputError", "RuntimeLoadError", "SerialFrameError"]


class BundleError(AgentError):
    """A model bundle directory is missing, incomplete, or holds a malformed card or model.

    The message names the path and what is wrong with it.
    """


class RuntimeLoadError(AgentError):
    """No runtime can run the bundle: its library is missing, or it refuses the model, or the
    model's tensors disagree with the card and its preprocessing rule."""


class InputError(ProtocolError):
    """A sample that does not fit the model: wrong shape, not numbers, NaN or infinity.

    Samples come from outside the agent (files, HTTP, MQTT), so this is untrusted input; the
    daemon counts it and answers the source, and the runtime stays usable.
    """


class InferenceError(AgentError):
    """The runtime failed on a valid sample (the interpreter raised, a device did not answer)."""


class SerialFrameError(InferenceError):
    """A serial device sent no frame in time, or a malformed, corrupted or unexpected one."""
