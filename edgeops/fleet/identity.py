"""Device identities: enrollment, revocation, and the broker files that enforce them.

Every device logs in to the broker with its device id as user name and a password of its
own. :meth:`IdentityService.enroll` creates the device row (with the operator's tags) and a
random password, stores only its salted hash (Mosquitto's ``$7$`` PBKDF2-SHA512, see
:mod:`edgeops.broker.auth`) and hands the password out once. :meth:`~IdentityService.revoke`
marks the identity revoked. The broker learns of both from
:meth:`~IdentityService.sync_broker_files`, which writes its password and ACL files from the
database (``edgeops broker acl sync``); a SIGHUP makes Mosquitto read them again.

The hub's own service identity (user ``edgeops-hub`` by default; its bridge and its fetch
server ``<id>-fetch`` both log in with it) is not a device: its password is the one in the
hub's ``EDGEOPS_MQTT_URL``, and no device may be enrolled under its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from device_agent.link import MqttEndpoint
from device_agent.protocol import validate_device_id
from edgeops.broker.auth import (
    HUB_USER,
    BrokerAuthFiles,
    BrokerIdentity,
    hash_password,
    new_password,
    verify_password,
)
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import ConfigError, EdgeOpsError, NotFoundError, ProtocolError
from edgeops.fleet.models import Device, DeviceCredential, IdentityView
from edgeops.fleet.service import Clock

TAG_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
TAG_VALUE_MAX_LENGTH = 128
MAX_TAGS = 32


class EnrollmentError(EdgeOpsError):
    """An enrollment that cannot be made as asked (the device is enrolled already ...)."""


def parse_tags(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` as a dict; ConfigError naming the offending tag.

    Keys are 1-63 letters, digits, ``_ . -`` starting with a letter or digit; values are 1-128
    printable characters without ``,``; a key may appear once. Spaces around tags are ignored.
    """
    tags: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ConfigError(f"tags {text!r}: empty tag (expected key=value,key=value)")
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"tag {item!r} is not key=value")
        if key in tags:
            raise ConfigError(f"tag key {key!r} is given twice")
        tags[key] = value
    return validate_tags(tags)


def validate_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` if every key and value is acceptable (see :func:`parse_tags`)."""
    if len(tags) > MAX_TAGS:
        raise ConfigError(f"{len(tags)} tags given, at most {MAX_TAGS} are allowed")
    for key, value in tags.items():
        if not key:
            raise ConfigError(f"tag {key}={value!r} has an empty key")
        if not TAG_KEY_PATTERN.fullmatch(key):
            raise ConfigError(
                f"tag key {key!r} is invalid: expected 1-63 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tag {key!r} has an empty value")
        if len(value) > TAG_VALUE_MAX_LENGTH or "," in value or not value.isprintable():
            raise ConfigError(
                f"tag {key!r}: value {value[:40]!r} must be at most {TAG_VALUE_MAX_LENGTH} "
                "printable characters without ','"
            )
    return dict(tags)


def is_reserved_name(device_id: str, hub_user: str = HUB_USER) -> bool:
    """True for the hub's user names (``edgeops-hub``, ``edgeops-hub-fetch`` ...)."""
    lowered = device_id.lower()
    return any(
        lowered == user.lower() or lowered.startswith(user.lower() + "-")
        for user in {HUB_USER, hub_user}
    )


@dataclass(frozen=True)
class Enrollment:
    """A new identity. ``password`` is shown once: the hub keeps only its hash."""

    device: IdentityView
    password: str = field(repr=False)

    def agent_url(self, broker_url: str) -> str:
        """The agent's ``mqtt_url``: ``broker_url`` with this device's user and password."""
        endpoint = MqttEndpoint.parse(broker_url)
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        scheme = "mqtts" if endpoint.tls else "mqtt"
        return f"{scheme}://{self.device.device_id}:{self.password}@{host}:{endpoint.port}"

    def to_dict(self, broker_url: str) -> dict[str, Any]:
        """JSON-ready, password included (for the enrolling operator only)."""
        return {
            **self.device.to_dict(),
            "username": self.device.device_id,
            "password": self.password,
            "agent_config": {
                "device_id": self.device.device_id,
                "mqtt_url": self.agent_url(broker_url),
            },
        }


@dataclass(frozen=True)
class SyncResult:
    """What :meth:`IdentityService.sync_broker_files` wrote."""

    files: BrokerAuthFiles
    hub_user: str
    devices: list[str]
    revoked: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "password_file": str(self.files.password_file),
            "acl_file": str(self.files.acl_file),
            "hub_user": self.hub_user,
            "devices": self.devices,
            "revoked": self.revoked,
        }


class IdentityService:
    """Enrolls and revokes device identities and writes the broker's files from them."""

    def __init__(self, db: Database, *, clock: Clock = utcnow, hub_user: str = HUB_USER) -> None:
        self._db = db
        self._clock = clock
        self.hub_user = hub_user

    def enroll(self, device_id: str, tags: Mapping[str, str] | None = None) -> Enrollment:
        """Create ``device_id``'s identity (and its device row, with ``tags``).

        A device already known from its reports keeps its row and gets the tags. An active
        identity of the same name is refused (EnrollmentError); a revoked one is replaced by
        the new identity. Invalid names and tags raise ConfigError.
        """
        device_id = self._check_name(device_id)
        tag_values = validate_tags(tags or {})
        password = new_password()
        now = self._clock()
        with self._db.session() as session:
            device_insert = _insert(session, Device).values(
                device_id=device_id, tags=tag_values, created_at=now, updated_at=now
            )
            session.exec(
                device_insert.on_conflict_do_update(
                    index_elements=[col(Device.device_id)],
                    set_={"tags": device_insert.excluded.tags, "updated_at": now},
                )
            )
            credential_insert = _insert(session, DeviceCredential).values(
                device_id=device_id,
                password_hash=hash_password(password),
                enrolled_at=now,
                revoked_at=None,
            )
            replaced = session.exec(
                credential_insert.on_conflict_do_update(
                    index_elements=[col(DeviceCredential.device_id)],
                    set_={
                        "password_hash": credential_insert.excluded.password_hash,
                        "enrolled_at": credential_insert.excluded.enrolled_at,
                        "revoked_at": None,
                    },
                    where=col(DeviceCredential.revoked_at).is_not(None),
                ).returning(col(DeviceCredential.device_id))
            ).first()
            if replaced is None:
                credential = session.get(DeviceCredential, device_id)
                since = credential.enrolled_at.isoformat() if credential else "before"
                raise EnrollmentError(
                    f"device {device_id!r} is already enrolled (since {since}); "
                    f"revoke it first (`edgeops devices revoke {device_id}`) to enroll it again"
                )
        return Enrollment(self.get_identity(device_id), password)

    def revoke(self, device_id: str) -> tuple[IdentityView, bool]:
        """Revoke ``device_id``'s identity; the flag is False if it was revoked already.

        NotFoundError if the device has no identity. The broker keeps accepting the device
        until its files are synced and it has reloaded them.
        """
        now = self._clock()
        with self._db.session() as session:
            revoked = session.exec(
                sa.update(DeviceCredential)
                .where(
                    col(DeviceCredential.device_id) == device_id,
                    col(DeviceCredential.revoked_at).is_(None),
                )
                .values(revoked_at=now)
                .returning(col(DeviceCredential.device_id))
            ).first()
        view = self.get_identity(device_id)
        if view.identity == "none":
            raise NotFoundError(f"device {device_id!r} has no identity to revoke")
        return view, revoked is not None

    def get_identity(self, device_id: str) -> IdentityView:
        """The device and its identity; NotFoundError if the hub does not know the device."""
        with self._db.session() as session:
            device = session.get(Device, device_id)
            if device is None:
                raise NotFoundError(f"device {device_id!r} not found")
            return IdentityView.from_rows(device, session.get(DeviceCredential, device_id))

    def list_identities(self) -> list[IdentityView]:
        """Every known device with the state of its identity, sorted by device id."""
        query = select(Device, DeviceCredential).join(
            DeviceCredential,
            col(DeviceCredential.device_id) == col(Device.device_id),
            isouter=True,
        )
        with self._db.session() as session:
            views = [IdentityView.from_rows(d, c) for d, c in session.exec(query).all()]
        return sorted(views, key=lambda view: view.device_id)

    def list_version(self) -> tuple[Any, ...]:
        """A cheap fingerprint of what :meth:`list_summaries` shows: the row counts and the
        newest change times of the devices and their credentials (two aggregate queries).
        Every write of a device row sets its ``updated_at``, so an unchanged fingerprint
        means an unchanged list, except for a transaction that commits after a newer one
        (callers bound how long they trust it)."""
        devices = sa.select(
            sa.func.count(),
            sa.func.max(col(Device.updated_at)),
            sa.func.sum(col(Device.desired_version)),
        )
        credentials = sa.select(
            sa.func.count(),
            sa.func.max(col(DeviceCredential.enrolled_at)),
            sa.func.count(col(DeviceCredential.revoked_at)),
            sa.func.max(col(DeviceCredential.revoked_at)),
        )
        with self._db.session() as session:
            return (*session.execute(devices).one(), *session.execute(credentials).one())

    def list_summaries(self) -> list[dict[str, Any]]:
        """Every known device as the fleet list shows it, sorted by device id, JSON-ready.

        One query that reads only what the list shows (of the reported twin: its slots and
        update state; of the desired one: the release), so a fleet of thousands lists in
        milliseconds: ``device_id``, ``identity`` (active, revoked, none), ``tags``,
        ``online``, ``last_seen``, ``agent_version``, ``hardware``, ``update_state``,
        ``desired_release`` (target), ``desired_version``, ``active_release`` and
        ``active_model`` (the target and model id of the slot the device runs),
        ``enrolled_at``, ``revoked_at``; times as ISO 8601 strings in UTC.
        """
        from edgeops.fleet.desired import active_release

        query = sa.select(
            col(Device.device_id),
            col(Device.online),
            col(Device.last_seen),
            col(Device.agent_version),
            col(Device.hardware),
            col(Device.tags),
            col(Device.update_state),
            col(Device.desired_version),
            col(Device.desired)["release"],
            col(Device.reported)["slots"],
            col(Device.reported)["update_state"],
            col(DeviceCredential.enrolled_at),
            col(DeviceCredential.revoked_at),
        ).join(
            DeviceCredential,
            col(DeviceCredential.device_id) == col(Device.device_id),
            isouter=True,
        )
        with self._db.session() as session:
            rows = session.execute(query).all()
        summaries: list[dict[str, Any]] = []
        for (
            device_id,
            online,
            last_seen,
            agent_version,
            hardware,
            tags,
            update_state,
            desired_version,
            release,
            slots,
            reported_state,
            enrolled_at,
            revoked_at,
        ) in rows:
            target, model_id = active_release({"slots": slots})
            if enrolled_at is None:
                identity = "none"
            else:
                identity = "active" if revoked_at is None else "revoked"
            summaries.append(
                {
                    "device_id": device_id,
                    "identity": identity,
                    "tags": tags or {},
                    "online": bool(online),
                    "last_seen": _iso(last_seen),
                    "agent_version": agent_version,
                    "hardware": hardware or {},
                    "update_state": update_state
                    or (
                        reported_state
                        if isinstance(reported_state, str) and reported_state
                        else None
                    ),
                    "desired_release": release.get("target") if isinstance(release, dict) else None,
                    "desired_version": desired_version,
                    "active_release": target,
                    "active_model": model_id,
                    "enrolled_at": _iso(enrolled_at),
                    "revoked_at": _iso(revoked_at),
                }
            )
        summaries.sort(key=lambda summary: summary["device_id"])
        return summaries

    def broker_identities(self) -> tuple[list[BrokerIdentity], list[str]]:
        """The active identities as broker users, and the names of the revoked ones."""
        with self._db.session() as session:
            rows = session.exec(select(DeviceCredential)).all()
            active = [
                BrokerIdentity(row.device_id, row.password_hash)
                for row in rows
                if row.revoked_at is None
            ]
            revoked = sorted(row.device_id for row in rows if row.revoked_at is not None)
        return sorted(active, key=lambda identity: identity.user), revoked

    def sync_broker_files(self, files: BrokerAuthFiles, hub_password: str) -> SyncResult:
        """Write the broker's password and ACL files from the database.

        The hub's identity is ``hub_user`` with ``hub_password``; its hash in the current
        password file is kept if it still matches, so syncing twice writes the same files.
        """
        if not hub_password:
            raise ConfigError(f"the hub's broker identity {self.hub_user!r} has no password")
        devices, revoked = self.broker_identities()
        hub_hash = files.read_password_hashes().get(self.hub_user)
        if hub_hash is None or not verify_password(hub_password, hub_hash):
            hub_hash = hash_password(hub_password)
        files.write(BrokerIdentity(self.hub_user, hub_hash), devices)
        return SyncResult(files, self.hub_user, [d.user for d in devices], revoked)

    def _check_name(self, device_id: str) -> str:
        try:
            validate_device_id(device_id)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if is_reserved_name(device_id, self.hub_user):
            raise ConfigError(
                f"device id {device_id!r} is reserved for the hub's own broker identity "
                f"({self.hub_user!r} and names starting with {self.hub_user + '-'!r})"
            )
        return device_id


def hub_credentials(mqtt_url: str | None) -> tuple[str, str]:
    """The hub's broker user and password from its ``EDGEOPS_MQTT_URL``; ConfigError if none."""
    endpoint = MqttEndpoint.parse(mqtt_url) if mqtt_url else None
    if endpoint is None or not endpoint.username or not endpoint.password:
        raise ConfigError(
            "the hub's broker identity is not configured: set EDGEOPS_MQTT_URL (or mqtt_url in "
            f"edgeops.toml) to mqtt://{HUB_USER}:<password>@<host>:<port>; "
            "the sync writes that user and password into the broker's password file"
        )
    return endpoint.username, endpoint.password


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _insert(
    session: Session, table: type[Device] | type[DeviceCredential]
) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``table`` in the dialect of ``session``, which knows ON CONFLICT."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


__all__ = [
    "Enrollment",
    "EnrollmentError",
    "IdentityService",
    "SyncResult",
    "hub_credentials",
    "is_reserved_name",
    "parse_tags",
    "validate_tags",
]
