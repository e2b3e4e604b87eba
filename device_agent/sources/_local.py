"""Sources that applications on the device push samples to: stdin and a local MQTT topic."""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from paho.mqtt.client import topic_matches_sub

from device_agent.errors import AgentError
from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.protocol import MAX_PAYLOAD_BYTES
from device_agent.sources._base import (
    DEFAULT_MAX_PENDING,
    BadSampleError,
    Reply,
    Sample,
    Source,
    SourceError,
    answer_json,
    parse_line,
    parse_sample,
)

log = logging.getLogger(__name__)


class StdinSource(Source):
    """One sample per line of ``stream``; each line is answered with a JSON line on ``out``.

    A line holds numbers separated by commas or spaces, or a JSON array. Empty lines and
    lines starting with ``#`` are skipped. Answers carry ``"line"``, the input line number.
    """

    kind = "stdin"

    def __init__(
        self, stream: TextIO, input_shape: Sequence[int], *, out: TextIO | None = None
    ) -> None:
        super().__init__(input_shape)
        self._out = out if out is not None else sys.stdout
        self._out_lock = threading.Lock()
        self._lines: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=DEFAULT_MAX_PENDING)
        self._eof = False
        self._reader = threading.Thread(
            target=self._read, args=(stream,), name="stdin-source", daemon=True
        )
        self._reader.start()

    def _read(self, stream: TextIO) -> None:
        number = 0
        try:
            for line in stream:
                number += 1
                if not self._put((number, line)):
                    return
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("stdin source: reading stopped: %s", exc)
        self._put(None)  # end of input

    def _put(self, item: tuple[int, str] | None) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the source is closed."""
        while not self._closed.is_set():
            try:
                self._lines.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    @property
    def exhausted(self) -> bool:
        return self._closed.is_set() or (self._eof and self._lines.empty())

    def poll(self, timeout_s: float | None = None) -> Sample | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.exhausted:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._lines.get(timeout=remaining)
            except queue.Empty:
                return None
            if item is None:
                self._eof = True
                return None
            number, line = item
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            reply = self._replier(number)
            try:
                return Sample(parse_line(text, self.input_shape), reply=reply)
            except BadSampleError as exc:
                reply({"error": self._reject(exc, f"line {number}")})
        return None

    def _replier(self, number: int) -> Reply:
        def reply(document: dict[str, Any]) -> None:
            text = answer_json({"line": number, **document})
            with self._out_lock:
                try:
                    self._out.write(text + "\n")
                    self._out.flush()
                except (OSError, ValueError) as exc:
                    log.warning("stdin source: cannot write the answer: %s", exc)

        return reply


class LocalMqttSource(Source):
    """Requests on ``topic_in`` of a local broker, answered on ``reply_to`` or ``topic_out``.

    A request is a JSON object ``{"inputs": [...], "id": ..., "reply_to": "topic"}`` (``id``
    and ``reply_to`` optional); the answer is the prediction (or ``{"error": ...}``) with the
    request's ``id``. ``link`` is a broker URL or a factory returning an unstarted MqttLink;
    either way the source owns the link and stops it on :meth:`close`.
    """

    kind = "mqtt"

    def __init__(
        self,
        link: str | Callable[[], MqttLink],
        topic_in: str,
        topic_out: str,
        input_shape: Sequence[int],
        *,
        client_id: str | None = None,
    ) -> None:
        super().__init__(input_shape)
        if not topic_in or not topic_out or any(c in topic_out for c in "+#"):
            raise SourceError(
                f"mqtt source: topic_in must be a topic filter and topic_out a topic without "
                f"wildcards, got {topic_in!r} and {topic_out!r}"
            )
        if topic_matches_sub(topic_in, topic_out):
            raise SourceError(f"mqtt source: answers on {topic_out!r} would match {topic_in!r}")
        self.topic_in, self.topic_out = topic_in, topic_out
        if isinstance(link, str):
            endpoint = MqttEndpoint.parse(link)
            self.link = MqttLink(endpoint, client_id or f"edgeops-agent-local-{os.getpid()}")
        else:
            self.link = link()
        self.link.subscribe(topic_in, 1)
        self.link.start()

    def poll(self, timeout_s: float | None = None) -> Sample | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._closed.is_set():
            remaining = 0.25 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self.link.get(timeout_s=remaining)
            if isinstance(event, Message) and topic_matches_sub(self.topic_in, event.topic):
                sample = self._request(event)
                if sample is not None:
                    return sample
        return None

    def _request(self, message: Message) -> Sample | None:
        request_id: Any = None
        reply_to = self.topic_out
        try:
            if len(message.payload) > MAX_PAYLOAD_BYTES:
                raise BadSampleError(
                    "too_large",
                    f"payload of {len(message.payload)} bytes exceeds {MAX_PAYLOAD_BYTES}",
                )
            try:
                document = json.loads(message.payload)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise BadSampleError("parse", f"the payload is not valid JSON: {exc}") from None
            if not isinstance(document, dict) or "inputs" not in document:
                raise BadSampleError("parse", 'expected a JSON object {"inputs": [...]}')
            request_id = document.get("id")
            target = document.get("reply_to")
            if target is not None:
                if (
                    not isinstance(target, str)
                    or not target
                    or any(c in target for c in "+#")
                    or topic_matches_sub(self.topic_in, target)
                ):
                    raise BadSampleError(
                        "parse",
                        f"reply_to must be a topic outside {self.topic_in!r} "
                        f"without wildcards, got {target!r}",
                    )
                reply_to = target
            raw = parse_sample(document["inputs"], self.input_shape)
        except BadSampleError as exc:
            error = self._reject(exc, message.topic)
            self._replier(reply_to, request_id)({"error": error})
            return None
        return Sample(raw, reply=self._replier(reply_to, request_id))

    def _replier(self, topic: str, request_id: Any) -> Reply:
        def reply(document: dict[str, Any]) -> None:
            answer = answer_json({"id": request_id, **document})
            try:
                self.link.publish(topic, answer.encode(), qos=1)
            except AgentError as exc:
                log.warning("mqtt source: cannot answer on %s: %s", topic, exc)

        return reply

    def close(self) -> None:
        if not self._closed.is_set():
            super().close()
            self.link.stop()
