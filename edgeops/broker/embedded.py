"""The embedded MQTT broker: zero setup, for ``edgeops demo`` and ``edgeops broker``.

It runs amqtt 0.12 (pure Python, MQTT 3.1.1, everything in memory) with anonymous access on
the address it is given. Production runs Mosquitto with the shipped configuration;
docs/brokers.md compares the two with measurements.

amqtt 0.12.1 gets three things wrong that EdgeOps relies on (found by probing it, see
docs/brokers.md). :func:`_broker_class` corrects them by overriding three amqtt methods:

1. **Keepalive is not enforced.** A client that goes silent without closing its socket (power
   cut, network gone) is never disconnected, so its last will — a device's "offline" presence —
   is never published. We close a connection after 1.5 keepalive periods of silence, as the
   MQTT 3.1.1 specification (3.1.2.10) and Mosquitto do, which publishes the will.
2. **Retained messages leak.** On every CONNECT amqtt sends the new client the retained
   messages of *every* client's subscriptions, so clients receive topics they never subscribed
   to, and a late subscriber receives a retained message twice. We send a client only the
   retained messages of its own subscriptions.
3. **Session take-over leaves the old connection open.** A CONNECT with a client id already
   connected should close the older connection (MQTT-3.1.4-2); amqtt leaves it open as a zombie.
   We close it (publishing its will, as Mosquitto does), so a device that reboots faster than
   its keepalive is not later declared offline by its own zombie connection.

The overridden names are checked at start-up, so an amqtt upgrade that renames them fails
loudly instead of silently losing a correction; tests/test_embedded_broker.py covers all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeops.broker._child import _BrokerChild
from edgeops.broker.mosquitto import free_port
from edgeops.errors import BrokerError

log = logging.getLogger(__name__)

READY_PREFIX = "edgeops embedded MQTT broker listening on "
"""The line ``python -m edgeops.broker`` prints on stdout once it accepts connections."""

EXIT_ADDRESS_IN_USE = 3
"""Exit code of ``python -m edgeops.broker`` when its port is taken."""

_STOP_POLL_S = 0.1
_START_ATTEMPTS = 3  # a port picked by free_port() can be taken before the child binds it
_OVERRIDDEN = (
    "_initialize_client_session",
    "_publish_retained_messages_for_subscription",
    "_delete_session",
)


def run_embedded_broker(
    host: str,
    port: int,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    *,
    log_level: int = logging.WARNING,
) -> None:
    """Serve MQTT on ``host:port`` until ``stop`` is set, or SIGTERM/SIGINT in the main thread.

    Blocks; ``ready`` is set once connections are accepted. amqtt's own logging is limited to
    ``log_level``. After SIGTERM it returns; after SIGINT (Ctrl-C) it shuts the broker down
    cleanly and then raises :class:`KeyboardInterrupt`, as Python does. Raises
    :class:`BrokerError` if the broker cannot listen (the ``__cause__`` is the
    :class:`OSError`, e.g. ``errno.EADDRINUSE``).
    """
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(log_level)
    asyncio.run(_serve(host, port, stop or threading.Event(), ready))


async def _serve(
    host: str, port: int, stop: threading.Event, ready: threading.Event | None
) -> None:
    from amqtt.errors import BrokerError as AmqttBrokerError

    broker = _broker_class()(_broker_config(host, port))
    startup_log = logging.getLogger("amqtt.broker")
    # we translate a start-up failure into one BrokerError; amqtt's traceback would repeat it
    quiet = _DropRecord("Broker startup failed")
    startup_log.addFilter(quiet)
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        cause = _os_error(exc)
        if cause is not None and cause.errno:
            detail = os.strerror(cause.errno).lower()
        else:
            detail = str(cause or exc)
        raise BrokerError(f"embedded MQTT broker cannot listen on {host}:{port}: {detail}") from (
            cause or exc
        )
    finally:
        startup_log.removeFilter(quiet)
    log.info("embedded MQTT broker listening on %s:%d", host, port)
    if ready is not None:
        ready.set()
    received: list[signal.Signals] = []
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        for signum in handled:
            loop.add_signal_handler(signum, received.append, signum)
    try:
        while not (stop.is_set() or received):
            await asyncio.sleep(_STOP_POLL_S)
    finally:
        if in_main_thread:
            for signum in handled:
                loop.remove_signal_handler(signum)
        await broker.shutdown()
    log.info("embedded MQTT broker on %s:%d stopped", host, port)
    if signal.SIGINT in received:
        raise KeyboardInterrupt


def _broker_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        # no grace period on top of the keepalive: _broker_class() applies the 1.5 factor
        "timeout_disconnect_delay": 0,
        # only anonymous access: no $SYS publisher, no per-packet debug logger
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _os_error(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _DropRecord(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self._message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self._message


@functools.cache
def _broker_class() -> type[Any]:
    """amqtt's ``Broker`` with the three corrections; amqtt is imported on first use."""
    from amqtt import __version__ as amqtt_version
    from amqtt.broker import Broker

    missing = [name for name in _OVERRIDDEN if not hasattr(Broker, name)]
    if missing:
        raise BrokerError(
            f"amqtt {amqtt_version} no longer has {', '.join(missing)}; the embedded broker's "
            "corrections (edgeops/broker/embedded.py) support amqtt 0.12 only"
        )

    class EdgeOpsBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
        """amqtt's broker with keepalive, retained-message isolation and take-over corrected."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            self._closing: set[asyncio.Task[None]] = set()

        async def _initialize_client_session(
            self, reader: Any, writer: Any, remote_address: str, remote_port: int
        ) -> tuple[Any, Any]:
            handler, session = await super()._initialize_client_session(
                reader, writer, remote_address, remote_port
            )
            if session.keep_alive > 0:
                # amqtt times the read out after exactly one keepalive; the spec allows 1.5
                session.keep_alive = math.ceil(session.keep_alive * 1.5)
            # amqtt's broker-side handler ignores the read time-out: close the connection
            handler.handle_read_timeout = functools.partial(
                self._keepalive_expired, handler, session
            )
            return handler, session

        def _keepalive_expired(self, handler: Any, session: Any) -> None:
            log.info(
                "client %s silent for %d s (1.5 x keepalive); closing its connection",
                session.client_id,
                session.keep_alive,
            )
            task: asyncio.Task[None] = asyncio.ensure_future(handler.handle_connection_closed())
            self._closing.add(task)  # keep a reference until it is done
            task.add_done_callback(self._closing.discard)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            topic_filter = subscription[0]
            granted = [
                qos
                for subscriber, qos in self._subscriptions.get(topic_filter, ())
                if subscriber.client_id == session.client_id
            ]
            if not granted:
                return  # amqtt offers a client every filter's retained messages: only its own
            await super()._publish_retained_messages_for_subscription(
                (topic_filter, granted[0]), session
            )

        async def _delete_session(self, client_id: str) -> None:
            session, handler = self._sessions.get(client_id, (None, None))
            if session is not None and handler is not None and session.transitions.is_connected():
                log.info("client id %s connected again; closing its older connection", client_id)
                await handler.handle_connection_closed()
            await super()._delete_session(client_id)

    return EdgeOpsBroker


class EmbeddedBrokerProcess(_BrokerChild):
    """The embedded broker in a child process (``python -m edgeops.broker``), as the demo uses it.

    ``port=None`` picks a free port. The child's stderr goes to ``log_path`` (a temporary file
    removed at :meth:`stop` when not given).
    """

    _NORMAL_EXIT_CODES = (*_BrokerChild._NORMAL_EXIT_CODES, 130)  # 130: stopped by Ctrl-C

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        log_path: Path | None = None,
        python: str | Path = sys.executable,
    ) -> None:
        super().__init__()
        self.host = host
        self._port = port
        self._port_chosen = port is None
        self._python = str(python)
        self._log_path = log_path
        self._temporary_log = log_path is None

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port(self.host)
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="edgeops-broker-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the child and wait for its ready line; :class:`BrokerError` if it fails."""
        if self.running:
            raise BrokerError(f"the embedded broker on {self.url} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            process = self._launch()
            failure = _wait_ready(process, timeout_s)
            if failure is None:
                return
            code = self._terminate(timeout_s=5.0)
            if code == EXIT_ADDRESS_IN_USE and self._port_chosen and attempt < _START_ATTEMPTS:
                self._port = free_port(self.host)
                continue
            raise BrokerError(
                f"the embedded MQTT broker failed to start on {self.host}:{self.port}: "
                f"{failure}; {self.log_tail(since=offset)}"
            )

    def _launch(self) -> subprocess.Popen[bytes]:
        self._log = self.log_path.open("ab")
        command = [self._python, "-m", "edgeops.broker", "--host", self.host]
        command += ["--port", str(self.port)]
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log
            )
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"the embedded MQTT broker cannot be started: {exc}") from exc
        return self._process

    def _log_file(self) -> Path:
        return self.log_path

    def _describe(self) -> str:
        return f"the embedded MQTT broker on {self.url}"

    def _after_stop(self) -> None:
        # a log we created ourselves goes once stop() has read its tail
        if self._temporary_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None


def _wait_ready(process: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once the child printed its ready line, else what went wrong."""
    assert process.stdout is not None  # started with stdout=PIPE
    received = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"no ready line within {timeout_s:.0f} s"
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5.0)
                return f"it exited with code {process.returncode}"
            received += chunk
    line = received.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    if not line.startswith(READY_PREFIX):
        return f"unexpected first line on stdout: {line!r}"
    return None


def address_in_use(exc: BrokerError) -> bool:
    """True if ``exc`` (from :func:`run_embedded_broker`) means the port was taken."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
