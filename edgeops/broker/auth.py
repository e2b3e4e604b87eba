"""Mosquitto's password and ACL files, as the hub writes them for its broker identities.

Mosquitto 2.0 reads both files at start and again on SIGHUP (``password_file`` and
``acl_file`` in ``deploy/mosquitto/secure.conf``). On a reload it also checks every connected
client against the new password file and disconnects those whose user is gone, so a revoked
device is cut off as soon as the broker has reloaded.

* The password file holds one ``user:$7$iterations$salt$hash`` line per identity: PBKDF2 with
  HMAC-SHA512, a 12-byte random salt and a 64-byte digest, base64-encoded, exactly what
  ``mosquitto_passwd`` writes (checked against it in tests/test_identity.py). The iteration
  count is mosquitto_passwd's default, 101: the passwords the hub hands out are 192-bit random
  tokens, which no amount of stretching makes harder to guess, and the broker hashes on every
  connect (1,000 devices reconnecting at once).
* The ACL file gives every authenticated user, through ``pattern`` lines with ``%u`` (the
  user name, which is the device id), only its own device subtree: write on the channels a
  device publishes, read on those it receives (:data:`DEVICE_PUBLISHES`,
  :data:`DEVICE_RECEIVES`). The hub's service identity gets the whole device tree. Nothing
  else is granted to anyone: Mosquitto denies what no line allows.

Both files are replaced atomically (:func:`device_agent.fsio.atomic_write_bytes`), so a broker
reloading at the same moment reads the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from device_agent.fsio import atomic_write_bytes
from device_agent.protocol import TOPIC_PREFIX, Channel, validate_device_id
from edgeops.errors import BrokerError, ConfigError, ProtocolError

HASH_ID = "7"
"""Mosquitto's identifier of PBKDF2-SHA512 password hashes (``$7$``)."""
ITERATIONS = 101
"""mosquitto_passwd's default iteration count (see the module docstring)."""
SALT_BYTES = 12
DIGEST_BYTES = 64

HUB_USER = "edgeops-hub"
"""The default user name of the hub's service identity (its fetch server shares it)."""

DEVICE_PUBLISHES: tuple[Channel, ...] = (
    Channel.STATE,
    Channel.PRESENCE,
    Channel.EVENTS,
    Channel.TELEMETRY,
    Channel.FETCH_REQ,
)
"""The channels a device may publish to, in its own subtree only."""
DEVICE_RECEIVES: tuple[Channel, ...] = (Channel.DESIRED, Channel.CMD, Channel.FETCH_RES)
"""The channels a device may receive, in its own subtree only."""

PASSWORD_FILE_MODE = 0o640
"""Hashes only, yet nobody but the broker (group) and the hub (owner) needs to read them."""
ACL_FILE_MODE = 0o644


def new_password() -> str:
    """A random password: 192 bits, URL-safe, so it fits in ``mqtt://user:password@host``."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """``$7$iterations$salt$digest`` of ``password``, as Mosquitto 2.0 reads it."""
    if not password:
        raise ValueError("the password is empty")
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, DIGEST_BYTES)
    encoded_salt = base64.b64encode(salt).decode()
    return f"${HASH_ID}${iterations}${encoded_salt}${base64.b64encode(digest).decode()}"


def verify_password(password: str, password_hash: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash; False for any other hash or garbage."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != HASH_ID or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        return False
    iterations = int(parts[2])
    if not 0 < iterations <= 10_000_000 or not expected:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True)
class BrokerIdentity:
    """A user of the broker: its name and the ``$7$`` hash of its password."""

    user: str
    password_hash: str


@dataclass(frozen=True)
class BrokerAuthFiles:
    """Where the password and ACL files of the broker live."""

    password_file: Path
    acl_file: Path

    def read_password_hashes(self) -> dict[str, str]:
        """The current password file as user -> hash; empty if it does not exist yet."""
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BrokerError(f"password file {self.password_file} cannot be read: {exc}") from exc
        hashes = {}
        for line in text.splitlines():
            user, sep, password_hash = line.partition(":")
            if sep and user and not line.startswith("#"):
                hashes[user] = password_hash
        return hashes

    def write(self, hub: BrokerIdentity, devices: Iterable[BrokerIdentity]) -> None:
        """Replace both files: ``hub`` may use every device's subtree, ``devices`` their own."""
        device_list = sorted(devices, key=lambda identity: identity.user)
        _check_users(hub, device_list)
        # the ACL first: a broker reloading between the two writes then sees new users with
        # the old rules, which grant a device nothing outside its own subtree either way
        atomic_write_bytes(self.acl_file, render_acl_file(hub.user).encode(), mode=ACL_FILE_MODE)
        atomic_write_bytes(
            self.password_file,
            render_password_file([hub, *device_list]).encode(),
            mode=PASSWORD_FILE_MODE,
        )


def render_password_file(identities: Iterable[BrokerIdentity]) -> str:
    """The password file text: ``user:hash`` lines (Mosquitto 2.0 allows no comments here)."""
    return "".join(f"{identity.user}:{identity.password_hash}\n" for identity in identities)


def render_acl_file(hub_user: str) -> str:
    """The ACL file text: every device its own subtree, ``hub_user`` all of them."""
    lines = [
        "# EdgeOps broker ACL, written by `edgeops broker acl sync` from the hub's database.",
        "# Do not edit: the next sync replaces this file. What no line allows is denied.",
        "#",
        "# Every device logs in with its device id as user name (%u) and may publish only to",
        "# these channels of its own subtree:",
        *(f"pattern write {TOPIC_PREFIX}/%u/{channel.value}" for channel in DEVICE_PUBLISHES),
        "# ... and receive only these:",
        *(f"pattern read {TOPIC_PREFIX}/%u/{channel.value}" for channel in DEVICE_RECEIVES),
        "#",
        "# The hub's service identity (its bridge and its fetch server) serves every device.",
        f"user {hub_user}",
        f"topic readwrite {TOPIC_PREFIX}/#",
    ]
    return "\n".join(lines) + "\n"


def _check_users(hub: BrokerIdentity, devices: list[BrokerIdentity]) -> None:
    for identity in [hub, *devices]:
        try:
            validate_device_id(identity.user)  # also the rule for a safe broker user name
        except ProtocolError as exc:
            raise ConfigError(f"broker user name {identity.user!r} is not usable: {exc}") from None
        if not identity.password_hash.startswith(f"${HASH_ID}$"):
            raise ConfigError(f"broker user {identity.user!r} has no ${HASH_ID}$ password hash")
    names = [identity.user for identity in devices]
    if hub.user in names:
        raise ConfigError(f"a device is enrolled under the hub's own user name {hub.user!r}")
    if len(set(names)) != len(names):
        raise ConfigError("two broker identities share one user name")


def reload_broker(pid_file: Path) -> int:
    """Send SIGHUP to the broker whose pid ``pid_file`` holds; returns that pid."""
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise BrokerError(f"broker pid file {pid_file} cannot be read: {exc}") from exc
    if not text.isdigit() or int(text) <= 1:
        raise BrokerError(f"broker pid file {pid_file} holds no process id: {text[:40]!r}")
    pid = int(text)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BrokerError(f"no broker runs with pid {pid} (from {pid_file})") from None
    except PermissionError:
        raise BrokerError(
            f"not allowed to signal the broker (pid {pid} from {pid_file}); "
            "run the sync as the broker's user or reload it with `systemctl reload mosquitto`"
        ) from None
    return pid
