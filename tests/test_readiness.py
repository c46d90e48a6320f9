"""ReadinessMonitor against real servers: the machine's for the happy path, private ones for
faults (killed, restarted, black-holed, wrong password, missing table), on both backends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import anyio
import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from supervisor.checks.aioloop import AsyncioThread
from supervisor.checks.probes import CheckResult
from supervisor.checks.readiness import ReadinessMonitor, ReadinessSnapshot, collect_families
from supervisor.config import CheckSpec
from tests.dbservers import (  # noqa: F401 (fixtures)
    CANARY,
    BlackHole,
    PostgresServer,
    RedisServer,
    black_hole,
    pg_server,
    redis_server,
)
from tests.support import LOAD_SLACK

MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/test"
MACHINE_REDIS = "redis://127.0.0.1:6379/0"
# "Timeout + 100 ms" holds on a quiet machine; these tests allow a loaded one LOAD_SLACK more,
# which still tells an honoured timeout from an ignored one (seconds to a minute).
MARGIN = LOAD_SLACK


@pytest.fixture
def bridge() -> Iterator[AsyncioThread]:
    with AsyncioThread() as thread:
        yield thread


def spec(name: str, kind: str, target: str, **kw: float | str) -> CheckSpec:
    return CheckSpec(name=name, type=kind, target=target, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(checks: list[CheckSpec],
                  bridge: AsyncioThread) -> AsyncIterator[ReadinessMonitor]:
    monitor = ReadinessMonitor({c.name: c for c in checks}, bridge)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        yield monitor
        tg.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll `predicate` (cheap, non-blocking) until true; fail after `timeout`. Returns seconds."""
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
    return time.monotonic() - started


class _Families(Collector):
    def __init__(self, monitor: ReadinessMonitor) -> None:
        self.monitor = monitor

    def collect(self):  # type: ignore[no-untyped-def]
        return collect_families(self.monitor.snapshot(), "test-env")


def metrics_text(monitor: ReadinessMonitor) -> tuple[CollectorRegistry, str]:
    registry = CollectorRegistry()
    registry.register(_Families(monitor))
    return registry, generate_latest(registry).decode()


# -- pure snapshot behaviour ----------------------------------------------------------------

def test_no_checks_means_ready() -> None:
    snap = ReadinessSnapshot({}, {})
    assert snap.ready is True
    assert snap.body() == {"status": "ready", "checks": {}}
    assert collect_families(snap, "prod")[0].samples == []


def test_body_shape_and_staleness_with_an_injected_clock() -> None:
    now = [100.0]
    specs = {"database": spec("database", "postgres", "postgresql://h/db", interval=5.0),
             "redis": spec("redis", "redis", "redis://h/0", interval=5.0),
             "event_store": spec("event_store", "postgres", "postgresql://h/db")}
    results: Mapping[str, CheckResult] = {
        "database": CheckResult("database", True, 1.44, None, 100.0),
        "redis": CheckResult("redis", False, 3.0, "connect: refused", 100.0)}
    snap = ReadinessSnapshot(specs, results, 2, lambda: now[0])
    assert snap.body() == {"status": "not_ready", "checks": {
        "database": {"name": "database", "healthy": True, "latency_ms": 1.4},
        "redis": {"name": "redis", "healthy": False, "latency_ms": 3.0,
                  "error": "connect: refused"},
        "event_store": {"name": "event_store", "healthy": False, "latency_ms": 0.0,
                        "error": "no result yet"}}}
    assert snap.healthy(["database"]) and not snap.healthy(["database", "redis"])
    now[0] = 109.9  # just under 2 * interval
    assert snap.healthy(["database"])
    now[0] = 110.1
    assert not snap.healthy(["database"])
    assert snap.body()["checks"]["database"]["error"] == "stale: last result 10.1s old"
    up = {s.labels["check"]: s.value for s in collect_families(snap, "prod")[0].samples}
    assert up == {"database": 0.0, "redis": 0.0, "event_store": 0.0}


# -- against real servers -------------------------------------------------------------------

@pytest.mark.anyio
async def test_monitor_without_checks_is_ready(bridge: AsyncioThread) -> None:
    async with running([], bridge) as monitor:
        assert monitor.snapshot().body() == {"status": "ready", "checks": {}}
        assert await monitor.wait_healthy([], 0.1)


@pytest.mark.anyio
async def test_happy_path_on_machine_servers(bridge: AsyncioThread) -> None:
    checks = [spec("database", "postgres", MACHINE_PG), spec("redis", "redis", MACHINE_REDIS)]
    async with running(checks, bridge) as monitor:
        assert await monitor.wait_healthy(["database", "redis"], 20.0)
        body = monitor.snapshot().body()
        assert body["status"] == "ready" and monitor.snapshot().ready
        assert set(body["checks"]) == {"database", "redis"}
        for name, entry in body["checks"].items():
            assert set(entry) == {"name", "healthy", "latency_ms"}
            assert entry["name"] == name and entry["healthy"] is True
        registry, text = metrics_text(monitor)
        labels = {"service": "supervisor", "environment": "test-env", "check": "database"}
        assert registry.get_sample_value("dependency_up", labels) == 1.0
        duration = registry.get_sample_value("dependency_check_duration_seconds", labels)
        assert duration is not None and 0 < duration < 1
        assert "# HELP dependency_up " in text
        assert "# HELP dependency_check_duration_seconds " in text


@pytest.mark.anyio
async def test_killed_dependencies_fail_by_name_and_recover_within_an_interval(
        bridge: AsyncioThread, pg_server: PostgresServer, redis_server: RedisServer) -> None:
    pg_server.ensure_running()
    redis_server.ensure_running()
    interval, timeout = 0.5, 0.5
    checks = [spec("database", "postgres", pg_server.checker_dsn(), interval=interval,
                   timeout=timeout),
              spec("redis", "redis", redis_server.url(), interval=interval, timeout=timeout)]
    bound = interval + timeout + MARGIN  # next tick, plus the probe that notices
    async with running(checks, bridge) as monitor:
        assert await monitor.wait_healthy(["database", "redis"], 20.0)
        for victim, other, server in (("database", "redis", pg_server),
                                      ("redis", "database", redis_server)):
            try:
                await anyio.to_thread.run_sync(server.kill)
                await until(lambda v=victim: not monitor.snapshot().healthy([v]), bound)
                body = monitor.snapshot().body()
                assert body["status"] == "not_ready"
                assert body["checks"][victim]["healthy"] is False
                assert body["checks"][victim]["error"]
                assert body["checks"][other]["healthy"] is True
            finally:
                await anyio.to_thread.run_sync(server.ensure_running)
            # Back up: healthy again within one interval (plus the probe's own latency).
            recovered = await until(lambda v=victim: monitor.snapshot().healthy([v]),
                                    interval + 0.25 + LOAD_SLACK)
            assert recovered <= interval + 0.25 + LOAD_SLACK
        assert monitor.snapshot().body()["status"] == "ready"


@pytest.mark.anyio
async def test_black_hole_fails_within_timeout_and_reads_stay_instant(
        bridge: AsyncioThread, black_hole: BlackHole) -> None:
    timeout = 0.3
    checks = [spec("database", "postgres", f"postgresql://u:{CANARY}@{black_hole.address}/db",
                   timeout=timeout, interval=5.0),
              spec("redis", "redis", f"redis://:{CANARY}@{black_hole.address}/0",
                   timeout=timeout, interval=5.0),
              spec("api", "http", f"http://{black_hole.address}/", timeout=timeout,
                   interval=5.0)]
    async with running(checks, bridge) as monitor:
        started = time.monotonic()  # the first round starts now
        slowest_read = 0.0
        while monitor.snapshot().generation < len(checks):
            t0 = time.monotonic()
            body = monitor.snapshot().body()  # while every probe hangs
            slowest_read = max(slowest_read, time.monotonic() - t0)
            assert body["status"] == "not_ready"
            assert time.monotonic() - started < timeout + MARGIN
            await anyio.sleep(0.005)
        elapsed = time.monotonic() - started
        body = monitor.snapshot().body()
    assert elapsed < timeout + MARGIN, elapsed
    # A read never waits for a probe (which hangs 300 ms here); it takes microseconds, and a
    # loaded machine may hold this thread back for some tens of milliseconds.
    assert slowest_read < 0.15
    for name in ("database", "redis", "api"):
        assert body["checks"][name]["error"].startswith("timed out after 0.3s"), body
        assert body["checks"][name]["latency_ms"] < (timeout + MARGIN) * 1000
    assert CANARY not in json.dumps(body)


@pytest.mark.anyio
async def test_wrong_password_is_redacted_everywhere(
        bridge: AsyncioThread, pg_server: PostgresServer, redis_server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pg_server.ensure_running()
    redis_server.ensure_running()
    wrong = CANARY + "-wrong"  # the DSN's password carries the canary
    checks = [spec("database", "postgres", pg_server.checker_dsn(wrong)),
              spec("redis", "redis", redis_server.url(password=wrong)),
              spec("good", "postgres", pg_server.checker_dsn())]
    async with running(checks, bridge) as monitor:
        await until(lambda: monitor.snapshot().generation >= len(checks), 3.0)
        snap = monitor.snapshot()
        body = snap.body()
        _, text = metrics_text(monitor)
    assert body["status"] == "not_ready"
    assert body["checks"]["good"]["healthy"] is True  # the right password does work
    assert "password authentication failed" in body["checks"]["database"]["error"]
    assert body["checks"]["redis"]["healthy"] is False
    for where in (json.dumps(body), text, caplog.text, repr(snap), repr(monitor),
                  repr(checks)):
        assert CANARY not in where


@pytest.mark.anyio
async def test_missing_events_table_fails_event_store_only(
        bridge: AsyncioThread, pg_server: PostgresServer) -> None:
    pg_server.ensure_running()
    await anyio.to_thread.run_sync(pg_server.psql, "DROP TABLE IF EXISTS events")
    checks = [spec("database", "postgres", pg_server.checker_dsn(), interval=0.3),
              spec("event_store", "postgres", pg_server.checker_dsn(), interval=0.3,
                   query="SELECT 1 FROM events LIMIT 1")]
    async with running(checks, bridge) as monitor:
        await until(lambda: monitor.snapshot().generation >= 2, 3.0)
        body = monitor.snapshot().body()
        assert body["status"] == "not_ready"
        assert body["checks"]["database"]["healthy"] is True
        assert body["checks"]["event_store"]["error"] == \
            'query: UndefinedTableError: relation "events" does not exist'
        await anyio.to_thread.run_sync(
            pg_server.psql, "CREATE TABLE events (id int); GRANT SELECT ON events TO checker")
        try:
            assert await monitor.wait_healthy(["event_store"], 0.3 + 0.5)
            assert monitor.snapshot().ready
        finally:
            await anyio.to_thread.run_sync(pg_server.psql, "DROP TABLE events")


@pytest.mark.anyio
async def test_burst_of_reads_opens_no_connections(
        bridge: AsyncioThread, pg_server: PostgresServer) -> None:
    pg_server.ensure_running()
    checks = [spec("database", "postgres", pg_server.checker_dsn(), interval=60.0)]
    async with running(checks, bridge) as monitor:
        assert await monitor.wait_healthy(["database"], 20.0)
        generation = monitor.snapshot().generation
        received = pg_server.connections_received()
        barrier = threading.Barrier(50)

        def read() -> str:
            barrier.wait(5)
            snap = monitor.snapshot()
            return json.dumps(snap.body()) if snap.ready else "not ready"

        def burst() -> list[str]:
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                return list(pool.map(lambda _: read(), range(50)))

        answers = await anyio.to_thread.run_sync(burst)
        assert len(answers) == 50 and all('"status": "ready"' in a for a in answers)
        assert monitor.snapshot().generation == generation
        assert pg_server.connections_received() == received
        assert await anyio.to_thread.run_sync(pg_server.connections) == 0


@pytest.mark.anyio
async def test_wait_healthy_true_when_passing_false_at_timeout(
        bridge: AsyncioThread, black_hole: BlackHole) -> None:
    checks = [spec("database", "postgres", MACHINE_PG, interval=0.2),
              spec("hole", "postgres", f"postgresql://u@{black_hole.address}/db", interval=0.2,
                   timeout=0.2)]
    async with running(checks, bridge) as monitor:
        assert await monitor.wait_healthy(["database"], 20.0)
        started = time.monotonic()
        assert not await monitor.wait_healthy(["database", "hole"], 0.4)
        assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
        with pytest.raises(ValueError, match="nope"):
            await monitor.wait_healthy(["nope"], 0.1)


@pytest.mark.anyio
async def test_no_thread_task_or_connection_leak_over_hundreds_of_checks(
        bridge: AsyncioThread, anyio_backend: str) -> None:
    checks = [spec("database", "postgres", MACHINE_PG, interval=0.005),
              spec("redis", "redis", MACHINE_REDIS, interval=0.005),
              spec("tcp", "tcp", "127.0.0.1:6379", interval=0.005)]
    me = psutil.Process()
    async with running(checks, bridge) as monitor:  # warm-up round: imports, lazy objects
        await until(lambda: monitor.snapshot().generation >= 6, 3.0)
    threads, fds = threading.active_count(), me.num_fds()
    tasks = len(asyncio.all_tasks()) if anyio_backend == "asyncio" else 0
    # A leak would grow with the ~900 checks; worker pools (anyio's, asyncio's default
    # executor for getaddrinfo) may add a thread or two under load and keep it idle.
    async with running(checks, bridge) as monitor:
        await until(lambda: monitor.snapshot().generation >= 300, 20.0)
        assert monitor.snapshot().ready
        assert threading.active_count() <= threads + 4
    assert threading.active_count() <= threads + 4
    assert me.num_fds() <= fds + 2
    if anyio_backend == "asyncio":
        assert len(asyncio.all_tasks()) == tasks
    assert await anyio.to_thread.run_sync(_bridge_tasks, bridge) == 0
    assert [c for c in me.net_connections(kind="tcp")
            if c.raddr and c.raddr.port in (5432, 6379)] == []


def _bridge_tasks(bridge: AsyncioThread) -> int:
    counted: concurrent.futures.Future[int] = concurrent.futures.Future()
    loop = bridge.loop
    loop.call_soon_threadsafe(lambda: counted.set_result(len(asyncio.all_tasks(loop))))
    return counted.result(timeout=2)
