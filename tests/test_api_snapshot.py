"""The shared response body of GET /api/v1/devices: kept for its max age, refreshed by one
request while the others get the previous bytes, invalidated by the API's own writes."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from edgeops.api import create_app
from edgeops.api.context import ApiContext
from edgeops.api.snapshot import Snapshot
from edgeops.config import Settings
from edgeops.db import Database


def test_a_body_is_kept_until_it_is_old_then_made_again() -> None:
    made: list[int] = []

    def compute() -> bytes:
        made.append(1)
        return f"body {len(made)}".encode()

    snapshot = Snapshot(compute, check_s=3600)
    first = snapshot.get()
    assert first.data == b"body 1" and snapshot.get() is first and len(made) == 1
    snapshot.check_s = 0.0
    assert snapshot.get().data == b"body 2"
    snapshot.invalidate()
    assert snapshot.get().data == b"body 3"
    latest = snapshot.get()
    assert first.etag != latest.etag and gzip.decompress(latest.gzipped) == latest.data


def test_a_body_is_made_again_when_its_version_changes_or_it_is_too_old() -> None:
    made: list[int] = []
    version = [1]

    def compute() -> bytes:
        made.append(1)
        return f"body {len(made)}".encode()

    snapshot = Snapshot(compute, lambda: version[0], check_s=0.0, max_age_s=3600)
    assert snapshot.get().data == b"body 1"
    assert [snapshot.get().data for _ in range(3)] == [b"body 1"] * 3  # checked, unchanged
    version[0] = 2
    assert snapshot.get().data == b"body 2"
    snapshot.max_age_s = 0.0  # a change the version cannot see is bounded by the age
    assert snapshot.get().data == b"body 3" and len(made) == 3


def test_while_one_request_refreshes_the_others_get_the_previous_body() -> None:
    release = threading.Event()
    started = threading.Event()
    calls = 0

    def compute() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            started.set()
            assert release.wait(10)
        return f"body {calls}".encode()

    snapshot = Snapshot(compute, check_s=3600)
    assert snapshot.get().data == b"body 1"
    snapshot.check_s = 0.0
    answers: list[bytes] = []
    refresher = threading.Thread(target=lambda: answers.append(snapshot.get().data))
    refresher.start()
    assert started.wait(10)
    assert snapshot.get().data == b"body 1"  # not blocked behind the refresh
    release.set()
    refresher.join(10)
    assert answers == [b"body 2"] and calls == 2


def test_a_body_made_before_an_invalidation_is_not_kept() -> None:
    snapshot: Snapshot
    calls = 0

    def compute() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            snapshot.invalidate()  # a write lands while the list is being made
        return f"body {calls}".encode()

    snapshot = Snapshot(compute, check_s=3600)
    assert snapshot.get().data == b"body 1"
    assert snapshot.get().data == b"body 2"  # made again, not the pre-write body


def test_the_device_list_has_an_etag_and_shows_an_enrollment_at_once(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        context = ApiContext(Settings(data_dir=tmp_path), database)
        client = TestClient(create_app(context))
        token = context.tokens.create("ops", "operator")[1]
        auth = {"Authorization": f"Bearer {token}"}
        first = client.get("/api/v1/devices", headers=auth)
        assert first.status_code == 200 and first.json() == []
        etag = first.headers["etag"]
        again = client.get("/api/v1/devices", headers=auth | {"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        enrolled = client.post("/api/v1/devices", headers=auth, json={"device_id": "dev-1"})
        assert enrolled.status_code == 201, enrolled.text
        listed = client.get("/api/v1/devices", headers=auth | {"If-None-Match": etag})
        assert listed.status_code == 200
        assert [d["device_id"] for d in listed.json()] == ["dev-1"]
        assert listed.headers["etag"] != etag
        unauthenticated = client.get("/api/v1/devices", headers={"If-None-Match": etag})
        assert unauthenticated.status_code == 401
    finally:
        database.dispose()
