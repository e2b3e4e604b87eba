"""API tokens: made by ``edgeops tokens create --role R``, kept hashed, checked in constant time.

A token reads ``eo_<id>_<secret>``: ``id`` (12 hex digits) finds the row, ``secret`` (43
URL-safe characters, 256 random bits) is compared by its SHA-256 with
:func:`hmac.compare_digest`. The hub stores only the hash: a token is shown once, at creation.
A plain hash (no salt, no slow KDF) is enough because the secret is random and long; the
slow hashes exist for guessable passwords. Device credentials (the broker's per-device
passwords) live elsewhere and are never accepted here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import col, select

from edgeops.api.auth import Principal, Role
from edgeops.api.models import ApiTokenRecord
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import ConfigError, NotFoundError

TOKEN_PREFIX = "eo_"  # noqa: S105 (a prefix, not a secret)
_TOKEN = re.compile(r"^eo_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
REMEMBER_S = 1.0
"""how long a token found good is trusted without reading the database again"""
MAX_REMEMBERED = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$")


class TokenError(ConfigError):
    """A token cannot be made as asked (bad role or name): a usage error (CLI exit code 2,
    API 400)."""


@dataclass(frozen=True)
class TokenView:
    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, record: ApiTokenRecord) -> TokenView:
        return cls(
            record.id,
            record.name,
            Role(record.role),
            record.created_at,
            record.revoked_at,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenService:
    """Creates, lists, revokes and checks API tokens; one transaction each. Thread-safe: one
    service answers every request thread of the hub."""

    def __init__(self, database: Database, *, remember_s: float = REMEMBER_S) -> None:
        self._db = database
        self.remember_s = remember_s
        self._known: dict[tuple[str, str], tuple[Principal, float]] = {}
        self._lock = threading.Lock()  # guards _known and _revocations
        # counts the starts and ends of revocations: a lookup that sees it change while it
        # reads the database remembers nothing, as the row it read may predate the revocation
        self._revocations = 0

    def create(self, name: str, role: str) -> tuple[TokenView, str]:
        """A new token: its view and the token itself (shown once, never stored)."""
        try:
            chosen = Role(role)
        except ValueError:
            raise TokenError(
                f"unknown role {role!r}: choose one of {', '.join(r.value for r in Role)}"
            ) from None
        if not _NAME.fullmatch(name):
            raise TokenError(
                f"token name {name!r} must be 1-63 letters, digits or ._@- "
                "(starting with a letter or digit)"
            )
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = ApiTokenRecord(
            id=token_id, name=name, role=chosen.value, secret_sha256=_digest(secret)
        )
        with self._db.session() as session:
            session.add(record)
            session.flush()
            view = TokenView.of(record)
        return view, f"{TOKEN_PREFIX}{token_id}_{secret}"

    def list(self) -> list[TokenView]:
        with self._db.session() as session:
            records = session.exec(select(ApiTokenRecord).order_by(col(ApiTokenRecord.created_at)))
            return [TokenView.of(r) for r in records]

    def revoke(self, token_id: str) -> TokenView:
        """Revoke ``token_id`` (NotFoundError if there is none); revoking twice is harmless."""
        with self._lock:  # lookups from now on may read the row before the commit below
            self._revocations += 1
        with self._db.session() as session:
            record = session.get(ApiTokenRecord, token_id)
            if record is None:
                raise NotFoundError(f"no API token {token_id!r}")
            if record.revoked_at is None:
                record.revoked_at = utcnow()
                session.add(record)
                session.flush()
            view = TokenView.of(record)
        with self._lock:  # after the commit
            self._revocations += 1
            for key in [key for key in self._known if key[0] == token_id]:
                del self._known[key]
        return view

    def authenticate(self, token: str) -> Principal | None:
        """The holder of ``token``, or None if it is malformed, unknown, revoked or wrong.
        The comparison of the secret takes the same time whatever it holds.

        A token found good is remembered for ``remember_s`` (1 s), keyed by its hash, so a
        client sending many requests costs one lookup a second. A revocation through this
        service (the hub's ``DELETE /api/v1/tokens/{id}``) takes effect at once in this
        process: it empties the token's entry, and a lookup that was already under way when
        the revocation began does not remember what it read. A revocation made by another
        process (``edgeops tokens revoke`` beside a running hub) takes effect here within
        ``remember_s``.
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        digest = _digest(secret)
        key = (token_id, digest)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(key)
            generation = self._revocations
        if known is not None and known[1] > now:
            return known[0]
        with self._db.session() as session:
            record = session.get(ApiTokenRecord, token_id)
            expected = record.secret_sha256 if record is not None else _digest("")
            good = hmac.compare_digest(digest, expected)
            if record is None or not good or record.revoked_at is not None:
                principal = None
            else:
                principal = Principal(record.id, record.name, Role(record.role))
        with self._lock:
            if principal is None:
                self._known.pop(key, None)
            elif generation == self._revocations:  # no revocation began meanwhile
                if len(self._known) >= MAX_REMEMBERED:
                    self._known.clear()
                self._known[key] = (principal, now + self.remember_s)
        return principal
