"""A Linux board: the real ``edgeops-agent`` on a host of its own, a network namespace.

:class:`LinuxAgentBoard` gives the agent what a Linux device has: its own network stack (a
namespace of a :class:`~hil.netns.Network`, reached over a veth pair), its own broker
connection through an :class:`~hil.proxy.MqttFaultProxy` on the rig's end of that veth, its
own state directory, optionally a memory cap (a cgroup) and a skewed wall clock
(libfaketime). The agent is the installed program, started as ``python -m device_agent run``
inside the namespace, its log (JSON lines) in ``state_dir/agent.run<N>.log``.

The agent's configuration (``state_dir/agent.toml``) gets ``device_id`` = the board's name,
``data_dir`` = ``state_dir/data``, ``mqtt_url`` = the proxy, the HTTP source on
``device_ip:8080`` inside the namespace, the health endpoint on port 8081 of the namespace's
loopback (the agent serves it on 127.0.0.1 only; the rig reads it with a socket opened
inside the namespace), the champion bundle and trust root given, and ``agent_settings`` on
top (``window_seconds``, ``update_health_s``, ``hardware`` tags ...).

- :meth:`LinuxAgentBoard.start` starts the agent and returns once its health endpoint
  answers and, with a model loaded, its HTTP source answers through the veth;
- :meth:`LinuxAgentBoard.deploy` makes a bundle the configured champion and restarts;
- :meth:`LinuxAgentBoard.reset` stops it with SIGTERM (it flushes and says goodbye) and
  starts it; :meth:`LinuxAgentBoard.power_cut` SIGKILLs its process group (nothing
  flushed), waits, starts it;
- :meth:`LinuxAgentBoard.send_input` posts one sample to the HTTP source through the veth,
  :meth:`LinuxAgentBoard.read_output` waits for the answer (the class probabilities, float32);
- :meth:`LinuxAgentBoard.read_metrics` flattens the health document (``slots.champion.model_id``
  ...) and adds the process's RSS, the memory-limit status, the clock skew and the proxy's
  counters;
- :meth:`LinuxAgentBoard.netem`, :meth:`~LinuxAgentBoard.partition` and
  :meth:`~LinuxAgentBoard.heal` break its link; :attr:`LinuxAgentBoard.proxy` breaks its
  MQTT stream.

Where the kernel has ``tc netem``, :meth:`LinuxAgentBoard.netem` applies delay, jitter, loss
and rate to the whole veth (MQTT, the HTTP source, everything). Where it has not, loss is
still real packet loss on the whole link (nftables, see :meth:`hil.netns.Network.packet_loss`),
but delay and jitter are made by the board's MQTT proxy (:meth:`hil.proxy.MqttFaultProxy.set_delay`)
and delay only the agent's MQTT traffic, not its HTTP source; a rate cannot be applied.
``read_metrics()`` says which mechanism made what (``link.delay_by``, ``link.loss_by``).

A memory limit the kernel or the container refuses is not an error: the board runs without
it and ``read_metrics()["memory_limit"]`` says why (``memory_limit_applied`` is 0), for the
plan to report as a skip. A clock skew without libfaketime installed is a BoardError.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import ProtocolError
from device_agent.fsio import atomic_write_bytes
from device_agent.protocol import validate_device_id
from hil.boards.base import Board, BoardError, BoardOutput, Metrics
from hil.errors import HilError
from hil.netns import HostLink, NetemUnavailableError, Network, netem_unavailable
from hil.proxy import MqttFaultProxy

__all__ = ["LinuxAgentBoard", "faketime_env", "libfaketime_path"]

HTTP_PORT = 8080
"""The agent's HTTP source, on the device address inside the namespace."""
HEALTH_PORT = 8081
"""The agent's health endpoint, on the namespace's 127.0.0.1."""
RESERVED_SETTINGS = frozenset({"device_id", "mqtt_url", "data_dir", "health_port", "source"})
LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def libfaketime_path() -> Path | None:
    """libfaketime's preload library (the multi-threaded build where there is one), if any.

    ``EDGEOPS_HIL_LIBFAKETIME`` names it explicitly; otherwise the places Debian's
    ``libfaketime`` package and a ``make install`` put it are searched.
    """
    explicit = os.environ.get("EDGEOPS_HIL_LIBFAKETIME")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for pattern in LIBFAKETIME_GLOBS:
        for found in sorted(Path("/").glob(pattern.lstrip("/"))):
            return found
    return None


def faketime_env(skew_s: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that run a program with its wall clock ``skew_s`` seconds off.

    libfaketime is preloaded with a relative offset (``FAKETIME="+7200.000"``): every
    ``time()``, ``gettimeofday()`` and ``clock_gettime(CLOCK_REALTIME)`` of the program (so
    Python's ``time.time()`` and ``datetime.now()``) is shifted, and keeps running; the
    monotonic clock is left alone. ``base`` supplies an existing ``LD_PRELOAD`` to keep.
    BoardError if libfaketime is not installed (Debian: ``apt-get install faketime``).
    """
    if not math.isfinite(skew_s):
        raise BoardError(f"clock skew must be a finite number of seconds, got {skew_s}")
    library = libfaketime_path()
    if library is None:
        raise BoardError(
            "a clock skew needs libfaketime, which is not installed "
            "(Debian: apt-get install faketime; or set EDGEOPS_HIL_LIBFAKETIME)"
        )
    preload = (base or os.environ).get("LD_PRELOAD", "")
    return {
        "LD_PRELOAD": f"{library}:{preload}" if preload else str(library),
        "FAKETIME": f"{skew_s:+.3f}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise BoardError(f"agent setting value {value} cannot be written to TOML")
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _flatten(prefix: str, value: Any, out: Metrics) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, bool):
        out[prefix] = int(value)
    elif value is None or isinstance(value, int | float | str):
        out[prefix] = value
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _NamespaceHttp(http.client.HTTPConnection):
    """HTTP to an address as seen from inside a namespace (its 127.0.0.1, for one)."""

    def __init__(
        self, network: Network, link: HostLink, host: str, port: int, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._network = network
        self._link = link

    def connect(self) -> None:
        self.sock = self._network.connect(self._link, (self.host, self.port), self.timeout or 5.0)


class LinuxAgentBoard(Board):
    """The device agent in a network namespace of ``network``; see the module docstring.

    The constructor makes the board's host (namespace, veth) and its proxy to the broker on
    ``127.0.0.1:broker_port``; :meth:`start` (or :meth:`deploy`) starts the agent. BoardError
    for a name that is not a device id, or when the host or proxy cannot be made.
    """

    kind = "linux"

    def __init__(
        self,
        name: str,
        network: Network,
        *,
        broker_port: int,
        state_dir: Path,
        trust_root: Path | None = None,
        model_dir: Path | None = None,
        agent_settings: dict[str, Any] | None = None,
        memory_limit_bytes: int | None = None,
        clock_skew_s: float = 0.0,
        start_timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(name)
        try:
            validate_device_id(name)
        except ProtocolError as exc:
            raise BoardError(f"board {name!r}: {exc}") from None
        settings = dict(agent_settings or {})
        reserved = sorted(RESERVED_SETTINGS & set(settings))
        if reserved:
            raise BoardError(
                f"board {name}: agent_settings may not set {', '.join(reserved)} "
                "(the board sets them)"
            )
        if memory_limit_bytes is not None and memory_limit_bytes <= 0:
            raise BoardError(f"board {name}: memory_limit_bytes must be > 0")
        self.network = network
        self.state_dir = Path(state_dir)
        self.trust_root = trust_root
        self.model_dir = model_dir
        self.agent_settings = settings
        self.memory_limit_bytes = memory_limit_bytes
        self.clock_skew_s = float(clock_skew_s)
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self._clock_env = faketime_env(self.clock_skew_s) if self.clock_skew_s else {}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state_dir / "agent.toml"
        self.log_path: Path | None = None
        self.runs = 0
        self.power_cuts = 0
        self.memory_limit_status: str | None = None
        """Why the memory limit is not in force (None: applied, or none was asked for)."""
        self._memory_limit_applied = False
        self._process: subprocess.Popen[bytes] | None = None
        self._pending: Future[BoardOutput] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"board-{name}")
        self._closed = False
        self._link_faults: Metrics = {}
        try:
            self.link = network.add_host(name)
        except HilError as exc:
            raise BoardError(f"board {name}: host not made: {exc}") from None
        try:
            self.proxy = MqttFaultProxy(self.link.host_ip, broker_port).start()
        except HilError as exc:
            network.remove_host(self.link)
            raise BoardError(f"board {name}: {exc}") from None

    # -- what the board is -------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.name

    @property
    def pid(self) -> int | None:
        """The agent's process id while it runs."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def agent_state_dir(self) -> Path:
        """The agent's own files (slots, buffer, health.json): ``data/agents/<device_id>``."""
        return self.data_dir / "agents" / self.name

    @property
    def source_url(self) -> str:
        return f"http://{self.link.device_ip}:{HTTP_PORT}"

    # -- starting and stopping ---------------------------------------------------------------

    def write_config(self) -> Path:
        """Write ``agent.toml`` for the next start (atomically); its path."""
        values: dict[str, Any] = {
            "device_id": self.name,
            "mqtt_url": self.proxy.url,
            "data_dir": str(self.data_dir),
            "health_port": HEALTH_PORT,
            "heartbeat_s": 5.0,
            "shutdown_grace_s": 3.0,
        }
        if self.model_dir is not None:
            values["model_dir"] = str(self.model_dir)
        if self.trust_root is not None:
            values["trust_root_file"] = str(self.trust_root)
        values.update(self.agent_settings)
        values["source"] = {"kind": "http", "host": self.link.device_ip, "port": HTTP_PORT}
        text = "".join(f"{_toml_key(key)} = {_toml(value)}\n" for key, value in values.items())
        atomic_write_bytes(self.config_path, text.encode())
        return self.config_path

    def start(self) -> None:
        """Start the agent; return once it answers (BoardError, with its log's last line,
        if it exits or does not answer within ``start_timeout_s``)."""
        self._check_open()
        if self.running:
            raise BoardError(f"board {self.name}: the agent is already running")
        self.write_config()
        self.runs += 1
        self.log_path = self.state_dir / f"agent.run{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOPS_")}
        env.update(self._clock_env)
        argv = [sys.executable, "-m", "device_agent", "run", "--config", str(self.config_path)]
        with self.log_path.open("wb") as log_file:
            try:
                self._process = self.network.popen(
                    self.link,
                    [*argv, "--log-json"],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group, for the power cut
                )
            except HilError as exc:
                raise BoardError(f"board {self.name}: agent not started: {exc}") from None
        self._apply_memory_limit()
        self._wait_ready()

    def _apply_memory_limit(self) -> None:
        if self.memory_limit_bytes is None or self._process is None:
            return
        reason = self.network.memory_limit(
            self._process.pid, self.memory_limit_bytes, group=self.name
        )
        self.memory_limit_status = reason
        self._memory_limit_applied = reason is None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        doc: dict[str, Any] | None = None
        while doc is None:
            self._check_alive("during start")
            try:
                doc = self.health(timeout_s=1.0)
            except BoardError:
                if time.monotonic() >= deadline:
                    raise BoardError(
                        f"board {self.name}: the agent's health endpoint did not answer within "
                        f"{self.start_timeout_s:g} s{self._log_tail()}"
                    ) from None
                time.sleep(0.05)
        champion = (doc.get("slots") or {}).get("champion")
        if not champion or doc.get("source_error") or self.network.partitioned(self.link):
            return
        while True:  # the source answers through the veth
            self._check_alive("during start")
            try:
                self._http("GET", "/v1/health", None, timeout_s=1.0)
                return
            except BoardError:
                if time.monotonic() >= deadline:
                    raise BoardError(
                        f"board {self.name}: the HTTP source at {self.source_url} did not "
                        f"answer within {self.start_timeout_s:g} s"
                    ) from None
                time.sleep(0.05)

    def _check_alive(self, when: str) -> None:
        process = self._process
        if process is not None and process.poll() is not None:
            raise BoardError(
                f"board {self.name}: the agent exited with code {process.returncode} {when}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
        except OSError:
            return ""
        if not lines:
            return ""
        last = lines[-1]
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(last)
            last = str(record.get("message") or record.get("msg") or last)
        return f" (its log {self.log_path} ends: {last[:300]})"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the agent and wait for it (SIGKILL after ``timeout_s``, default the
        agent's shutdown grace + 15 s); its exit code, None if it was not running."""
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        grace = float(self.agent_settings.get("shutdown_grace_s", 3.0))
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s if timeout_s is not None else grace + 15.0)
        except subprocess.TimeoutExpired:
            self._kill()
            return process.returncode

    def _kill(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=30)

    # -- Board -------------------------------------------------------------------------------

    def deploy(self, image: Path) -> None:
        """Make the bundle in ``image`` the configured champion (``model_dir``) and restart.

        BoardError if the restarted agent does not run it (a release installed earlier keeps
        the configured bundle out: see the agent's slots).
        """
        from device_agent.errors import AgentError
        from device_agent.runtime import ModelBundle

        try:
            wanted = ModelBundle.load(Path(image)).model_id
        except (AgentError, OSError) as exc:
            raise BoardError(f"board {self.name}: {image} is not a model bundle: {exc}") from None
        self.stop()
        self.model_dir = Path(image)
        self.start()
        doc = self.health()
        running = ((doc.get("slots") or {}).get("champion") or {}).get("model_id")
        if running != wanted:
            raise BoardError(
                f"board {self.name}: deployed {wanted} but the agent runs {running or 'nothing'}"
                f" (model_error: {doc.get('model_error')})"
            )

    def reset(self) -> None:
        self.stop()
        self.start()

    def power_cut(self, off_s: float = 0.0) -> None:
        """SIGKILL the agent's process group (nothing flushed), wait ``off_s``, start it."""
        self._check_open()
        self._kill()
        self.power_cuts += 1
        if off_s > 0:
            time.sleep(off_s)
        self.start()

    def send_input(self, tensor: np.ndarray) -> None:
        """Post ``tensor`` (one raw sample) to the agent's HTTP source, in the background."""
        self._check_open()
        values = np.asarray(tensor, dtype=np.float64).ravel().tolist()
        body = json.dumps({"inputs": values}).encode()
        self._pending = self._executor.submit(self._predict, body)

    def read_output(self, timeout_s: float = 10.0) -> BoardOutput:
        pending = self._pending
        if pending is None:
            raise BoardError(f"board {self.name}: no input was sent")
        try:
            output = pending.result(timeout=timeout_s)
        except FutureTimeout:
            raise BoardError(
                f"board {self.name}: no answer from {self.source_url} within {timeout_s:g} s"
            ) from None
        self._pending = None
        return output

    def _predict(self, body: bytes) -> BoardOutput:
        started = time.monotonic()
        status, answer = self._http("POST", "/v1/predict", body, self.request_timeout_s)
        latency = time.monotonic() - started
        if status != 200 or "probabilities" not in answer:
            raise BoardError(
                f"board {self.name}: the agent answered {status}: "
                f"{answer.get('error', json.dumps(answer)[:200])}"
            )
        extra = {k: v for k, v in answer.items() if k != "probabilities"}
        try:
            values = np.asarray(answer["probabilities"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise BoardError(f"board {self.name}: the agent's probabilities: {exc}") from None
        return BoardOutput(values=values, latency_s=latency, extra=extra)

    def _http(
        self, method: str, path: str, body: bytes | None, timeout_s: float
    ) -> tuple[int, dict[str, Any]]:
        """A request to the HTTP source through the veth: (status, JSON answer)."""
        connection = http.client.HTTPConnection(self.link.device_ip, HTTP_PORT, timeout=timeout_s)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise BoardError(
                f"board {self.name}: {method} {self.source_url}{path} failed: {exc}"
            ) from None
        finally:
            connection.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise BoardError(
                f"board {self.name}: {self.source_url}{path} answered no JSON ({status})"
            ) from None
        return status, answer if isinstance(answer, dict) else {"answer": answer}

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The agent's health document, read from inside the namespace; BoardError if it
        does not answer."""
        connection = _NamespaceHttp(self.network, self.link, "127.0.0.1", HEALTH_PORT, timeout_s)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException, HilError) as exc:
            raise BoardError(f"board {self.name}: health endpoint not answering: {exc}") from None
        finally:
            connection.close()
        try:
            doc = json.loads(data)
        except ValueError:
            raise BoardError(f"board {self.name}: the health endpoint answered no JSON") from None
        if not isinstance(doc, dict):
            raise BoardError(f"board {self.name}: the health endpoint answered no JSON object")
        return doc

    def wait_status(self, status: str = "connected", timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until the health document's ``status`` is ``status``; the document."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while True:
            self._check_alive("while waited for")
            with contextlib.suppress(BoardError):
                doc = self.health(timeout_s=1.0)
                seen = doc.get("status")
                if seen == status:
                    return doc
            if time.monotonic() >= deadline:
                raise BoardError(
                    f"board {self.name}: agent status {seen!r}, not {status!r} after "
                    f"{timeout_s:g} s"
                )
            time.sleep(0.05)

    def read_metrics(self) -> Metrics:
        metrics: Metrics = {}
        pid = self.pid
        if pid is not None:
            try:
                _flatten("", self.health(timeout_s=2.0), metrics)
            except BoardError as exc:
                metrics["health_error"] = str(exc)
        metrics["running"] = int(pid is not None)
        metrics["pid"] = pid
        metrics["runs"] = self.runs
        metrics["power_cuts"] = self.power_cuts
        metrics["rss_bytes"] = _rss_bytes(pid) if pid is not None else None
        metrics["clock_skew_s"] = self.clock_skew_s
        metrics["partitioned"] = int(self.network.partitioned(self.link))
        for key, value in self._link_faults.items():
            metrics[f"link.{key}"] = value
        if self.network.loss_pct(self.link):
            try:
                metrics["link.dropped_packets"] = self.network.dropped_packets(self.link)
            except HilError as exc:
                metrics["link.dropped_packets"] = str(exc)
        metrics["memory_limit_bytes"] = self.memory_limit_bytes
        metrics["memory_limit_applied"] = int(self._memory_limit_applied)
        if self.memory_limit_bytes is None:
            metrics["memory_limit"] = None
        elif self._memory_limit_applied:
            metrics["memory_limit"] = f"applied: {self.memory_limit_bytes} bytes"
        else:
            metrics["memory_limit"] = self.memory_limit_status or "not applied: not started"
        stats = self.proxy.stats
        for key in (
            "connections",
            "active",
            "bytes_to_broker",
            "bytes_to_client",
            "publishes_to_client",
            "corrupted",
            "dropped",
        ):
            metrics[f"proxy.{key}"] = int(getattr(stats, key))
        return metrics

    # -- the link ----------------------------------------------------------------------------

    def netem(
        self,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0.0,
        rate: str | None = None,
    ) -> str:
        """Delay, jitter, loss and rate on this board's link, each direction; what applied
        them, in words (``"delay 100 ms by the MQTT proxy (MQTT only), loss 30 % by
        nftables"``; ``"nothing"`` when all are zero, which clears the link).

        Where the kernel has netem: :meth:`hil.netns.Network.netem` on the whole link (the
        proxy adds no delay). Where it has not: the loss by
        :meth:`hil.netns.Network.packet_loss` (nftables, the whole link) and the delay and
        jitter by :meth:`hil.proxy.MqttFaultProxy.set_delay`, which delays the agent's MQTT
        connection only (its HTTP source answers without delay); a rate is a
        NetemUnavailableError, nothing applied. NetworkError for bad values.
        """
        self._check_open()
        Network.check_netem_values(
            self.name, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, rate=rate
        )
        reason = netem_unavailable()
        if reason is None:
            self.proxy.set_delay(0)
            self.network.netem(
                self.link, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, rate=rate
            )
            delay_by = loss_by = "netem"
        else:
            if rate is not None:
                raise NetemUnavailableError(
                    f"board {self.name}: a rate needs netem, which is not available: {reason}"
                )
            self.network.netem(self.link, loss_pct=loss_pct)  # nftables, or cleared
            self.proxy.set_delay(delay_ms, jitter_ms)
            delay_by, loss_by = "the MQTT proxy (MQTT only)", "nftables"
        faults: Metrics = {}
        words = []
        if delay_ms:
            jitter = f" ± {jitter_ms:g}" if jitter_ms else ""
            words.append(f"delay {delay_ms:g}{jitter} ms by {delay_by}")
            faults.update({"delay_ms": delay_ms, "jitter_ms": jitter_ms, "delay_by": delay_by})
        if loss_pct:
            words.append(f"loss {loss_pct:g} % by {loss_by}")
            faults.update({"loss_pct": loss_pct, "loss_by": loss_by})
        if rate is not None:
            words.append(f"rate {rate} by netem")
            faults["rate"] = rate
        self._link_faults = faults
        return ", ".join(words) or "nothing"

    def clear_netem(self) -> None:
        """Undo :meth:`netem`: no netem, no packet loss, no proxy delay."""
        self.proxy.set_delay(0)
        self.network.clear(self.link)
        self._link_faults = {}

    def partition(self) -> None:
        self.network.partition(self.link)

    def heal(self) -> None:
        self.network.heal(self.link)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL) and the proxy; the namespace stays with
        the network until :meth:`hil.netns.Network.close`. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.network.partitioned(self.link):
                self.stop(timeout_s=5.0)  # its goodbye cannot reach the broker anyway
            else:
                self.stop()
        finally:
            self._kill()
            self.proxy.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise BoardError(f"board {self.name} is closed")
