"""One probe per check kind; a failed check is a `CheckResult` value, never an exception.

`PROBES` maps each kind of config's table (supervisor/config/kinds.py) to its probe; `probe`
(dependency checks) and `probe_service` (services' probes) both dispatch through it.

Every probe is hard-bounded by `spec.timeout`: the client libraries' own defaults (asyncpg
waits 60 s to connect, redis-py 5 s and retries) are overridden, and the whole probe also runs
under a deadline enforced outside the client, so a black-holed server (accepts TCP, never
answers) fails within the timeout plus a few milliseconds.

Each probe opens one connection and closes it before returning, so the number of connections
a check holds is at most one, whatever happens, and nothing accumulates over thousands of
checks. postgres and redis run on the `AsyncioThread` bridge (their clients are asyncio-only);
http and tcp run natively on the caller's backend.

Error texts are short (one line, at most `MAX_ERROR` characters), name the phase that failed,
and pass through `redact_text` with every form of the target's password, so no credential
reaches `/v1/ready`, logs or metrics.

`probe_exec` (service probes of type exec) runs a command in its own process group under the
same deadline: exit 0 passes; at the deadline, and after any exit, the whole group is
SIGKILLed and the leader reaped, so a probe that forks and hangs leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from supervisor.checks.aioloop import AsyncioThread
from supervisor.config import CheckSpec, ProbeSpec
from supervisor.core.datatypes import parse_listen
from supervisor.core.redact import redact_text, url_secrets

# httpx is imported where it is used: importing it (and, through httpcore, trio) costs about
# 0.1 s, which the daemon would otherwise spend before spawning its services.
if TYPE_CHECKING:
    import httpx

    from supervisor.process.spawn import Child

logger = logging.getLogger(__name__)

MAX_ERROR = 200
APPLICATION_NAME = "supervisor-readiness"  # visible in pg_stat_activity, so DBAs see who we are
# Bound on a graceful close once the check itself is done; then the socket is just dropped.
CLOSE_TIMEOUT = 0.5
# Slack between the timeout handed to a native (http/tcp) client and the outer hard deadline.
NATIVE_GRACE = 0.02

Clock = Callable[[], float]
ExecSpawner = Callable[[tuple[str, ...], "dict[str, str]", str], "Child"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    healthy: bool
    latency_ms: float
    error: str | None
    checked_at: float  # time.monotonic() when the probe finished


class _Phase:
    """Which step a probe is in, so a timeout can say where it hung."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(frozen=True)
class ProbeTools:
    """What a probe may need besides its spec; each kind's probe takes what it uses."""

    bridge: AsyncioThread | None = None  # postgres, redis
    http_client: httpx.AsyncClient | None = None  # http (None: one client per call)
    spawner: ExecSpawner | None = None  # exec, with env and cwd
    env: dict[str, str] | None = None
    cwd: str = "."
    clock: Clock = time.monotonic


ProbeFunction = Callable[[CheckSpec, ProbeTools], Awaitable[CheckResult]]


async def probe(spec: CheckSpec, bridge: AsyncioThread, *,
                http_client: httpx.AsyncClient | None = None,
                clock: Clock = time.monotonic) -> CheckResult:
    """Run the probe for `spec.type`; never raises (except cancellation)."""
    return await _dispatch(spec, ProbeTools(bridge=bridge, http_client=http_client, clock=clock))


async def _dispatch(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    run = PROBES.get(spec.type)
    if run is None:
        return _failed(spec.name, f"unknown check type {spec.type!r}", tools.clock)
    return await run(spec, tools)


def _failed(name: str, error: str, clock: Clock) -> CheckResult:
    return CheckResult(name, False, 0.0, error, clock())


# One probe per kind of check, keyed as config's table of kinds (supervisor/config/kinds.py);
# tests/test_check_kinds.py fails when a kind has no probe here or a probe has no kind there.
async def _run_postgres(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    if tools.bridge is None:
        return _failed(spec.name, "no asyncio bridge for a postgres check", tools.clock)
    return await probe_postgres(spec, tools.bridge, clock=tools.clock)


async def _run_redis(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    if tools.bridge is None:
        return _failed(spec.name, "no asyncio bridge for a redis check", tools.clock)
    return await probe_redis(spec, tools.bridge, clock=tools.clock)


async def _run_http(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    return await probe_http(spec, client=tools.http_client, clock=tools.clock)


async def _run_tcp(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    return await probe_tcp(spec, clock=tools.clock)


async def _run_exec(spec: CheckSpec, tools: ProbeTools) -> CheckResult:
    if tools.spawner is None:
        return _failed(spec.name, "no spawner for an exec probe", tools.clock)
    return await probe_exec(spec.name, spec.command, spec.timeout, tools.spawner,
                            tools.env or {}, tools.cwd, clock=tools.clock)


PROBES: Mapping[str, ProbeFunction] = {
    "postgres": _run_postgres,
    "redis": _run_redis,
    "http": _run_http,
    "tcp": _run_tcp,
    "exec": _run_exec,
}


async def probe_postgres(spec: CheckSpec, bridge: AsyncioThread, *,
                         clock: Clock = time.monotonic) -> CheckResult:
    """asyncpg: connect, run `spec.query` (simple protocol, no prepared statement), close."""
    phase = _Phase("connect")

    async def check() -> None:
        import asyncpg  # imported on the bridge thread, only when a postgres check exists

        conn = await asyncpg.connect(
            spec.target, timeout=spec.timeout, command_timeout=spec.timeout,
            statement_cache_size=0, server_settings={"application_name": APPLICATION_NAME})
        try:
            phase.name = "query"
            await conn.execute(spec.query)
            phase.name = "close"
        finally:
            await _close_pg(conn)

    return await _timed(spec, phase, clock, lambda: bridge.run(check, spec.timeout))


async def _close_pg(conn: object) -> None:
    try:
        await conn.close(timeout=CLOSE_TIMEOUT)  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        conn.terminate()  # type: ignore[attr-defined]
        raise
    except Exception:  # the check's verdict is already known; just drop the socket
        conn.terminate()  # type: ignore[attr-defined]


async def probe_redis(spec: CheckSpec, bridge: AsyncioThread, *,
                      clock: Clock = time.monotonic) -> CheckResult:
    """redis-py: one dedicated connection (auth and db from the URL), PING, close."""
    phase = _Phase("connect")

    async def check() -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = Redis.from_url(
            spec.target, single_connection_client=True, socket_timeout=spec.timeout,
            socket_connect_timeout=spec.timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        try:
            await client.initialize()
            phase.name = "ping"
            if not await client.ping():
                raise RuntimeError("PING did not return PONG")
            phase.name = "close"
        finally:
            await client.aclose()

    return await _timed(spec, phase, clock, lambda: bridge.run(check, spec.timeout))


async def probe_http(spec: CheckSpec, *, client: httpx.AsyncClient | None = None,
                     clock: Clock = time.monotonic) -> CheckResult:
    """GET without following redirects: 2xx and 3xx are healthy. The body is never read.

    `client` lets the caller share one connection-pool-less client across checks (building a
    client loads the CA bundle); without it a client is made and closed per call.
    """
    phase = _Phase("request")

    async def check() -> None:
        if client is None:
            async with _http_client(spec.timeout) as own:
                await _get(own, spec)
        else:
            await _get(client, spec)

    return await _timed(spec, phase, clock, lambda: _native(check, spec.timeout))


def make_http_client(timeout: float = 5.0, max_connections: int | None = 100
                     ) -> httpx.AsyncClient:
    """A client for `probe_http`: no keep-alive (one connection per check, closed after),
    no redirects, and no proxies from the environment (a check measures the direct path)."""
    return _http_client(timeout, max_connections)


def _http_client(timeout: float, max_connections: int | None = 100) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False,
                             trust_env=False,
                             limits=httpx.Limits(max_connections=max_connections,
                                                 max_keepalive_connections=0))


async def _get(client: httpx.AsyncClient, spec: CheckSpec) -> None:
    import httpx

    timeout = httpx.Timeout(spec.timeout)
    async with client.stream("GET", spec.target, timeout=timeout,
                             headers={"User-Agent": APPLICATION_NAME}) as response:
        if not 200 <= response.status_code < 400:
            raise _Unhealthy(f"HTTP {response.status_code}")


async def probe_tcp(spec: CheckSpec, *, clock: Clock = time.monotonic) -> CheckResult:
    """A TCP connect to `host:port`, closed at once."""
    phase = _Phase("connect")

    async def check() -> None:
        host, port = parse_listen(spec.target)
        stream = await anyio.connect_tcp(host, port)
        await stream.aclose()

    return await _timed(spec, phase, clock, lambda: _native(check, spec.timeout))


class _Unhealthy(Exception):
    """The dependency answered, but not well; the message is the whole error text."""


async def _native(check: Callable[[], Awaitable[None]], timeout: float) -> None:
    # The clients' own timeouts apply per phase; this deadline bounds the sum.
    with anyio.fail_after(timeout + NATIVE_GRACE):
        await check()


async def _timed(spec: CheckSpec, phase: _Phase, clock: Clock,
                 run: Callable[[], Awaitable[None]]) -> CheckResult:
    started = clock()
    error: str | None = None
    try:
        await run()
    except _Unhealthy as exc:
        error = str(exc)
    except Exception as exc:  # every client failure becomes a value
        if _is_timeout(exc):
            # Whether our deadline or the client's own timer fired first, say the same thing.
            error = f"timed out after {spec.timeout:g}s ({phase.name})"
        else:
            error = f"{phase.name}: {_describe(exc)}"
    finished = clock()
    latency_ms = (finished - started) * 1000.0
    if error is not None:
        error = _clean(error, spec.target)
        logger.debug("check failed check=%s error=%s", spec.name, error)
    return CheckResult(spec.name, error is None, latency_ms, error, finished)


def _is_timeout(exc: BaseException) -> bool:
    # redis.exceptions.TimeoutError does not derive from the builtin; match it by name so this
    # module need not import redis unless a redis check exists.
    import httpx

    return (isinstance(exc, (TimeoutError, httpx.TimeoutException))
            or type(exc).__name__ == "TimeoutError")


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {lines[0]}" if lines else name


def _clean(text: str, target: str) -> str:
    secrets = url_secrets(target)
    # The whole target too, in case a library echoes it in a form the secrets don't match.
    text = redact_text(" ".join(text.split()), (*secrets, target) if secrets else ())
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 3] + "..."


# Read from an exec probe's stdout/stderr per wakeup; what it prints is discarded (it could
# hold anything), but must be read so that a chatty command never blocks on a full pipe.
_DRAIN_CHUNK = 65536


async def probe_service(service: str, spec: ProbeSpec, *, spawner: ExecSpawner | None = None,
                        env: dict[str, str] | None = None, cwd: str = ".",
                        http_client: httpx.AsyncClient | None = None,
                        clock: Clock = time.monotonic) -> CheckResult:
    """Run one service probe (liveness, readiness or startup); never raises (but cancels)."""
    check = CheckSpec(f"{service}.{spec.kind}", spec.type, spec.target, timeout=spec.timeout,
                      interval=spec.period, command=spec.command)
    return await _dispatch(check, ProbeTools(http_client=http_client, spawner=spawner, env=env,
                                             cwd=cwd, clock=clock))


async def probe_exec(name: str, command: tuple[str, ...], time_limit: float,
                     spawner: ExecSpawner, env: dict[str, str], cwd: str, *,
                     clock: Clock = time.monotonic) -> CheckResult:
    """Run `command` in a new session; exit 0 within `time_limit` passes. Whatever happens, the
    process group is killed and the leader reaped before this returns."""
    from supervisor.core.errors import SpawnError

    started = clock()
    try:
        child = spawner(command, env, cwd)
    except SpawnError as exc:
        return CheckResult(name, False, 0.0, _clean(str(exc), ""), clock())
    error: str | None = None
    try:
        with anyio.move_on_after(time_limit) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_discard, child.stdout)
                tg.start_soon(_discard, child.stderr)
                status = await child.wait()
                tg.cancel_scope.cancel()  # leftovers may hold the pipes open: stop reading
        if scope.cancelled_caught:
            error = f"timed out after {time_limit:g}s (exec)"
        elif status.code != 0:
            error = f"exec: {status.describe()}"
    finally:
        with anyio.CancelScope(shield=True):
            # The group id stays reserved while any member lives, so this reaches what the
            # command left behind even after the leader was reaped.
            child.signal_group(9)
            if child.status is None:
                with anyio.move_on_after(5):
                    await child.wait()
            child.close_if_unreaped()
            for fd in (child.stdout, child.stderr):
                _close(fd)
    finished = clock()
    if error is not None:
        logger.debug("probe failed probe=%s error=%s", name, error)
    return CheckResult(name, error is None, (finished - started) * 1000.0, error, finished)


async def _discard(fd: int) -> None:
    while True:
        await anyio.wait_readable(fd)
        try:
            if not os.read(fd, _DRAIN_CHUNK):
                return
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EIO):
                return
            raise


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
