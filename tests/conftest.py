"""Shared fixtures. Brokers and databases are real: see tests/fixtures/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.mqtt",
    "tests.fixtures.database",
    "tests.fixtures.models",
    "tests.fixtures.trust",
]

_KEEP = {"EDGEOPS_TEST_POSTGRES_URL"}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test starts from nothing: its own data dir and no EDGEOPS_* settings."""
    for name in list(os.environ):
        if name.startswith("EDGEOPS_") and name not in _KEEP:
            monkeypatch.delenv(name)
    data_dir = tmp_path / "edgeops-data"
    monkeypatch.setenv("EDGEOPS_DATA_DIR", str(data_dir))
    yield data_dir
