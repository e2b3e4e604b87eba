"""Routing of received messages to handlers, on the owner's thread.

Malformed input from the network (bad topic, bad JSON, wrong schema, missing field) is
logged, counted per channel and dropped; it never reaches a handler and never raises.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.link import Message
from device_agent.protocol import Channel, Document, decode, decode_object, parse_topic

log = logging.getLogger(__name__)

DocumentHandler = Callable[[str, Document], None]
RawHandler = Callable[[str, dict[str, Any]], None]


class Dispatcher:
    """Decodes messages by channel and calls the registered handler with (device_id, doc)."""

    def __init__(self) -> None:
        self._documents: dict[Channel, DocumentHandler] = {}
        self._raw: dict[Channel, RawHandler] = {}
        self.dropped: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()

    def on(self, channel: Channel, handler: DocumentHandler) -> None:
        """Handle ``channel`` with its typed document (see protocol.DOCUMENTS)."""
        self._documents[channel] = handler

    def on_raw(self, channel: Channel, handler: RawHandler) -> None:
        """Handle ``channel`` with the decoded JSON object (schema version checked)."""
        self._raw[channel] = handler

    def dispatch(self, message: Message) -> bool:
        """Handle one message; returns False if it was dropped."""
        try:
            device_id, channel = parse_topic(message.topic)
        except ProtocolError as exc:
            return self._drop("topic", message, exc)
        if not message.payload and message.retain:
            return True  # a cleared retained message: nothing to handle
        try:
            if channel in self._documents:
                document = decode(channel, message.payload)
                declared = getattr(document, "device_id", device_id)
                if declared != device_id:
                    raise ProtocolError(
                        f"payload names device {declared!r} "
                        f"but was published on {device_id!r}'s topic"
                    )
                self._documents[channel](device_id, document)
            elif channel in self._raw:
                self._raw[channel](device_id, decode_object(message.payload))
            else:
                return self._drop(channel.value, message, ProtocolError("no handler"))
        except ProtocolError as exc:
            return self._drop(channel.value, message, exc)
        self.handled[channel.value] += 1
        return True

    def _drop(self, kind: str, message: Message, exc: ProtocolError) -> bool:
        self.dropped[kind] += 1
        log.warning(
            "dropped malformed message on %s: %s",
            message.topic,
            exc,
            extra={"dropped_total": sum(self.dropped.values())},
        )
        return False
