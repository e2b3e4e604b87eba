"""Outage (acceptance): the broker is stopped for 2 minutes while the agent processes 10,000
samples; after it returns, the hub's telemetry table holds every window exactly once.

The agent replays 10,000 digits samples at 100 per second in windows of 100 samples (100
windows). Once the first windows reached the hub, the private Mosquitto is stopped for
120 s — the agent keeps running its model and writes each window to its offline buffer —
then started again. Afterwards the table holds seqs 1..100, no gap, no duplicate, and the
windows' samples add up to 10,000. Runs once, on PostgreSQL (the production store).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_daemon_inference import (
    Hub,
    read_health,
    samples_npz,
    start_agent,
    stop_agent,
    wait_until,
    write_config,
)

SAMPLES = 10_000
WINDOW = 100
OUTAGE_S = 120.0


@pytest.mark.slow
@pytest.mark.timeout(600)  # the outage alone is 120 s
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_every_window_reaches_the_hub_exactly_once_after_a_two_minute_outage(
    mosquitto: Any,
    database: Any,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    replay = np.resize(x, (SAMPLES, x.shape[1])).astype(np.float32)
    config = write_config(
        tmp_path / "agent.toml",
        device_id="outage-1",
        mqtt_url=mosquitto.url,
        data_dir=isolated_environment,
        model_dir=int8_model_dir,
        window_samples=WINDOW,
        window_seconds=0,
        heartbeat_s=1.0,
        source={"kind": "file", "path": samples_npz(tmp_path / "x.npz", replay), "rate_hz": 100.0},
    )
    state_dir = isolated_environment / "agents" / "outage-1"
    hub = Hub(mosquitto.url, database)
    hub.start()
    agent = start_agent(config)
    try:
        wait_until(lambda: len(hub.windows("outage-1")) >= 3, timeout=120, what="first windows")
        mosquitto.stop()
        down_since = time.monotonic()
        before = read_health(state_dir).get("samples", 0)
        time.sleep(OUTAGE_S)
        assert agent.poll() is None
        during = read_health(state_dir).get("samples", 0)
        assert during - before >= 5_000, "the agent kept running its model during the outage"
        assert time.monotonic() - down_since >= OUTAGE_S
        mosquitto.start()
        wait_until(
            lambda: read_health(state_dir).get("source_exhausted"), timeout=300, what="all read"
        )
        wait_until(
            lambda: hub.telemetry.count("outage-1") >= SAMPLES // WINDOW,
            timeout=300,
            what="every window at the hub",
        )
        time.sleep(2.0)  # anything re-sent twice would arrive now; the hub must ignore it
    finally:
        code = stop_agent(agent)
        hub.stop()
    assert code == 0
    windows = hub.windows("outage-1")
    seqs = [w.seq for w in windows]
    assert seqs == list(range(1, SAMPLES // WINDOW + 1)), (len(seqs), seqs[:5], seqs[-5:])
    assert hub.telemetry.count("outage-1") == SAMPLES // WINDOW
    assert sum(w.samples for w in windows) == SAMPLES
    assert all(w.dropped_windows == 0 for w in windows)
    assert read_health(state_dir)["buffer_pending"] == 0
