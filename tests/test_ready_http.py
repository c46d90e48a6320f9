"""Readiness and metric merging through the daemon's HTTP interface, on both backends, against
real PostgreSQL and Redis (the machine's, and throwaway ones these tests kill)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest

from supervisor.core.lifecycle import State
from supervisor.observe.render import CLOCK_RESOLUTION
from tests.dbservers import CANARY, PostgresServer, pg_server  # noqa: F401 (fixture)
from tests.support import (
    SLEEPER_CODE,
    base_url,
    free_port,
    get,
    metrics_server,
    promtool_ok,
    running_daemon,
    sample,
    service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio

MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/test"
MACHINE_REDIS = "redis://127.0.0.1:6379/0"


def checks(event_store_dsn: str, interval: float = 0.3) -> str:
    return f"""
[checks.database]
type = "postgres"
dsn = "{MACHINE_PG}"
interval = {interval}
timeout = 1.0
[checks.redis]
type = "redis"
url = "{MACHINE_REDIS}"
interval = {interval}
[checks.event_store]
type = "postgres"
dsn = "{event_store_dsn}"
query = "SELECT 1 FROM events LIMIT 1"
interval = {interval}
timeout = 1.0
"""


async def wait_ready(daemon, want: int, timeout: float = 30.0) -> httpx.Response:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while True:
            response = await get(daemon, "/v1/ready")
            if response.status_code == want:
                return response
            await anyio.sleep(0.1)


async def test_ready_follows_a_dependency_that_dies_and_returns(
        tmp_path: Path, pg_server: PostgresServer) -> None:  # noqa: F811
    pg_server.ensure_running()
    pg_server.psql("CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY)")
    path = write_config(tmp_path, checks(pg_server.admin_dsn) + service("api", SLEEPER_CODE))
    async with running_daemon(path) as daemon:
        ok = await wait_ready(daemon, 200)
        body = ok.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {"database", "redis", "event_store"}
        assert all(c["healthy"] and c["latency_ms"] >= 0 for c in body["checks"].values())
        metrics = (await get(daemon, "/v1/metrics")).text
        assert sample(metrics, "dependency_up", check="event_store", service="supervisor",
                      environment="development") == 1.0
        pg_server.kill()
        try:
            down = await wait_ready(daemon, 503)
            assert down.json()["status"] == "not_ready"
            failing = {n for n, c in down.json()["checks"].items() if not c["healthy"]}
            assert failing == {"event_store"}
            assert down.json()["checks"]["event_store"]["error"]
            assert (await get(daemon, "/v1/health")).status_code == 200  # liveness untouched
            status = (await get(daemon, "/v1/status")).json()
            assert status["readiness"]["status"] == "not_ready"
        finally:
            pg_server.ensure_running()
        began = time.monotonic()
        await wait_ready(daemon, 200)
        # Within a few rounds (0.3 s apart, each bounded by its 1 s timeout) of PostgreSQL's
        # return, as a loaded machine may need, not at some long backoff.
        assert time.monotonic() - began < 10.0


async def test_missing_events_table_fails_only_the_event_store(tmp_path: Path) -> None:
    path = write_config(tmp_path, checks(MACHINE_PG.replace("/test", "/postgres"))
                        + service("api", SLEEPER_CODE))
    async with running_daemon(path) as daemon:
        # Until the database check has passed once (not a fixed 0.8 s: slower under load).
        with anyio.move_on_after(15):
            while True:
                body = (await wait_ready(daemon, 503)).json()
                if body["checks"]["database"]["healthy"]:
                    break
                await anyio.sleep(0.1)
        assert body["checks"]["database"]["healthy"] is True, body
        assert body["checks"]["event_store"]["healthy"] is False
        assert "events" in body["checks"]["event_store"]["error"]


async def test_canary_password_never_surfaces(tmp_path: Path, pg_server: PostgresServer,  # noqa: F811
                                              caplog: pytest.LogCaptureFixture) -> None:
    pg_server.ensure_running()
    env_dump = tmp_path / "env.json"
    dump = f"import json, os\njson.dump(dict(os.environ), open({str(env_dump)!r}, 'w'))\n"
    path = write_config(tmp_path, f"""
[checks.database]
type = "postgres"
dsn = "{pg_server.checker_dsn('wrong-' + CANARY)}"
interval = 0.3
[checks.good]
type = "postgres"
dsn = "{pg_server.checker_dsn()}"
interval = 0.3
""" + service("api", dump + SLEEPER_CODE, start_seconds=0.1))
    caplog.set_level(logging.DEBUG)
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        body = (await wait_ready(daemon, 503)).json()
        assert body["checks"]["good"]["healthy"] is True
        error = body["checks"]["database"]["error"]
        assert error and "password" in error.lower()
        texts = [
            (await get(daemon, "/v1/ready")).text,
            (await get(daemon, "/v1/status")).text,
            (await get(daemon, "/v1/metrics")).text,
            caplog.text,
            env_dump.read_text(),
            repr(daemon.config),
        ]
    for text in texts:
        assert CANARY not in text


async def test_wait_for_holds_a_service_until_its_check_passes(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, f"""
[checks.gate]
type = "tcp"
address = "127.0.0.1:{port}"
interval = 0.2
timeout = 0.5
""" + service("api", SLEEPER_CODE, start_seconds=0.1, wait_for=["gate"], wait_timeout=30))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.WAITING
                       and "gate" in (s.waiting_for or ""))
        await anyio.sleep(1.0)  # several failed rounds of the gate (0.2 s apart) ...
        held = daemon.snapshots["api"]  # ... and it is still held
        assert held.state is State.WAITING and held.waiting_for is not None
        assert "gate" in held.waiting_for and held.starts == 0
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
            opened = time.monotonic()
            await wait_for(daemon, "api", lambda s: s.starts == 1, timeout=20)
            # Rounds are 0.2 s apart: released within a few of them (a loaded machine's
            # margin), not at the 30 s wait_timeout.
            assert time.monotonic() - opened < 5.0


async def test_ready_burst_is_answered_without_new_connections(
        tmp_path: Path, pg_server: PostgresServer) -> None:  # noqa: F811
    pg_server.ensure_running()
    pg_server.psql("CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY)")
    path = write_config(tmp_path, checks(pg_server.admin_dsn, interval=30.0)
                        + service("api", SLEEPER_CODE))
    async with running_daemon(path) as daemon:
        await wait_ready(daemon, 200)
        before = pg_server.connections_received()
        codes: list[int] = []
        latencies: list[float] = []

        async def one(client: httpx.AsyncClient) -> None:
            began = time.monotonic()
            response = await client.get("/v1/ready")
            latencies.append(time.monotonic() - began)
            codes.append(response.status_code)

        async with httpx.AsyncClient(base_url=base_url(daemon), timeout=10,
                                     limits=httpx.Limits(max_connections=50)) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one, client)
        assert codes == [200] * 50
        assert pg_server.connections_received() == before  # served from the snapshot


CHILD_METRICS = """# HELP http_request_duration_seconds Request latency.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{method="GET",endpoint="/v1/events",status="200",le="0.1"} 3
http_request_duration_seconds_bucket{method="GET",endpoint="/v1/events",status="200",le="+Inf"} 4
http_request_duration_seconds_sum{method="GET",endpoint="/v1/events",status="200"} 0.9
http_request_duration_seconds_count{method="GET",endpoint="/v1/events",status="200"} 4
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total{service="inner"} 7
# HELP queue_depth Queue depth.
# TYPE queue_depth gauge
queue_depth{service="inner"} 5
# HELP constitutional_breach_count Breaches.
# TYPE constitutional_breach_count gauge
constitutional_breach_count 2
# HELP halt_state Halt.
# TYPE halt_state gauge
halt_state 1
# HELP dissent_health_ratio Dissent.
# TYPE dissent_health_ratio gauge
dissent_health_ratio 0.5
# HELP witness_coverage_percent Witnesses.
# TYPE witness_coverage_percent gauge
witness_coverage_percent 90
# HELP override_frequency Overrides.
# TYPE override_frequency gauge
override_frequency 3
# HELP foo_breach_count_total Sneaky.
# TYPE foo_breach_count_total counter
foo_breach_count_total 1
"""


async def test_children_metrics_are_merged_and_fr52_filtered(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "metrics.txt").write_text(CHILD_METRICS)
    server = metrics_server(port, tmp_path / "metrics.txt")
    path = write_config(
        tmp_path,
        service("api", server, start_seconds=0.1, metrics_url=f"http://127.0.0.1:{port}/metrics")
        + service("quiet", SLEEPER_CODE),
        supervisor="scrape_interval = 0.3\ndeny_metrics = [\"jobs_*\"]\n")
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        with anyio.fail_after(10):
            while "service_scrape_up" not in (text := (await get(daemon, "/v1/metrics")).text) \
                    or sample(text, "service_scrape_up", service="api") != 1.0:
                await anyio.sleep(0.1)
        await get(daemon, "/v1/health")  # the daemon's own request metrics
        await anyio.sleep(2 * CLOCK_RESOLUTION)  # they may lag the last body by one tick
        text = (await get(daemon, "/v1/metrics")).text
    assert sample(text, "http_request_duration_seconds_bucket", service="api",
                  environment="development", endpoint="/v1/events", le="0.1") == 3.0
    assert sample(text, "http_requests_total", service="supervisor", endpoint="/v1/metrics")
    assert text.count("# TYPE http_request_duration_seconds histogram") == 1
    assert "jobs_total" not in text  # operator's deny_metrics
    assert sample(text, "queue_depth", service="api", exported_service="inner") == 5.0
    for denied in ("constitutional_breach_count", "halt_state", "dissent_health",
                   "witness_coverage", "override_frequency", "breach_count"):
        assert denied not in text
    promtool_ok(text)
