"""Column types that behave the same on SQLite and PostgreSQL.

Table modules use these instead of the bare SQLAlchemy types:

* :class:`UTCDateTime` stores an aware datetime (``timestamptz`` on PostgreSQL, ISO text in
  UTC on SQLite) and always gives back an aware UTC datetime. A naive datetime is refused,
  because nobody can tell later which clock it came from.
* :data:`JSONDocument` is ``JSON`` on SQLite and ``JSONB`` on PostgreSQL. Assign a new dict
  to change it; in-place mutation is not tracked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

__all__ = ["JSONDocument", "UTCDateTime", "utcnow"]


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware datetime, stored in UTC, returned as an aware UTC datetime."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"datetime {value.isoformat()} has no time zone; use an aware one")
        value = value.astimezone(UTC)
        # SQLite's DATETIME text format has no offset: store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDocument: sa.types.TypeEngine[Any] = sa.JSON().with_variant(JSONB(), "postgresql")
"""A JSON object column: ``JSON`` in general, ``JSONB`` on PostgreSQL."""
