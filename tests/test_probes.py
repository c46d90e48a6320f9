"""Probes and the asyncio bridge against real servers, on both anyio backends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator

import anyio
import psutil
import pytest

from supervisor.checks.aioloop import AsyncioThread, BridgeStoppedError
from supervisor.checks.probes import CheckResult, probe
from supervisor.config import CheckSpec
from supervisor.core.redact import redact_text, redact_url, url_secrets
from tests.dbservers import CANARY, BlackHole, StatusServer, black_hole, free_port, status_server  # noqa: F401 (fixtures)
from tests.support import LOAD_SLACK, poll_until

MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/test"
MACHINE_REDIS = "redis://127.0.0.1:6379/0"
# The "timeout + 100 ms" holds on a quiet machine; these tests allow a loaded one
# LOAD_SLACK more, which still tells an honoured timeout from an ignored one (seconds to a
# minute: asyncio.sleep(10), asyncpg's 60 s connect timeout).
MARGIN = LOAD_SLACK


@pytest.fixture
def bridge() -> Iterator[AsyncioThread]:
    with AsyncioThread() as thread:
        yield thread


def spec(kind: str, target: str, **kw: object) -> CheckSpec:
    name = str(kw.pop("name", kind))
    return CheckSpec(name=name, type=kind, target=target, **kw)  # type: ignore[arg-type]


# -- redaction (pure) -----------------------------------------------------------------------

def test_redact_url_hides_userinfo_and_query_passwords() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://:s%40cret@h/0") == "redis://:***@h/0"
    assert redact_url("postgresql://u@h/db?password=x&sslmode=require") == \
        "postgresql://u@h/db?password=***&sslmode=require"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("127.0.0.1:5432") == "127.0.0.1:5432"
    assert "p@ss" not in redact_url("postgresql://u:p@ss@h/db")


def test_redact_text_masks_every_form_of_the_secret() -> None:
    url = "postgresql://u:s%40cret@h/db"
    secrets = url_secrets(url)
    assert set(secrets) >= {"s%40cret", "s@cret"}
    text = "auth failed for s@cret at postgresql://x:other@h and s%40cret"
    out = redact_text(text, secrets)
    assert "s@cret" not in out and "s%40cret" not in out and "other" not in out
    assert out.count("***") == 3


# -- the bridge -----------------------------------------------------------------------------

@pytest.mark.anyio
async def test_bridge_returns_raises_and_times_out(bridge: AsyncioThread) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def boom() -> None:
        raise ValueError("boom")

    assert await bridge.run(answer, 1.0) == 42
    with pytest.raises(ValueError, match="boom"):
        await bridge.run(boom, 1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bridge.run(lambda: asyncio.sleep(10), 0.2)
    assert time.monotonic() - started < 0.2 + MARGIN


@pytest.mark.anyio
async def test_bridge_cancellation_reaches_the_asyncio_task(bridge: AsyncioThread) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with anyio.move_on_after(0.1):
        await bridge.run(slow, 5.0)
    # run() returns only once the bridge task has unwound: nothing outlives the caller.
    assert cancelled.is_set()
    assert await anyio.to_thread.run_sync(_bridge_tasks, bridge) == 0


@pytest.mark.anyio
async def test_pending_calls_do_not_hold_threads(bridge: AsyncioThread) -> None:
    before = threading.active_count()
    peak = 0

    async def call() -> None:
        await bridge.run(lambda: asyncio.sleep(0.3), 2.0)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(call)
        await anyio.sleep(0.1)
        peak = threading.active_count()
    assert peak == before
    assert await anyio.to_thread.run_sync(_bridge_tasks, bridge) == 0


@pytest.mark.anyio
async def test_stopped_bridge_refuses_and_joins() -> None:
    thread = AsyncioThread().start()
    names = {t.name for t in threading.enumerate()}
    assert "asyncio-bridge" in names
    thread.stop()
    assert "asyncio-bridge" not in {t.name for t in threading.enumerate()}
    with pytest.raises(BridgeStoppedError):
        await thread.run(lambda: asyncio.sleep(0), 1.0)
    result = await probe(spec("postgres", MACHINE_PG), thread)
    assert not result.healthy and "BridgeStoppedError" in (result.error or "")


def _bridge_tasks(bridge: AsyncioThread) -> int:
    """Tasks alive on the bridge loop, counted from a plain callback (not itself a task)."""
    counted: concurrent.futures.Future[int] = concurrent.futures.Future()
    loop = bridge.loop
    loop.call_soon_threadsafe(lambda: counted.set_result(len(asyncio.all_tasks(loop))))
    return counted.result(timeout=2)


# -- happy path on the machine's servers ----------------------------------------------------

@pytest.mark.anyio
async def test_machine_postgres_and_redis_are_healthy(bridge: AsyncioThread) -> None:
    for check in (spec("postgres", MACHINE_PG), spec("redis", MACHINE_REDIS),
                  spec("tcp", "127.0.0.1:5432")):
        result = await probe(check, bridge)
        assert isinstance(result, CheckResult)
        assert result.healthy, result.error
        assert result.error is None and 0 < result.latency_ms < 1000
        assert abs(result.checked_at - time.monotonic()) < 1


# -- faults ---------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["postgres", "redis", "http"])
async def test_black_hole_fails_within_timeout(bridge: AsyncioThread, black_hole: BlackHole,
                                               kind: str) -> None:
    target = {"postgres": f"postgresql://u:{CANARY}@{black_hole.address}/db",
              "redis": f"redis://:{CANARY}@{black_hole.address}/0",
              "http": f"http://{black_hole.address}/ready"}[kind]
    started = time.monotonic()
    result = await probe(spec(kind, target, timeout=0.3), bridge)
    elapsed = time.monotonic() - started
    assert not result.healthy
    assert elapsed < 0.3 + MARGIN, elapsed
    assert "time" in (result.error or "").lower(), result.error
    assert CANARY not in (result.error or "")
    # It really connected, then hung. The black hole's accept thread may not have run yet on
    # a loaded machine; the connection waits in its backlog until it does.
    assert await anyio.to_thread.run_sync(lambda: poll_until(lambda: black_hole.accepted >= 1,
                                                             20))


@pytest.mark.anyio
async def test_refused_port_fails_fast(bridge: AsyncioThread) -> None:
    port = free_port()
    for check in (spec("tcp", f"127.0.0.1:{port}"),
                  spec("postgres", f"postgresql://u:{CANARY}@127.0.0.1:{port}/db"),
                  spec("redis", f"redis://:{CANARY}@127.0.0.1:{port}/0")):
        result = await probe(check, bridge)
        assert not result.healthy and result.latency_ms < 500
        assert result.error and result.error.startswith("connect"), result.error
        assert CANARY not in result.error


@pytest.mark.anyio
async def test_http_status_classes(bridge: AsyncioThread, status_server: StatusServer) -> None:
    expected = {200: True, 204: True, 302: True, 404: False, 503: False}
    for code, healthy in expected.items():
        result = await probe(spec("http", status_server.url(code)), bridge)
        assert result.healthy is healthy, (code, result.error)
        if not healthy:
            assert result.error == f"HTTP {code}"


@pytest.mark.anyio
async def test_no_leaks_over_hundreds_of_checks(bridge: AsyncioThread) -> None:
    checks = [spec("postgres", MACHINE_PG), spec("redis", MACHINE_REDIS),
              spec("tcp", "127.0.0.1:6379")]
    me = psutil.Process()
    for check in checks:  # warm up imports and lazily created objects
        assert (await probe(check, bridge)).healthy
    threads, fds = set(threading.enumerate()), me.num_fds()
    failures = 0
    for _ in range(100):  # 300 checks, three at a time
        results: list[CheckResult] = []

        async def one(check: CheckSpec, out: list[CheckResult] = results) -> None:
            out.append(await probe(check, bridge))

        async with anyio.create_task_group() as tg:
            for check in checks:
                tg.start_soon(one, check)
        failures += sum(not r.healthy for r in results)
    assert failures == 0
    # Runtime worker pools (trio's thread cache resolves names, anyio's to_thread) may grow
    # under load and shrink when idle: they are not leaks. Anything else new is.
    new = [t.name for t in threading.enumerate() if t not in threads
           and not t.name.startswith(("Trio thread", "AnyIO worker"))]
    assert new == []
    assert me.num_fds() <= fds + 2  # slack for the runtime's own lazily opened fds
    assert await anyio.to_thread.run_sync(_bridge_tasks, bridge) == 0
    assert open_connections_to(me, {5432, 6379}) == []


def open_connections_to(proc: psutil.Process, ports: set[int]) -> list[object]:
    """This process's sockets to the given server ports (other test runs may share the
    servers, so counting on the server side would see their connections too)."""
    return [c for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port in ports]
