"""Run a private Mosquitto from the configuration EdgeOps ships (tests, benchmarks, dev setups).

The production file is ``deploy/mosquitto/mosquitto.conf``. :func:`render_config` turns it into
the configuration of a private broker by changing only what must differ between the system
broker and a private one:

* the single ``listener`` line gets the private port (and host);
* ``persistence_location`` points into the private data directory;
* ``pid_file`` is dropped (the parent process tracks the pid);
* ``log_dest file ...`` becomes ``log_dest stderr`` (the parent captures stderr into a file);
* ``user`` is set to the current user, so a broker started as root does not drop privileges to
  the ``mosquitto`` user, which could not write a data directory owned by the caller;
* only if asked to: ``password_file`` and ``acl_file`` point at the private broker's files
  (for ``deploy/mosquitto/secure.conf``, whose paths are the system's).

Every tuned setting (queues, Nagle, persistence, keepalive) is kept as shipped, so tests and
benchmarks exercise the configuration that production runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeops.broker._child import _BrokerChild
from edgeops.errors import BrokerError

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
"""The production configuration, in the source tree."""

SECURE_CONFIG = SHIPPED_CONFIG.with_name("secure.conf")
"""The shipped configuration with per-device identities: no anonymous clients, the hub's
password and ACL files (``edgeops broker acl sync``), an optional TLS listener."""

SEARCH_DIRS = (Path("/usr/sbin"), Path("/usr/local/sbin"), Path("/opt/homebrew/sbin"))
"""Where Mosquitto lives when it is not on PATH (Debian installs it in /usr/sbin)."""

_START_ATTEMPTS = 3  # a port picked by free_port() can be taken before Mosquitto binds it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True if a TCP connection to ``host:port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_mosquitto(binary: str | Path | None = None) -> Path:
    """The Mosquitto executable: ``binary`` if given, else from PATH or the sbin directories."""
    if binary is not None:
        path = Path(binary)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BrokerError(f"Mosquitto binary {path} does not exist or is not executable")
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for directory in SEARCH_DIRS:
        candidate = directory / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(["PATH", *(str(d) for d in SEARCH_DIRS)])
    raise BrokerError(
        f"Mosquitto is not installed (searched {searched}); "
        "install it (`apt-get install mosquitto`, or `make services`)"
    )


@dataclass(frozen=True)
class TlsListener:
    """An extra TLS listener for a private broker; ``port=None`` picks a free port at start."""

    cert_file: Path
    key_file: Path
    port: int | None = None


def render_config(
    port: int,
    data_dir: Path,
    *,
    template: Path = SHIPPED_CONFIG,
    host: str = "127.0.0.1",
    extra: str = "",
    password_file: Path | None = None,
    acl_file: Path | None = None,
) -> str:
    """The text of ``template`` adapted to a private broker on ``host:port`` in ``data_dir``.

    ``template`` must contain exactly one ``listener`` line (the shipped file does); ``extra``
    is appended verbatim, e.g. a further ``listener`` block with its TLS files. A given
    ``password_file`` or ``acl_file`` replaces the template's line of that option (or is
    added if it has none); without them those lines are kept as they are.
    """
    try:
        lines = template.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BrokerError(f"Mosquitto config template {template} cannot be read: {exc}") from exc
    listeners = [line for line in lines if _option(line) == "listener"]
    if len(listeners) != 1:
        raise BrokerError(
            f"Mosquitto config template {template} must have exactly one `listener` line "
            f"to rewrite for a private broker, found {len(listeners)}"
        )
    location = f"persistence_location {data_dir.resolve()}/"
    files = {
        option: f"{option} {path.resolve()}"
        for option, path in (("password_file", password_file), ("acl_file", acl_file))
        if path is not None
    }
    rendered: list[str] = []
    for line in lines:
        option = _option(line)
        if option == "listener":
            rendered.append(f"listener {port} {host}")
        elif option == "persistence_location":
            rendered.append(location)
            location = ""
        elif option in files:
            rendered.append(files.pop(option))
        elif option in ("pid_file", "user"):
            continue
        elif option == "log_dest" and line.split()[1:2] == ["file"]:
            rendered.append("log_dest stderr")
        else:
            rendered.append(line)
    rendered.append("")
    rendered.append("# --- private broker (edgeops.broker.mosquitto.render_config) ---")
    if location:
        rendered.append(location)
    rendered.extend(files.values())
    # as root Mosquitto would switch to the `mosquitto` user, who cannot write data_dir
    rendered.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    if extra:
        rendered.append(extra.rstrip("\n"))
    return "\n".join(rendered) + "\n"


def _option(line: str) -> str:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return ""
    return stripped.split(maxsplit=1)[0]


class MosquittoProcess(_BrokerChild):
    """A private Mosquitto child process, configured from the shipped file.

    The port and the data directory (persistence, config, log) are kept across
    :meth:`stop`/:meth:`start`, so a restart looks to clients like the production broker
    restarting: same address, retained messages and persistent sessions reloaded. On the SIGTERM
    of :meth:`stop` Mosquitto saves its database before it exits.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        template: Path = SHIPPED_CONFIG,
        tls: TlsListener | None = None,
        extra_config: str = "",
        binary: str | Path | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.host = host
        self.template = template
        self.extra_config = extra_config
        self.config_path = data_dir / "mosquitto.conf"
        self.log_path = data_dir / "mosquitto.log"
        self._binary = binary
        self._port = port
        self._port_chosen = port is None
        self._tls = tls
        self._tls_port = tls.port if tls is not None else None
        self.password_file = password_file
        self.acl_file = acl_file

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port(self.host)
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the plain listener."""
        return f"mqtt://{_url_host(self.host)}:{self.port}"

    @property
    def tls_port(self) -> int:
        if self._tls is None:
            raise BrokerError("this Mosquitto has no TLS listener (pass tls=TlsListener(...))")
        if self._tls_port is None:
            self._tls_port = free_port(self.host)
        return self._tls_port

    @property
    def tls_url(self) -> str:
        """``mqtts://host:port`` of the TLS listener."""
        return f"mqtts://{_url_host(self.host)}:{self.tls_port}"

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        """Start Mosquitto and wait until every listener accepts TCP connections.

        Raises :class:`BrokerError` if the binary is missing, or if the broker exits or does not
        listen within ``timeout_s``; the message carries the tail of the broker's log.
        """
        if self.running:
            raise BrokerError(f"Mosquitto on {self.url} is already running")
        binary = find_mosquitto(self._binary)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.config_path.write_text(self.render(), encoding="utf-8")
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            process = self._launch(binary)
            failure = self._wait_listening(process, timeout_s)
            if failure is None:
                return
            self._terminate(timeout_s=5.0)
            tail = self.log_tail(since=log_offset)
            port_taken = "address already in use" in tail.lower()
            if port_taken and attempt < _START_ATTEMPTS and self._reroll_ports():
                continue
            raise BrokerError(
                f"Mosquitto failed to start on {self._addresses()}: {failure}; {tail}"
            )

    def render(self) -> str:
        """The configuration this broker runs with (written to ``config_path`` at start)."""
        extra = self.extra_config
        if self._tls is not None:
            block = (
                f"listener {self.tls_port} {self.host}\n"
                f"certfile {self._tls.cert_file.resolve()}\n"
                f"keyfile {self._tls.key_file.resolve()}\n"
            )
            extra = f"{block}{extra}"
        return render_config(
            self.port,
            self.data_dir,
            template=self.template,
            host=self.host,
            extra=extra,
            password_file=self.password_file,
            acl_file=self.acl_file,
        )

    @property
    def pid(self) -> int:
        """The process id of the running broker."""
        if self._process is None or self._process.poll() is not None:
            raise BrokerError(f"{self._describe()} is not running")
        return self._process.pid

    def reload(self, timeout_s: float = 10.0) -> None:
        """SIGHUP: Mosquitto reads its configuration, password and ACL files again.

        Returns once the broker has logged ``Reloading config.`` (it applies the new password
        and ACL data to connected clients in the same step); BrokerError if it has not within
        ``timeout_s`` or has died.
        """
        pid = self.pid
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise BrokerError(f"{self._describe()} exited on reload; {self.log_tail()}")
            if "Reloading config." in self._log_text(since=log_offset):
                return
            time.sleep(0.02)
        raise BrokerError(f"{self._describe()} did not reload within {timeout_s:.0f} s")

    def restart(self, timeout_s: float = 15.0) -> None:
        """Stop and start again on the same port(s), keeping the persistence directory."""
        self.stop()
        self.start(timeout_s=timeout_s)

    # -- internals ---------------------------------------------------------------------------

    def _launch(self, binary: Path) -> subprocess.Popen[bytes]:
        self._close_log()
        self._log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"Mosquitto ({binary}) cannot be started: {exc}") from exc
        return self._process

    def _wait_listening(self, process: subprocess.Popen[bytes], timeout_s: float) -> str | None:
        """None once every listener accepts connections, else what went wrong."""
        ports = self._ports()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                return f"it exited with code {code}"
            if all(port_accepts(self.host, port) for port in ports):
                # a port taken by another process would accept too: Mosquitto must still be up
                time.sleep(0.05)
                code = process.poll()
                return None if code is None else f"it exited with code {code}"
            time.sleep(0.05)
        return f"it did not listen within {timeout_s:.0f} s"

    def _log_file(self) -> Path:
        return self.log_path

    def _log_text(self, since: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _describe(self) -> str:
        return f"Mosquitto on {self._addresses()}"

    def _ports(self) -> Sequence[int]:
        return [self.port] if self._tls is None else [self.port, self.tls_port]

    def _addresses(self) -> str:
        return " and ".join(f"{self.host}:{port}" for port in self._ports())

    def _reroll_ports(self) -> bool:
        """Pick new free ports if we chose the old ones ourselves; False if the caller did."""
        rerolled = False
        if self._port_chosen:
            self._port = free_port(self.host)
            rerolled = True
        if self._tls is not None and self._tls.port is None:
            self._tls_port = free_port(self.host)
            rerolled = True
        return rerolled


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
