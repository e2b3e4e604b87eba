"""The API's table: ``api_tokens``, one row per token (its hash, never the token).

Written by :class:`edgeops.api.tokens.TokenService` only.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from edgeops.db.types import UTCDateTime, utcnow

__all__ = ["ApiTokenRecord"]


class ApiTokenRecord(SQLModel, table=True):
    """An API token: who holds it, its role and the SHA-256 of the secret."""

    __tablename__ = "api_tokens"

    id: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=63)
    role: str = Field(max_length=16)
    secret_sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
