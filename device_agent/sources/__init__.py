"""Input sources: where the samples the agent runs its model on come from.

Every source yields :class:`Sample` objects holding one raw sample of the model's
``input_shape`` (the shape of the feature rule's raw sample). Sources differ in where samples
come from and whether someone waits for an answer:

============  ===================================================  ==========================
kind          samples from                                         answered
============  ===================================================  ==========================
file          a CSV (one row per sample) or NPZ file (``x[, y]``)  no
stdin         lines on a stream: numbers or a JSON array           a JSON line per input line
http          ``POST /v1/predict`` on localhost                    the HTTP response
mqtt          requests on a topic of a local broker                a message on a topic
synthetic     base samples resampled by class mix, drifted         no
============  ===================================================  ==========================

Bad input (an unparsable line, the wrong number of values, a non-numeric value, NaN or
infinity) never stops a source: it is counted in :attr:`Source.errors` by kind (see
:data:`ERROR_KINDS`) and, where the source can answer, answered with ``{"error": "..."}``.

The daemon pulls with :meth:`Source.poll` (``None`` when nothing came within the timeout, so
its loop never blocks for long) or iterates :meth:`Source.samples`. It answers a sample by
calling ``sample.reply(document)`` with the prediction (see :func:`reply_document`) or with
``{"error": "..."}``; an error document may carry ``"status"`` (an HTTP status, 400 if absent).

Errors: :class:`SourceError` (an :class:`~device_agent.errors.AgentError`) when a source
cannot be opened or fails for good (missing file, port in use; raised by the constructor, or
by ``poll`` when a file becomes unreadable); :class:`BadSampleError` (a
:class:`~device_agent.errors.ProtocolError`) for one bad input, with ``kind`` its counter key.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from device_agent.errors import ConfigError
from device_agent.link import MqttEndpoint
from device_agent.sources._base import (
    DEFAULT_REPLY_TIMEOUT_S,
    ERROR_KINDS,
    BadSampleError,
    Sample,
    Source,
    SourceError,
    check_sample,
    parse_line,
    parse_sample,
    reply_document,
)
from device_agent.sources._http import HttpSource
from device_agent.sources._local import LocalMqttSource, StdinSource
from device_agent.sources._replay import FileSource, SyntheticSource

__all__ = [
    "ERROR_KINDS",
    "BadSampleError",
    "FileSource",
    "HttpSource",
    "LocalMqttSource",
    "Sample",
    "Source",
    "SourceConfig",
    "SourceError",
    "StdinSource",
    "SyntheticSource",
    "check_sample",
    "open_source",
    "parse_line",
    "parse_sample",
    "reply_document",
]

# -- configuration -----------------------------------------------------------------------------

SourceKind = Literal["file", "stdin", "http", "mqtt", "synthetic"]

_KIND_FIELDS: dict[str, set[str]] = {
    "file": {"path", "label_column", "loop", "rate_hz"},
    "stdin": set(),
    "http": {"host", "port", "reply_timeout_s"},
    "mqtt": {"url", "topic_in", "topic_out", "client_id"},
    "synthetic": {"path", "gain", "offset", "noise", "class_mix", "seed", "count", "rate_hz"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "file": ("path",),
    "http": ("port",),
    "mqtt": ("topic_in", "topic_out"),
    "synthetic": ("path",),
}


class SourceConfig(BaseModel):
    """The ``[source]`` table of agent.toml: ``kind`` and the fields of that kind."""

    model_config = ConfigDict(extra="forbid")

    kind: SourceKind
    path: Path | None = Field(default=None, description="file: CSV/NPZ; synthetic: NPZ x, y")
    label_column: int | str | None = None
    loop: bool = False
    rate_hz: float | None = Field(default=None, gt=0)
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    reply_timeout_s: float = Field(default=DEFAULT_REPLY_TIMEOUT_S, gt=0)
    url: str = "mqtt://127.0.0.1:1883"
    topic_in: str | None = None
    topic_out: str | None = None
    client_id: str | None = None
    gain: float = 1.0
    offset: float = 0.0
    noise: float = Field(default=0.0, ge=0)
    class_mix: dict[int, float] | None = None
    seed: int = 0
    count: int | None = Field(default=None, ge=0)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        try:
            MqttEndpoint.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Self:
        foreign = sorted(self.model_fields_set - _KIND_FIELDS[self.kind] - {"kind"})
        if foreign:
            raise ValueError(
                f"source kind {self.kind!r} takes no field(s) {', '.join(foreign)}; "
                f"its fields: {', '.join(sorted(_KIND_FIELDS[self.kind])) or 'none'}"
            )
        missing = [name for name in _REQUIRED.get(self.kind, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"source kind {self.kind!r} needs {', '.join(missing)}")
        return self


def open_source(
    config: SourceConfig,
    input_shape: Sequence[int],
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> Source:
    """Open the source ``config`` describes, for samples of ``input_shape``."""
    if config.kind == "file":
        assert config.path is not None
        return FileSource(
            config.path,
            input_shape,
            label_column=config.label_column,
            loop=config.loop,
            rate_hz=config.rate_hz,
        )
    if config.kind == "stdin":
        return StdinSource(stdin if stdin is not None else sys.stdin, input_shape, out=stdout)
    if config.kind == "http":
        assert config.port is not None
        return HttpSource(
            config.host, config.port, input_shape, reply_timeout_s=config.reply_timeout_s
        )
    if config.kind == "mqtt":
        assert config.topic_in is not None and config.topic_out is not None
        return LocalMqttSource(
            config.url, config.topic_in, config.topic_out, input_shape, client_id=config.client_id
        )
    assert config.path is not None
    return SyntheticSource.from_npz(
        config.path,
        gain=config.gain,
        offset=config.offset,
        noise=config.noise,
        class_mix=config.class_mix,
        seed=config.seed,
        count=config.count,
        rate_hz=config.rate_hz,
        input_shape=input_shape,
    )
