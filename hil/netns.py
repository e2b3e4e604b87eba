"""Network namespaces for Linux boards: one namespace and veth pair per host, links to break.

Each host of a :class:`Network` is a network namespace of its own joined to the rig by a veth
pair: the host side (``host_ip``) in the rig's namespace, the device side (``device_ip``)
inside, a /30 of its own from 198.18.0.0/15 (the range reserved for network testing, RFC
2544), ``lo`` up, no default route: from inside, only the rig's address on that link is
reachable. Programs run inside with :meth:`Network.popen` (``ip netns exec``); the rig opens
sockets inside with :meth:`Network.open_socket` and :meth:`Network.connect` (for services
that listen on the namespace's loopback only).

A link can be broken four ways:

- :meth:`Network.netem`: ``tc netem`` delay, jitter, loss and rate on both ends of the veth
  (each direction, so a round trip takes twice ``delay_ms``) where the kernel has the netem
  queueing discipline. Where it has not (:func:`netem_unavailable` says so up front), a loss
  alone is made by :meth:`Network.packet_loss` instead, and a delay, jitter or rate is a
  :class:`NetemUnavailableError`: nothing here delays a whole link without netem (a Linux
  board delays its MQTT traffic in its proxy instead, see :mod:`hil.boards.linux`);
- :meth:`Network.packet_loss`: random loss by nftables, which needs no netem: a table
  ``inet edgeops_hil`` inside the link's namespace drops each IP packet crossing the
  namespace's end of the veth, in each direction, with probability ``pct`` % (rules
  ``numgen random mod 10000 < pct * 100`` on the input and output hooks; 100 % drops every
  packet). The packets are really lost: TCP retransmits them, UDP datagrams and pings
  vanish. ARP and the namespace's loopback are not affected. No delay comes with it;
- :meth:`Network.partition` / :meth:`Network.heal`: every IP packet between the two ends is
  dropped silently, without an error or a reset on either side (each end's neighbour entry
  for the other is pinned to a MAC address nobody has, so the frames are discarded on
  arrival), which works on every kernel: TCP connections stall and retransmit as across a
  real partition, new connections time out; healing lets the retransmissions through;
- :meth:`Network.memory_limit`: a program's memory is capped by a cgroup (v2 ``memory.max``,
  else v1 ``memory.limit_in_bytes``) in a group of this run's, below the rig's own cgroup;
  where the kernel or the container refuses, the reason is returned, never ignored.

Names: every run has a short unique prefix (``eh`` + the rig's pid in base 36 + two random
characters); namespaces are ``<prefix>-<host>``, veth ends ``<prefix><nn>h`` and
``<prefix><nn>d`` (at most 12 characters; Linux allows 15). :meth:`Network.close` removes
every namespace, veth, cgroup and process of the run, also after errors; a new
:class:`Network` first removes what runs that died left behind (their pid is in the prefix)
and what an earlier run with the same prefix left.

Everything needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and ``ip`` and ``tc`` from iproute2:
:func:`netns_unavailable` says why not where that is missing. Packet loss needs ``nft``
(Debian package ``nftables``) and a kernel with nftables' ``numgen`` expression:
:func:`nftables_unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from hil.errors import HilError

__all__ = [
    "HostLink",
    "NetemUnavailableError",
    "Network",
    "NetworkError",
    "PacketLossUnavailableError",
    "netem_unavailable",
    "netns_unavailable",
    "nftables_unavailable",
]

SUBNET = ipaddress.IPv4Network("198.18.0.0/15")
"""Where the links' /30s come from (RFC 2544: reserved for network benchmark tests)."""
LINK_PREFIX_LEN = 30
NOWHERE_MAC = "02:ed:9e:00:00:01"
"""The MAC address a partitioned link's neighbour entries point to: locally administered,
unicast, and on no interface, so frames sent to it are dropped by the receiving veth."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
_RUN_PREFIX = "eh"
_PREFIX_RE = re.compile(r"^eh(?P<pid>[0-9a-z]{5})[0-9a-z]{2}$")
_NETNS_RE = re.compile(r"^(?P<prefix>eh[0-9a-z]{7})-")
_VETH_RE = re.compile(r"^(?P<prefix>eh[0-9a-z]{7})[0-9a-z]{2}[hd]$")
_CGROUP_RE = re.compile(r"^edgeops-hil-(?P<prefix>eh[0-9a-z]{7})$")
_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_RATE_RE = re.compile(r"^\d+(\.\d+)?([kmgt]?(bit|bps)|bit|bps)$", re.IGNORECASE)
_CLONE_NEWNET = 0x40000000
_ALLOC_LOCK = Path(tempfile.gettempdir()) / "edgeops-hil-netns.lock"
_COMMAND_TIMEOUT_S = 30.0
_PACKAGES = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}
NFT_TABLE = "edgeops_hil"
"""The nftables table (family ``inet``) that :meth:`Network.packet_loss` puts in a namespace."""
_LOSS_SCALE = 10000
"""Loss probabilities are applied in steps of 1/_LOSS_SCALE (0.01 %)."""


class NetworkError(HilError):
    """A namespace, veth, qdisc or cgroup operation failed; the message names it."""


class NetemUnavailableError(NetworkError):
    """``tc netem`` cannot be used here (the kernel has no netem queueing discipline)."""


class PacketLossUnavailableError(NetworkError):
    """Packet loss by nftables cannot be used here (no ``nft``, or the kernel refuses)."""


@dataclass(frozen=True)
class HostLink:
    """One host of a :class:`Network`: its namespace and the veth pair joining it to the rig."""

    name: str
    namespace: str
    host_ip: str
    """The rig's address on this link (host side of the veth, in the rig's namespace)."""
    device_ip: str
    """The address inside the namespace."""
    host_veth: str
    device_veth: str
    prefix_len: int = LINK_PREFIX_LEN


# -- running ip and tc -------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (``input_text`` on its stdin, else none); NetworkError naming the command
    and its error if it fails and ``check``."""
    try:
        if input_text is None:
            result = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        else:
            result = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
                check=False,
                input=input_text,
            )
    except FileNotFoundError:
        package = _PACKAGES.get(argv[0])
        raise NetworkError(
            f"{argv[0]} is not installed" + (f" ({package})" if package else "")
        ) from None
    except subprocess.TimeoutExpired:
        raise NetworkError(
            f"{' '.join(argv)} did not finish within {_COMMAND_TIMEOUT_S:g} s"
        ) from None
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {_first_line(result.stderr)}")
    return result


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no error message"


def _is_root() -> bool:
    return os.geteuid() == 0


@functools.cache
def netns_unavailable() -> str | None:
    """None if this machine can make network namespaces and veth pairs, else why not.

    Checks for root, ``ip`` and ``tc``, and that a trial namespace can be added and removed.
    The answer is computed once per process.
    """
    if not _is_root():
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} (iproute2) is not installed"
    name = f"{_RUN_PREFIX}p-{secrets.token_hex(3)}"  # no run's name: has a '-' at 3
    try:
        added = _run(["ip", "netns", "add", name], check=False)
        if added.returncode != 0:
            return f"ip netns add is refused here: {_first_line(added.stderr)}"
        veth = _run(
            ["ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}d",
             "netns", name],
            check=False,
        )  # fmt: skip
        if veth.returncode != 0:
            return f"veth pairs cannot be made here: {_first_line(veth.stderr)}"
        _run(["ip", "link", "del", f"{name}h"], check=False)
    except NetworkError as exc:
        return str(exc)
    finally:
        with contextlib.suppress(NetworkError):
            _run(["ip", "netns", "del", name], check=False)
    return None


@functools.cache
def netem_unavailable() -> str | None:
    """None if ``tc netem`` works here, else why not (computed once per process)."""
    reason = netns_unavailable()
    if reason is not None:
        return reason
    name = f"{_RUN_PREFIX}n-{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", name])
        result = _run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            return _netem_reason(result.stderr)
    except NetworkError as exc:
        return str(exc)
    finally:
        with contextlib.suppress(NetworkError):
            _run(["ip", "netns", "del", name], check=False)
    return None


def _nft_script(link_veth: str | None, pct: float) -> str:
    """An ``nft -f`` script that replaces the rig's table in one transaction: with loss
    ``pct`` % on ``link_veth`` each way, or (``link_veth`` None) none at all."""
    lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]  # add, then delete:
    if link_veth is not None:  # works whether or not the table was there
        below = round(pct * _LOSS_SCALE / 100)
        chance = "" if below >= _LOSS_SCALE else f"numgen random mod {_LOSS_SCALE} < {below} "
        lines += [
            f"table inet {NFT_TABLE} {{",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f'    iifname "{link_veth}" {chance}counter drop',
            "  }",
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            f'    oifname "{link_veth}" {chance}counter drop',
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


@functools.cache
def nftables_unavailable() -> str | None:
    """None if :meth:`Network.packet_loss` works here, else why not (computed once).

    Checks for ``nft`` and loads the loss rules (``numgen``) into a trial namespace.
    """
    reason = netns_unavailable()
    if reason is not None:
        return reason
    if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        return "nft is not installed (Debian: apt-get install nftables)"
    name = f"{_RUN_PREFIX}f-{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", name])
        result = _run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"], check=False,
            input_text=_nft_script("lo", 50.0),
        )  # fmt: skip
        if result.returncode != 0:
            return (
                "nftables refused the packet-loss rules (the kernel needs CONFIG_NF_TABLES, "
                f"CONFIG_NF_TABLES_INET and CONFIG_NFT_NUMGEN): {_first_line(result.stderr)}"
            )
    except NetworkError as exc:
        return str(exc)
    finally:
        with contextlib.suppress(NetworkError):
            _run(["ip", "netns", "del", name], check=False)
    return None


def _netem_reason(stderr: str) -> str:
    line = _first_line(stderr)
    if "unknown" in line.lower():
        return (
            "tc netem is not available: this kernel has no netem queueing discipline "
            f"(CONFIG_NET_SCH_NETEM, module sch_netem): {line}"
        )
    return f"tc netem refused: {line}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _base36(number: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while number:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
    return text.rjust(width, "0")[-width:]


def _new_prefix() -> str:
    return _RUN_PREFIX + _base36(os.getpid(), 5) + _base36(secrets.randbelow(36 * 36), 2)


def _prefix_pid(prefix: str) -> int | None:
    match = _PREFIX_RE.match(prefix)
    return int(match.group("pid"), 36) if match else None


def _stale(prefix: str, own: str) -> bool:
    """Whether resources named with ``prefix`` are a dead run's (or an earlier run of ours)."""
    if prefix == own:
        return True
    pid = _prefix_pid(prefix)
    return pid is not None and pid != os.getpid() and not _pid_alive(pid)


# -- sockets inside a namespace ----------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def socket_in_namespace(
    namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that belongs to network namespace ``namespace``.

    A socket lives in the namespace of the thread that created it; this one is created on a
    short-lived thread that joined ``namespace`` (setns), so the rig's own threads never
    leave theirs. NetworkError if the namespace does not exist or cannot be joined.
    """
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def create() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target)
                    try:
                        result.append(socket.socket(family, kind))
                    finally:
                        _setns(own)
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)

    thread = threading.Thread(target=create, name=f"setns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if failure or not result:
        raise NetworkError(f"cannot open a socket in namespace {namespace}: {failure[0]}")
    return result[0]


# -- cgroups -----------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount of this process."""
    mounts = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3:
            mounts.append((fields[4], rest[0], rest[2]))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup paths: ``""`` for v2, else each v1 controller's name."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths[""] = parts[2]
        for controller in parts[1].split(","):
            if controller:
                paths[controller] = parts[2]
    return paths


@dataclass(frozen=True)
class _CgroupPlace:
    """Where this run's memory groups go: the parent directory and the limit file's name."""

    parent: Path
    limit_file: str
    version: int


def _memory_cgroup_place() -> tuple[_CgroupPlace | None, str]:
    """The rig's own memory cgroup (v2 preferred, else v1), or None and why not."""
    reasons = []
    own = _own_cgroups()
    mounts = _mounts()
    v2 = [point for point, fstype, _ in mounts if fstype == "cgroup2"]
    if v2 and "" in own:
        base = Path(v2[0]) / own[""].lstrip("/")
        controllers = _read(base / "cgroup.controllers")
        if controllers is not None and "memory" in controllers.split():
            return _CgroupPlace(base, "memory.max", 2), ""
        reasons.append(
            f"cgroup v2 ({v2[0]}) offers no memory controller to this process's group"
            + (" (it is bound to cgroup v1)" if "memory" in own else "")
        )
    else:
        reasons.append("no cgroup v2 hierarchy is mounted")
    v1 = [
        point
        for point, fstype, opts in mounts
        if fstype == "cgroup" and "memory" in opts.split(",")
    ]
    if v1 and "memory" in own:
        base = Path(v1[0]) / own["memory"].lstrip("/")
        if (base / "memory.limit_in_bytes").exists() or base.is_dir():
            return _CgroupPlace(base, "memory.limit_in_bytes", 1), ""
        reasons.append(f"the cgroup v1 memory group {base} is not visible")
    else:
        reasons.append("no cgroup v1 memory hierarchy is mounted")
    return None, "; ".join(reasons)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write(path: Path, text: str) -> str | None:
    """Write ``text`` to a cgroup file; None, or why the kernel refused."""
    try:
        with path.open("w") as fh:
            fh.write(text)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return f"{path} is on a read-only file system (cgroupfs mounted read-only)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"writing {path} is not permitted (no cgroup delegation): {exc.strerror}"
        return f"writing {path} failed: {exc.strerror or exc}"
    return None


def _delegate_memory(parent: Path) -> str | None:
    """Enable the v2 memory controller for ``parent``'s children; None, or why not."""
    controls = _read(parent / "cgroup.subtree_control")
    if controls is not None and "memory" in controls.split():
        return None
    failed = _write(parent / "cgroup.subtree_control", "+memory")
    if failed is None:
        return None
    busy = "EBUSY" in failed or "busy" in failed.lower()
    return (
        f"the memory controller cannot be enabled for the children of {parent}"
        + (
            " (cgroup v2 allows that only in a group without processes of its own, and "
            "the rig runs in it)"
            if busy
            else ""
        )
        + f": {failed}"
    )


def _remove_cgroup(directory: Path, evacuate_to: Path) -> None:
    """Move what still runs in ``directory`` (and below) to ``evacuate_to``, remove it all."""
    if not directory.is_dir():
        return
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        _remove_cgroup(child, evacuate_to)
    for pid in (_read(directory / "cgroup.procs") or "").split():
        _write(evacuate_to / "cgroup.procs", pid)
    for _ in range(50):  # a process killed a moment ago may still be leaving the group
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


# -- the network -------------------------------------------------------------------------------


class Network:
    """The rig's network namespaces: every namespace, veth, cgroup and process it made.

    ``prefix`` names everything of this run (default: a fresh unique one; see the module
    docstring); a given prefix must look like a default one (``eh`` and 7 characters of
    ``[0-9a-z]``). NetworkError if namespaces cannot be made here (the reason from
    :func:`netns_unavailable`). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, prefix: str | None = None) -> None:
        reason = netns_unavailable()
        if reason is not None:
            raise NetworkError(f"network namespaces are not available: {reason}")
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise NetworkError(
                f"network prefix {prefix!r} is not 'eh' followed by 7 characters of [0-9a-z]"
            )
        self.prefix = prefix or _new_prefix()
        self._links: dict[str, HostLink] = {}
        self._pending: list[tuple[str, str]] = []  # (namespace, host veth) being made
        self._next_index = 0
        self._processes: list[subprocess.Popen[Any]] = []
        self._partitioned: set[str] = set()
        self._loss: dict[str, float] = {}  # link name: packet loss % by nftables
        self._cgroups: dict[str, Path] = {}
        self._cgroup_place: _CgroupPlace | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.cleaned_stale: list[str] = self._clean_stale()

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Network {self.prefix}: {', '.join(self._links) or 'no hosts'}>"

    @property
    def links(self) -> dict[str, HostLink]:
        """The hosts made so far, by name."""
        return dict(self._links)

    # -- hosts -------------------------------------------------------------------------------

    def add_host(self, name: str) -> HostLink:
        """A new namespace ``<prefix>-<name>`` joined to the rig by a veth pair with a /30.

        NetworkError if ``name`` is taken or not a plain name, or if ``ip`` fails.
        """
        if not _HOST_NAME_RE.match(name):
            raise NetworkError(
                f"host name {name!r} must be 1-48 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit"
            )
        with self._lock:
            self._check_open()
            if name in self._links:
                raise NetworkError(f"host {name!r} already exists in network {self.prefix}")
            # never reused: a host removed and added again gets new veth names
            index = self._next_index
            self._next_index += 1
            if index >= 36 * 36:
                raise NetworkError(f"network {self.prefix} is full ({36 * 36} hosts)")
            namespace = f"{self.prefix}-{name}"
            host_veth = f"{self.prefix}{_base36(index, 2)}h"
            device_veth = f"{self.prefix}{_base36(index, 2)}d"
            self._pending.append((namespace, host_veth))
        try:
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "link", "add", host_veth, "type", "veth", "peer", "name", device_veth,
                  "netns", namespace])  # fmt: skip
            host_ip, device_ip = self._assign_addresses(host_veth)
            in_ns = ["ip", "-n", namespace]
            _run([*in_ns, "addr", "add", f"{device_ip}/{LINK_PREFIX_LEN}", "dev", device_veth])
            _run([*in_ns, "link", "set", "lo", "up"])
            _run([*in_ns, "link", "set", device_veth, "up"])
        except NetworkError:
            self._remove_host(namespace, host_veth)
            with self._lock:
                self._pending.remove((namespace, host_veth))
            raise
        link = HostLink(name, namespace, host_ip, device_ip, host_veth, device_veth)
        with self._lock:
            self._pending.remove((namespace, host_veth))
            self._links[name] = link
        return link

    def _assign_addresses(self, host_veth: str) -> tuple[str, str]:
        """Pick a /30 no interface of this machine uses and put its first address on
        ``host_veth`` (under a lock file, so two rigs starting at once never pick the same)."""
        _ALLOC_LOCK.touch(exist_ok=True)
        with _ALLOC_LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                used = self._used_networks()
                subnets = list(SUBNET.subnets(new_prefix=LINK_PREFIX_LEN))
                start = secrets.randbelow(len(subnets))
                for offset in range(len(subnets)):
                    subnet = subnets[(start + offset) % len(subnets)]
                    if any(subnet.overlaps(other) for other in used):
                        continue
                    host_ip, device_ip = (str(address) for address in list(subnet.hosts())[:2])
                    _run(["ip", "addr", "add", f"{host_ip}/{LINK_PREFIX_LEN}", "dev", host_veth])
                    _run(["ip", "link", "set", host_veth, "up"])
                    return host_ip, device_ip
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        raise NetworkError(f"no free /{LINK_PREFIX_LEN} left in {SUBNET}")

    @staticmethod
    def _used_networks() -> list[ipaddress.IPv4Network]:
        result = _run(["ip", "-j", "-4", "addr", "show"])
        used = []
        try:
            interfaces = json.loads(result.stdout or "[]")
        except ValueError:
            raise NetworkError("ip -j addr show printed no JSON") from None
        for interface in interfaces:
            for info in interface.get("addr_info", []):
                with contextlib.suppress(KeyError, ValueError):
                    used.append(
                        ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                    )
        return used

    def remove_host(self, link: HostLink) -> None:
        """Stop the processes inside ``link``'s namespace and remove it with its veth pair."""
        with self._lock:
            self._links.pop(link.name, None)
            self._partitioned.discard(link.name)
            lossy = self._loss.pop(link.name, None) is not None
        self._kill_namespace_processes(link.namespace)
        if lossy:
            with contextlib.suppress(NetworkError):
                self._remove_loss_table(link.namespace)
        self._remove_host(link.namespace, link.host_veth)

    def _remove_host(self, namespace: str, host_veth: str) -> None:
        _run(["ip", "link", "del", host_veth], check=False)  # both ends of the pair go
        _run(["ip", "netns", "del", namespace], check=False)

    # -- programs inside ---------------------------------------------------------------------

    def popen(self, link: HostLink, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``link``'s namespace (``ip netns exec``, which execs it: the
        process's pid is the program's). Keyword arguments go to :class:`subprocess.Popen`.
        The process is killed by :meth:`close` if it still runs then."""
        self._check_open()
        try:
            process = subprocess.Popen(["ip", "netns", "exec", link.namespace, *argv], **kwargs)
        except OSError as exc:
            raise NetworkError(f"cannot start {argv[0]} in {link.namespace}: {exc}") from None
        with self._lock:
            self._processes = [p for p in self._processes if p.poll() is None]
            self._processes.append(process)
        return process

    def open_socket(self, link: HostLink, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """An IPv4 socket inside ``link``'s namespace (see :func:`socket_in_namespace`)."""
        return socket_in_namespace(link.namespace, socket.AF_INET, kind)

    def connect(
        self, link: HostLink, address: tuple[str, int], timeout_s: float = 5.0
    ) -> socket.socket:
        """A TCP connection made from inside ``link``'s namespace (e.g. to its 127.0.0.1)."""
        sock = self.open_socket(link)
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    def namespace_pids(self, link: HostLink) -> list[int]:
        """The pids of every process inside ``link``'s namespace."""
        return self._namespace_pids(link.namespace)

    @staticmethod
    def _namespace_pids(namespace: str) -> list[int]:
        result = _run(["ip", "netns", "pids", namespace], check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    def _kill_namespace_processes(self, namespace: str) -> None:
        """SIGKILL every process inside ``namespace`` (all started by this run) and reap the
        ones this run started directly."""
        pids = self._namespace_pids(namespace)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with self._lock:
            processes = [p for p in self._processes if p.pid in pids]
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    # -- breaking links ----------------------------------------------------------------------

    def netem(
        self,
        link: HostLink,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0.0,
        rate: str | None = None,
    ) -> str | None:
        """Delay, jitter, loss and rate on both ends of ``link``; which mechanism applied them.

        Where the kernel has netem (:func:`netem_unavailable` is None): ``tc qdisc replace
        ... root netem`` on both ends of the veth, each applying to the packets that end
        sends, so a round trip takes twice ``delay_ms`` and each direction loses
        ``loss_pct`` %; returns ``"netem"``. Where it has not: a loss alone is applied by
        :meth:`packet_loss` (nftables, also each direction) and ``"nftables"`` returned; a
        delay, jitter or rate is a NetemUnavailableError, nothing applied (no other
        mechanism delays or shapes the whole link). All zero and no rate clears the link
        (:meth:`clear`) and returns None. ``rate`` is tc's notation (``1mbit``,
        ``500kbit``). NetworkError for bad values.
        """
        self.check_netem_values(
            link.name, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, rate=rate
        )
        if not delay_ms and not loss_pct and rate is None:
            self.clear(link)
            return None
        reason = netem_unavailable()
        if reason is not None:
            if delay_ms or rate is not None:
                raise NetemUnavailableError(
                    f"netem on {link.name}: {reason}; without netem only packet loss can be "
                    "applied to a whole link (by nftables)"
                )
            try:
                self.packet_loss(link, loss_pct)
            except PacketLossUnavailableError as exc:
                raise NetemUnavailableError(
                    f"netem on {link.name}: {reason}; and packet loss by nftables is not "
                    f"available either: {exc}"
                ) from None
            return "nftables"
        self.clear_packet_loss(link)
        spec: list[str] = []
        if delay_ms:
            spec += ["delay", f"{delay_ms:g}ms"] + ([f"{jitter_ms:g}ms"] if jitter_ms else [])
        if loss_pct:
            spec += ["loss", f"{loss_pct:g}%"]
        if rate is not None:
            spec += ["rate", rate]
        for command in (
            ["tc", "qdisc", "replace", "dev", link.host_veth, "root", "netem", *spec],
            ["ip", "netns", "exec", link.namespace,
             "tc", "qdisc", "replace", "dev", link.device_veth, "root", "netem", *spec],
        ):  # fmt: skip
            result = _run(command, check=False)
            if result.returncode != 0:
                if "unknown" in result.stderr.lower():
                    raise NetemUnavailableError(
                        f"netem on {link.name}: {_netem_reason(result.stderr)}"
                    )
                raise NetworkError(f"netem on {link.name}: {_first_line(result.stderr)}")
        return "netem"

    @staticmethod
    def check_netem_values(
        name: str,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0.0,
        rate: str | None = None,
    ) -> None:
        """NetworkError naming the first bad value of a :meth:`netem` call on link ``name``."""
        values = (delay_ms, jitter_ms, loss_pct)
        if (
            not all(math.isfinite(v) for v in values)
            or delay_ms < 0
            or jitter_ms < 0
            or not 0.0 <= loss_pct <= 100.0
        ):
            raise NetworkError(
                f"netem on {name}: delay and jitter must be >= 0 and loss 0-100 %, got "
                f"delay {delay_ms} ms, jitter {jitter_ms} ms, loss {loss_pct} %"
            )
        if jitter_ms and not delay_ms:
            raise NetworkError(f"netem on {name}: jitter needs a delay")
        if rate is not None and not _RATE_RE.match(rate):
            raise NetworkError(f"netem on {name}: rate {rate!r} is not like 1mbit or 500kbit")

    def clear(self, link: HostLink) -> None:
        """Remove netem from both ends of ``link`` and its packet loss by nftables (nothing
        to remove is fine)."""
        _run(["tc", "qdisc", "del", "dev", link.host_veth, "root"], check=False)
        _run(["ip", "netns", "exec", link.namespace,
              "tc", "qdisc", "del", "dev", link.device_veth, "root"], check=False)  # fmt: skip
        self.clear_packet_loss(link)

    def packet_loss(self, link: HostLink, pct: float) -> None:
        """Drop ``pct`` % of the IP packets each way between the rig and ``link``, at random.

        nftables, inside ``link``'s namespace: a table ``inet edgeops_hil`` of the rig's
        own (see :data:`NFT_TABLE`) whose ``input`` and ``output`` chains drop a packet
        that arrives on or leaves by the namespace's veth end when ``numgen random mod
        10000`` is below ``pct * 100``. Each direction loses ``pct`` % independently, so a
        request and its answer both get through with probability ``(1 - pct/100)²``. The
        namespace's loopback is left alone. ``pct`` is applied in steps of 0.01 % (100 drops
        every packet, without ``numgen``). The table is replaced in one transaction, so a
        new ``pct`` takes over without a moment of no loss or double loss; 0 clears it
        (:meth:`clear_packet_loss`). Independent of netem (:meth:`clear` removes both).
        NetworkError for a ``pct`` outside 0-100; PacketLossUnavailableError where nftables
        cannot do it (:func:`nftables_unavailable`'s reason).
        """
        if not (math.isfinite(pct) and 0.0 <= pct <= 100.0):
            raise NetworkError(f"packet loss on {link.name}: must be 0-100 %, got {pct}")
        self._check_open()
        if pct == 0:
            self.clear_packet_loss(link)
            return
        reason = nftables_unavailable()
        if reason is not None:
            raise PacketLossUnavailableError(f"packet loss on {link.name}: {reason}")
        result = _run(
            ["ip", "netns", "exec", link.namespace, "nft", "-f", "-"],
            check=False,
            input_text=_nft_script(link.device_veth, pct),
        )
        if result.returncode != 0:
            raise NetworkError(f"packet loss on {link.name}: nft: {_first_line(result.stderr)}")
        with self._lock:
            self._loss[link.name] = float(pct)

    def clear_packet_loss(self, link: HostLink) -> None:
        """Remove :meth:`packet_loss` from ``link`` (its nftables table; none is fine)."""
        with self._lock:
            lossy = self._loss.pop(link.name, None) is not None
        if lossy:
            self._remove_loss_table(link.namespace)

    def loss_pct(self, link: HostLink) -> float:
        """The packet loss by nftables in force on ``link`` (0.0: none)."""
        return self._loss.get(link.name, 0.0)

    def dropped_packets(self, link: HostLink) -> int:
        """How many packets :meth:`packet_loss` dropped on ``link`` (both ways) since it was
        last set (0 when no loss is in force)."""
        if link.name not in self._loss:
            return 0
        result = _run(
            ["ip", "netns", "exec", link.namespace, "nft", "-j", "list", "table", "inet",
             NFT_TABLE],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise NetworkError(f"packet loss on {link.name}: nft: {_first_line(result.stderr)}")
        try:
            items = json.loads(result.stdout)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise NetworkError(f"packet loss on {link.name}: nft -j printed no JSON") from None
        dropped = 0
        for item in items:
            for expr in item.get("rule", {}).get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    dropped += int(expr["counter"].get("packets", 0))
        return dropped

    @staticmethod
    def _remove_loss_table(namespace: str) -> None:
        result = _run(
            ["ip", "netns", "exec", namespace, "nft", "-f", "-"],
            check=False,
            input_text=_nft_script(None, 0.0),
        )
        if result.returncode != 0:
            raise NetworkError(
                f"packet loss in {namespace} not removed: nft: {_first_line(result.stderr)}"
            )

    def partition(self, link: HostLink) -> None:
        """Drop every IP packet between the rig and ``link``'s namespace, silently.

        Each end's neighbour entry for the other is pinned to :data:`NOWHERE_MAC`: frames
        still cross the veth but are addressed to nobody and discarded on arrival. No
        error, no ICMP, no reset reaches either side.
        """
        self._check_open()
        _run(["ip", "neigh", "replace", link.device_ip, "lladdr", NOWHERE_MAC,
              "dev", link.host_veth, "nud", "permanent"])  # fmt: skip
        _run(["ip", "-n", link.namespace, "neigh", "replace", link.host_ip, "lladdr",
              NOWHERE_MAC, "dev", link.device_veth, "nud", "permanent"])  # fmt: skip
        with self._lock:
            self._partitioned.add(link.name)

    def heal(self, link: HostLink) -> None:
        """Undo :meth:`partition`: the ends find each other again by ARP (nothing to undo is
        fine)."""
        _run(["ip", "neigh", "del", link.device_ip, "dev", link.host_veth], check=False)
        _run(["ip", "-n", link.namespace, "neigh", "del", link.host_ip,
              "dev", link.device_veth], check=False)  # fmt: skip
        with self._lock:
            self._partitioned.discard(link.name)

    def partitioned(self, link: HostLink) -> bool:
        return link.name in self._partitioned

    # -- memory ------------------------------------------------------------------------------

    def memory_limit(self, pid: int, limit_bytes: int, *, group: str = "default") -> str | None:
        """Cap the memory of process ``pid`` at ``limit_bytes``; None if applied, else why not.

        The process is moved into cgroup ``edgeops-hil-<prefix>/<group>`` below the rig's
        own cgroup (cgroup v2 ``memory.max`` where v2 has the memory controller, else v1
        ``memory.limit_in_bytes``); calling again with the same group (a restarted program)
        reuses it. The group is removed by :meth:`close`. The reason names what refused: no
        memory controller, a read-only cgroupfs, missing delegation, a process that is gone.
        """
        if limit_bytes <= 0:
            return f"memory limit must be a positive number of bytes, got {limit_bytes}"
        if not _HOST_NAME_RE.match(group):
            return f"cgroup name {group!r} is not a plain name"
        with self._lock:
            self._check_open()
            place, reason = _memory_cgroup_place()
            if place is None:
                return reason
            run_group = place.parent / f"edgeops-hil-{self.prefix}"
            target = run_group / group
            for parent, directory in ((place.parent, run_group), (run_group, target)):
                if place.version == 2:  # a child has the controllers its parent delegates
                    failed = _delegate_memory(parent)
                    if failed is not None:
                        return failed
                if directory.is_dir():
                    continue
                try:
                    directory.mkdir()
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.EROFS:
                        return f"cannot create cgroup {directory}: cgroupfs is read-only"
                    return f"cannot create cgroup {directory}: {exc.strerror or exc}"
                self._cgroup_place = place
                self._cgroups.setdefault(str(run_group), run_group)
            failed = _write(target / place.limit_file, str(int(limit_bytes)))
            if failed is not None:
                return failed
            failed = _write(target / "cgroup.procs", str(pid))
            if failed is not None:
                if not _pid_alive(pid):
                    return f"process {pid} is gone"
                return failed
            members = (_read(target / "cgroup.procs") or "").split()
            if str(pid) not in members:
                return f"process {pid} did not stay in cgroup {target}"
        return None

    def memory_group(self, group: str = "default") -> Path | None:
        """The directory of cgroup ``group`` of this run, if :meth:`memory_limit` made it."""
        for run_group in self._cgroups.values():
            if (run_group / group).is_dir():
                return run_group / group
        return None

    # -- cleaning up -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every namespace, veth, cgroup and process of this run; safe to call twice.

        A link's packet-loss table is deleted before its namespace, so it goes even when
        something still holds the namespace open (a socket opened inside, say).

        Every step is tried even when an earlier one failed; NetworkError at the end names
        what could not be removed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
            pending = list(self._pending)
            processes = list(self._processes)
            lossy = {self._links[name].namespace for name in self._loss if name in self._links}
            self._loss.clear()
        problems: list[str] = []
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for namespace, host_veth in [(lk.namespace, lk.host_veth) for lk in links] + pending:
            try:
                self._kill_namespace_processes(namespace)
                if namespace in lossy:  # gone with the namespace, unless something holds it
                    self._remove_loss_table(namespace)
                self._remove_host(namespace, host_veth)
            except NetworkError as exc:
                problems.append(str(exc))
        self._remove_cgroups()
        self._links.clear()
        leftovers = self._leftovers()
        if leftovers:
            problems.append(f"left behind: {', '.join(leftovers)}")
        if problems:
            raise NetworkError(f"network {self.prefix} not fully removed: {'; '.join(problems)}")

    def _remove_cgroups(self) -> None:
        place = self._cgroup_place
        for run_group in self._cgroups.values():
            _remove_cgroup(run_group, place.parent if place else run_group.parent)
        self._cgroups.clear()

    def _leftovers(self) -> list[str]:
        names = [n for n in _netns_names() if n.startswith(f"{self.prefix}-")]
        names += [n for n in _link_names() if _VETH_RE.match(n) and n.startswith(self.prefix)]
        return names

    def _clean_stale(self) -> list[str]:
        """Remove what dead runs (and an earlier run with this prefix) left behind."""
        removed = []
        for name in _netns_names():
            match = _NETNS_RE.match(name)
            if match and _stale(match.group("prefix"), self.prefix):
                self._kill_namespace_processes(name)
                _run(["ip", "netns", "del", name], check=False)
                removed.append(name)
        for name in _link_names():
            match = _VETH_RE.match(name)
            if match and _stale(match.group("prefix"), self.prefix):
                _run(["ip", "link", "del", name], check=False)
                removed.append(name)
        place, _ = _memory_cgroup_place()
        if place is not None and place.parent.is_dir():
            for directory in place.parent.iterdir():
                match = _CGROUP_RE.match(directory.name)
                if match and directory.is_dir() and _stale(match.group("prefix"), self.prefix):
                    _remove_cgroup(directory, place.parent)
                    removed.append(str(directory))
        return removed

    def _check_open(self) -> None:
        if self._closed:
            raise NetworkError(f"network {self.prefix} is closed")


def _netns_names() -> list[str]:
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    result = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in result.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names
