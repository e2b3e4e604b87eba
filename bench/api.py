"""API latency of issue 9: p99 of ``GET /api/v1/devices`` with 1,000 devices registered, at
200 requests/s from an open-loop load generator, beside the trivial ``GET /api/v1/health``
under the same load in the same run. Goal: p99 under 50 ms.

Setup, all real and on this machine, fresh for every run:

- a hub database: SQLite in a temporary data dir (default), or with ``--db postgresql`` a
  scratch database created on the local PostgreSQL (``EDGEOPS_TEST_POSTGRES_URL``, default
  ``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth) and dropped afterwards;
  migrated as ``edgeops`` does;
- ``--devices`` devices (1,000) recorded through :class:`edgeops.fleet.FleetService` as the
  hub's MQTT bridge stores them: a retained state report (agent version, hardware tags,
  slots with an active release and model) and an online/offline presence each; a viewer
  token from :class:`edgeops.api.tokens.TokenService`;
- the hub's API (``create_app(ApiContext(...))``, the app ``edgeops hub serve`` runs) under
  uvicorn as that command runs it (one process, asyncio, h11), with the access log off, on a
  free 127.0.0.1 port, in a child process of its own, so the load generator does not share
  its interpreter (and GIL).

Load: open loop. Request ``i`` of a phase is due at ``start + i / rate`` and is sent then,
whether or not earlier ones were answered, on one of a pool of keep-alive HTTP/1.1
connections (a new connection is opened when none is idle, up to 256; beyond that a due
request waits for a free one, and the wait counts). Latency runs from the due time
to the last byte of the answer, so time spent waiting behind a slow server counts
(no coordinated omission). A phase runs ``--seconds`` at ``--rate`` after a short warm-up
(not counted): first ``GET /api/v1/health`` (the baseline: HTTP, routing and the event loop
alone), then ``GET /api/v1/devices`` with the viewer token. For each: p50, p90, p99 and
max latency, achieved rate, errors (non-200 answers, broken connections, and requests still
unanswered 15 s after the phase's last was due; a percentile that falls on one of those is
reported as "no answer"). Before the phases, each path is also asked one request at a time
for 3 s on one connection: the unloaded time of one request, and the rate that allows.

The route serves a body shared by the requests until the devices change
(:mod:`edgeops.api.snapshot`: a cheap version query at most every 0.2 s, the list made
again by one request while the others get the previous bytes, and at least every 10 s).
This fleet does not change during the phases, so the list is made again every 10 s.
If ``GET /devices`` misses the goal (or with ``--profile``), the cost of one request is
broken down in this process on the same database: the token check, making the list
afresh, and serving the shared body, with a cProfile of making the list.

Results go to bench/results/api.json and api.md (written atomically).

    python bench/api.py [--db sqlite|postgresql] [--devices 1000] [--rate 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _postgres import postgres_database
from _results import run_meta, targets_table, write_and_report

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_P99_MS = 50.0
WARMUP_S = 2.0
MAX_CONNECTIONS = 256
"""the load generator's connections at most; more requests due wait for one (and the wait
counts in their latency)"""
SEQUENTIAL_S = 3.0
"""before the phases: one request at a time for this long on each path (unloaded)"""
IDLE_S = 4.0
"""a keep-alive connection idle for longer is not reused (uvicorn closes them after 5 s)"""
DRAIN_S = 15.0
"""how long requests still in flight at the end of a phase are waited for"""
ARCHES = ["x86_64", "aarch64", "armv7l"]
TTY = sys.stdout.isatty()


# -- the hub's database ----------------------------------------------------------------------------


def populate(url: str, devices: int) -> str:
    """Migrate the database at ``url``, record ``devices`` devices as the bridge would, and
    make a viewer token; the token."""
    from device_agent.protocol import Presence, StateReport
    from edgeops.api.tokens import TokenService
    from edgeops.db import Database
    from edgeops.fleet import FleetService

    database = Database(url)
    try:
        database.upgrade()
        fleet = FleetService(database)
        now = time.time()
        for i in range(devices):
            device_id = f"bench-dev-{i:05d}"
            target = f"models/digits-mlp-{1 + i % 2}/model.tflite"
            fleet.record_state(
                StateReport(
                    device_id=device_id,
                    agent_version="0.1.0",
                    hardware={"arch": ARCHES[i % len(ARCHES)], "board": "bench"},
                    slots={
                        "active": "a",
                        "a": {"target": target, "model_id": f"m-{i % 2}", "version": 1 + i % 2},
                        "b": {"target": None},
                    },
                    update_state="committed",
                    health="ok",
                    free_memory_bytes=64 * 1024 * 1024,
                    ts=now - 60,
                )
            )
            fleet.record_presence(Presence(device_id=device_id, online=i % 10 != 0, ts=now - 30))
        return TokenService(database).create("bench-viewer", "viewer")[1]
    finally:
        database.dispose()


# -- the server (child process) -----------------------------------------------------------------


def serve(data_dir: Path, url: str, port: int) -> None:
    """Run the hub's API on 127.0.0.1:``port`` until terminated (the child process)."""
    import uvicorn

    from edgeops.api import create_app
    from edgeops.api.context import ApiContext
    from edgeops.config import Settings
    from edgeops.db import Database

    settings = Settings(data_dir=data_dir, database_url=url)
    database = Database(settings.database)
    app = create_app(ApiContext(settings, database))
    uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    ).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(data_dir: Path, url: str) -> Iterator[int]:
    """The API in a child process; its port once it answers ``/api/v1/health``."""
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(data_dir), url, str(port)]
    child = subprocess.Popen(command, env={**os.environ, "EDGEOPS_DATA_DIR": str(data_dir)})
    try:
        deadline = time.monotonic() + 60
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the API server exited with {child.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the API server did not answer within 60 s") from None
                time.sleep(0.1)
        yield port
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# -- the load generator ----------------------------------------------------------------------------


class StaleConnectionError(ConnectionError):
    """The server had closed the connection: the request was not answered."""


class Connection:
    """One keep-alive HTTP/1.1 connection: a GET, its answer's status and body length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def get(self, request: bytes) -> tuple[int, int]:
        self.writer.write(request)
        status_line = await self.reader.readline()
        if not status_line:
            raise StaleConnectionError("connection closed by the server before answering")
        status = int(status_line.split()[1])
        length: int | None = None
        chunked = False
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and "close" in value.lower():
                close = True
        size = 0
        if chunked:
            while True:
                chunk = int((await self.reader.readline()).split(b";")[0], 16)
                if chunk:
                    size += len(await self.reader.readexactly(chunk))
                await self.reader.readline()
                if not chunk:
                    break
        elif length is not None:
            size = len(await self.reader.readexactly(length))
        if close:
            raise ConnectionResetError("the server closed the connection")
        return status, size

    def close(self) -> None:
        self.writer.close()


class Phase:
    """One open-loop phase: ``rate`` GETs a second of one path for ``seconds``."""

    def __init__(
        self, port: int, path: str, token: str | None, rate: float, seconds: float, label: str
    ) -> None:
        # as common HTTP clients do (requests, httpx, browsers, curl --compressed)
        headers = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept-Encoding: gzip, deflate\r\n"
        )
        if token:
            headers += f"Authorization: Bearer {token}\r\n"
        self.request = (headers + "\r\n").encode()
        self.port = port
        self.rate = rate
        self.seconds = seconds
        self.label = label
        self.idle: list[Connection] = []
        self.opened = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.bytes = 0
        self.in_flight = 0
        self.unanswered = 0
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    def take_idle(self) -> Connection | None:
        """The most recently used idle connection; those idle for longer than the server
        keeps them (uvicorn: 5 s) are closed and dropped."""
        while self.idle:
            connection = self.idle.pop()
            if time.monotonic() - connection.last_used < IDLE_S:
                return connection
            connection.close()
        return None

    async def new_connection(self) -> Connection:
        self.opened += 1
        return await Connection.open(self.port)

    async def one(self, due: float, record: bool) -> None:
        self.in_flight += 1
        connection: Connection | None = None
        await self.slots.acquire()  # at most MAX_CONNECTIONS requests on the wire
        try:
            reused = self.take_idle()
            connection = reused or await self.new_connection()
            try:
                status, size = await connection.get(self.request)
            except (StaleConnectionError, ConnectionResetError, BrokenPipeError):
                if reused is None:
                    raise
                # the server closed a keep-alive connection that sat idle, before this
                # request reached it: send it again on a new one, as HTTP clients do
                connection.close()
                connection = await self.new_connection()
                status, size = await connection.get(self.request)
            done = time.perf_counter()
            if record:
                self.latencies.append(done - due)
                self.bytes += size
                if status != 200:
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1
            connection.last_used = time.monotonic()
            self.idle.append(connection)
        except asyncio.CancelledError:
            if connection is not None:
                connection.close()
            raise
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            if connection is not None:
                connection.close()
            if record:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
        finally:
            self.slots.release()
            self.in_flight -= 1

    async def run(self) -> dict[str, Any]:
        tasks: set[asyncio.Task[None]] = set()
        warmup = int(WARMUP_S * self.rate)
        total = warmup + int(self.seconds * self.rate)
        start = time.perf_counter() + 0.05
        began_recording = start + warmup / self.rate
        last_report = 0.0
        for i in range(total):
            due = start + i / self.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(due, record=i >= warmup))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            now = time.perf_counter()
            if now - last_report >= (1.0 if TTY else 5.0):
                last_report = now
                recent = self.latencies[-self.rate_int :]
                worst = max(recent, default=0.0) * 1000
                print(
                    f"{chr(13) if TTY else ''}  {self.label}: "
                    f"{max(0.0, now - began_recording):5.1f}/{self.seconds:.0f} s, "
                    f"{len(self.latencies)} answered, {self.in_flight} in flight, "
                    f"{self.opened} connections, max of the last {len(recent)} {worst:.1f} ms   ",
                    end="" if TTY else "\n",
                    flush=True,
                )
        sent_until = time.perf_counter()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=DRAIN_S)
            for task in late:  # still unanswered DRAIN_S after the last was due: errors
                task.cancel()
            if late:
                await asyncio.wait(late)
        measured = total - warmup
        answered_or_failed = len(self.latencies) + sum(self.errors.values())
        self.unanswered = max(0, measured - answered_or_failed)
        if self.unanswered:
            self.errors[f"no answer {DRAIN_S:g} s after the end"] = self.unanswered
        for connection in self.idle:
            connection.close()
        if TTY:
            print(flush=True)
        achieved = (total - warmup) / max(1e-9, sent_until - began_recording)
        return self.summary(achieved)

    @property
    def rate_int(self) -> int:
        return max(1, int(self.rate))

    def summary(self, achieved_rate: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        # a request never answered is slower than every answered one
        everything = ordered + [float("inf")] * self.unanswered

        def pct(p: float) -> float | None:
            """None: the percentile falls on a request that got no answer."""
            if not everything:
                return None
            value = everything[min(len(everything) - 1, int(p / 100 * len(everything)))]
            return round(value * 1000, 2) if value != float("inf") else None

        return {
            "path": self.label,
            "requests": int(self.seconds * self.rate),
            "answered": len(ordered),
            "achieved_rate": round(achieved_rate, 1),
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": None if self.unanswered or not ordered else round(ordered[-1] * 1000, 2),
            "mean_bytes": round(self.bytes / len(ordered)) if ordered else 0,
            "connections": self.opened,
            "errors": dict(self.errors),
        }


async def sequential(port: int, request: bytes, seconds: float) -> dict[str, Any]:
    """Closed loop, one connection, one request at a time for ``seconds`` (after one
    unmeasured request): the server's time for one request without queueing, and the rate
    that allows."""
    connection = await Connection.open(port)
    latencies: list[float] = []
    try:
        await connection.get(request)
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            t0 = time.perf_counter()
            await connection.get(request)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - began
    finally:
        connection.close()
    latencies.sort()
    return {
        "sequential_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "sequential_per_s": round(len(latencies) / elapsed, 1),
    }


def check_answer(port: int, token: str, devices: int) -> dict[str, Any]:
    """One ``GET /api/v1/devices`` read in full: gzip-decoded, it must list every device."""
    import gzip
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "GET",
            "/api/v1/devices",
            headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"},
        )
        answer = connection.getresponse()
        wire = answer.read()
    finally:
        connection.close()
    if answer.status != 200:
        raise SystemExit(f"GET /api/v1/devices answered {answer.status}: {wire[:200]!r}")
    gzipped = answer.getheader("Content-Encoding") == "gzip"
    data = gzip.decompress(wire) if gzipped else wire
    listed = json.loads(data)
    if len(listed) != devices:
        raise SystemExit(f"GET /api/v1/devices listed {len(listed)} devices, not {devices}")
    print(
        f"  GET /api/v1/devices lists all {devices} devices: {len(data)} B, {len(wire)} B "
        f"on the wire{' (gzip)' if gzipped else ''}",
        flush=True,
    )
    return {"devices_listed": len(listed), "json_bytes": len(data), "wire_bytes": len(wire)}


def load(port: int, token: str, rate: float, seconds: float) -> list[dict[str, Any]]:
    """Both paths one request at a time first (unloaded), then the two open-loop phases,
    baseline first."""
    phases = [
        Phase(port, path, bearer, rate, seconds, f"GET {path}")
        for path, bearer in (("/api/v1/health", None), ("/api/v1/devices", token))
    ]
    unloaded = []
    for phase in phases:
        unloaded.append(asyncio.run(sequential(port, phase.request, SEQUENTIAL_S)))
        print(f"  {phase.label} one at a time: {unloaded[-1]}", flush=True)
    rows = []
    for phase, alone in zip(phases, unloaded, strict=True):
        rows.append({**asyncio.run(phase.run()), **alone})
        print(f"  {rows[-1]}", flush=True)
    return rows


# -- where the time of GET /devices goes ----------------------------------------------------------


def breakdown(data_dir: Path, url: str, token: str, repeat: int = 20) -> dict[str, Any]:
    """What one ``GET /api/v1/devices`` costs in this process on the same database (mean ms
    of ``repeat`` runs): checking the token; making the list afresh (the query and its
    encoding, what the shared body saves: :mod:`edgeops.api.snapshot`); serving the shared
    body; and the top of a cProfile of making the list."""
    from edgeops.api.context import ApiContext
    from edgeops.config import Settings
    from edgeops.db import Database

    settings = Settings(data_dir=data_dir, database_url=url)
    database = Database(settings.database)
    ctx = ApiContext(settings, database)
    snapshot = ctx.device_list
    try:

        def fresh() -> bytes:
            snapshot.invalidate()
            return snapshot.get().data

        body = fresh()  # warm: connection, statement caches
        auth = build = shared = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            ctx.tokens.authenticate(token)
            t1 = time.perf_counter()
            fresh()
            t2 = time.perf_counter()
            snapshot.get()
            t3 = time.perf_counter()
            auth, build, shared = auth + t1 - t0, build + t2 - t1, shared + t3 - t2
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            fresh()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        lines = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()]
        return {
            "authenticate_ms": round(auth / repeat * 1000, 2),
            "build_ms": round(build / repeat * 1000, 2),
            "shared_ms": round(shared / repeat * 1000, 3),
            "answer_bytes": len(body),
            "profile_top_tottime": lines[-13:],
        }
    finally:
        database.dispose()


# -- the report ------------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "no answer" if value is None else f"{value:g} ms"


def markdown(document: dict[str, Any], args: argparse.Namespace) -> str:
    meta = document["meta"]
    lines = [
        "# API latency",
        "",
        f"{meta['when']}, `{meta['command']}`, {meta['seconds']} s; {args.devices} devices in "
        f"{args.db}; open loop at {args.rate:g} requests/s for {args.seconds:g} s per path "
        f"(after {WARMUP_S:g} s of warm-up); uvicorn in its own process, {meta['cores']} cores.",
        "",
        "| path | answered | achieved/s | p50 | p90 | p99 | max | bytes | connections | errors "
        "| one at a time: p50, rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| `{row['path']}` | {row['answered']} | {row['achieved_rate']} "
            f"| {ms(row['p50_ms'])} | {ms(row['p90_ms'])} | {ms(row['p99_ms'])} "
            f"| {ms(row['max_ms'])} | {row['mean_bytes']} "
            f"| {row['connections']} | {row['errors'] or 'none'} "
            f"| {row['sequential_p50_ms']} ms, {row['sequential_per_s']}/s |"
        )
    answer = document.get("answer")
    if answer:
        lines += [
            "",
            f"The answer lists all {answer['devices_listed']} devices: {answer['json_bytes']} B "
            f"of JSON, {answer['wire_bytes']} B on the wire (the load generator sends "
            "`Accept-Encoding: gzip, deflate` as common HTTP clients do).",
        ]
    lines += ["", *targets_table(document["targets"])]
    cost = document.get("breakdown")
    if cost:
        lines += [
            "",
            "One `GET /api/v1/devices` in this process, mean of 20: the token check "
            f"{cost['authenticate_ms']} ms; making the list afresh (query and encoding) "
            f"{cost['build_ms']} ms, which happens when the devices change (checked at most "
            "every 0.2 s) and at least every 10 s; serving the shared "
            f"body {cost['shared_ms']} ms. cProfile of making the list (5 calls, by own time):",
            "",
            "```",
            *cost["profile_top_tottime"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, url: str, data_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    print(f"recording {args.devices} devices in {args.db} ...", flush=True)
    token = populate(url, args.devices)
    print(f"  done in {time.perf_counter() - began:.1f} s; starting the API", flush=True)
    with server_process(data_dir, url) as port:
        listed = check_answer(port, token, args.devices)
        rows = load(port, token, args.rate, args.seconds)
    health, devices = rows
    p99 = devices["p99_ms"]
    met = p99 is not None and p99 < GOAL_P99_MS and not devices["errors"]
    targets = [
        {
            "target": f"p99 of GET /api/v1/devices ({args.devices} devices, "
            f"{args.rate:g}/s) under {GOAL_P99_MS:g} ms",
            "text": f"{ms(devices['p99_ms'])} (baseline /health {ms(health['p99_ms'])})",
            "met": met,
        },
        {
            "target": f"the load was kept: at least 95 % of {args.rate:g}/s sent",
            "text": f"{devices['achieved_rate']}/s and {health['achieved_rate']}/s",
            "met": min(devices["achieved_rate"], health["achieved_rate"]) >= 0.95 * args.rate,
        },
        {
            "target": "no errors",
            "text": f"{devices['errors'] or 'none'}, {health['errors'] or 'none'}",
            "met": not devices["errors"] and not health["errors"],
        },
    ]
    command = (
        f"python bench/api.py --db {args.db} --devices {args.devices} --rate {args.rate:g} "
        f"--seconds {args.seconds:g}" + (" --profile" if args.profile else "")
    )
    document: dict[str, Any] = {"rows": rows, "targets": targets, "answer": listed}
    if args.profile or not met:
        print("breaking down the work of GET /api/v1/devices ...", flush=True)
        document["breakdown"] = breakdown(data_dir, url, token)
    seconds = round(time.perf_counter() - began, 1)
    document = {
        "meta": run_meta(command, seconds, database=args.db, devices=args.devices),
        **document,
    }
    return document


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--db", choices=["sqlite", "postgresql"], default="sqlite", help="the hub's database"
    )
    parser.add_argument("--devices", type=int, default=1000, help="devices recorded (1000)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per path (30)")
    parser.add_argument(
        "--profile", action="store_true", help="break down GET /devices even if the goal is met"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where api.json/md go")
    args = parser.parse_args()
    if args.devices < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--devices, --rate and --seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-api-") as tmp:
        data_dir = Path(tmp)
        if args.db == "sqlite":
            document = run(args, f"sqlite:///{data_dir / 'edgeops.db'}", data_dir)
        else:
            with postgres_database("edgeops_bench_api_") as url:
                document = run(args, url, data_dir)
    write_and_report(args.out, "api", document, markdown(document, args))


if __name__ == "__main__":
    main()
