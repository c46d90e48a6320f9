"""The I/O of one service process's probes (startup, liveness, readiness), as in Kubernetes.

`run_probes` runs for one process of a service, from its spawn until its exit (the runner
cancels it): `initial_delay`, then the startup probe until it passes once (its
failure_threshold exhausted: `failed("startup", error)`), then liveness and readiness
concurrently, every `period`. Liveness failing `failure_threshold` times in a row calls
`failed("liveness", error)` and ends; readiness flips the service's ready flag after
`success_threshold` passes or `failure_threshold` failures in a row.

Each probe is bounded by its `timeout` (see probes.py: the same bounded clients and redaction
as the readiness checks) and runs as a task on the event loop, never in it: nothing here
blocks the loop or the HTTP server. http probes share one client per event loop, built once
in a worker thread (building one loads the CA bundle: about 20 ms that would otherwise stall
the loop at every spawn of a probed service). The verdicts go back through `report`, which only
updates the runner's state on the loop thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import anyio
from anyio.lowlevel import RunVar

from supervisor.checks.probes import CheckResult, ExecSpawner, make_http_client, probe_service
from supervisor.config import ProbeSpec

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# The http probes' client, per event loop (a client's pool belongs to the loop that first uses
# it); no keep-alive, so it holds no connection between probes, and no cap on connections at
# once (each probe is bounded by its own timeout instead).
_HTTP: RunVar[httpx.AsyncClient] = RunVar("probe_http_client")
_HTTP_LOCK: RunVar[anyio.Lock] = RunVar("probe_http_client_lock")


async def shared_http_client() -> httpx.AsyncClient:
    try:
        return _HTTP.get()
    except LookupError:
        pass
    try:
        lock = _HTTP_LOCK.get()
    except LookupError:
        lock = anyio.Lock()
        _HTTP_LOCK.set(lock)
    async with lock:
        try:
            return _HTTP.get()
        except LookupError:
            client = await anyio.to_thread.run_sync(
                lambda: make_http_client(max_connections=None))
            _HTTP.set(client)
            return client


Report = Callable[[str, CheckResult], None]  # (kind, result): every attempt
Failed = Callable[[str, str], None]  # (kind, error): liveness/startup gave up -> restart
Ready = Callable[[bool, "str | None"], None]  # the readiness verdict changed


async def run_probes(service: str, probes: Mapping[str, ProbeSpec], *, report: Report,
                     failed: Failed, ready: Ready, spawner: ExecSpawner,
                     env: dict[str, str], cwd: str) -> None:
    """Probe one process until cancelled (or until liveness or startup gives up)."""
    startup = probes.get("startup")
    if startup is not None:
        if not await _until_started(service, startup, report, failed, spawner, env, cwd):
            return
    async with anyio.create_task_group() as tg:
        liveness = probes.get("liveness")
        readiness = probes.get("readiness")
        if liveness is not None:
            tg.start_soon(_liveness, service, liveness, report, failed, spawner, env, cwd,
                          tg.cancel_scope)
        if readiness is not None:
            tg.start_soon(_readiness, service, readiness, report, ready, spawner, env, cwd,
                          startup is not None)


class _Prober:
    """One probe's schedule and client: attempts every `period`, anchored to the first."""

    def __init__(self, service: str, spec: ProbeSpec, spawner: ExecSpawner,
                 env: dict[str, str], cwd: str) -> None:
        self.service, self.spec = service, spec
        self.spawner, self.env, self.cwd = spawner, env, cwd

    async def attempts(self, skip_delay: bool = False):  # type: ignore[no-untyped-def]
        """Yield one CheckResult per period (an async generator; close it to stop)."""
        if not skip_delay and self.spec.initial_delay > 0:
            await anyio.sleep(self.spec.initial_delay)
        client = await shared_http_client() if self.spec.type == "http" else None
        due = time.monotonic()
        while True:
            yield await self._attempt(client)
            due += self.spec.period
            now = time.monotonic()
            if due < now:  # a probe slower than its period skips ticks, never bursts
                due = now
            await anyio.sleep(due - now)

    async def _attempt(self, client: httpx.AsyncClient | None) -> CheckResult:
        try:
            return await probe_service(self.service, self.spec, spawner=self.spawner,
                                       env=self.env, cwd=self.cwd, http_client=client)
        except Exception as exc:  # noqa: BLE001 - a probe's own failure is a failed attempt
            # (e.g. no file descriptor left for an exec probe's pipes), never a fault of the
            # service's runner.
            log.warning("probe error service=%s probe=%s error=%s", self.service,
                        self.spec.kind, type(exc).__name__)
            return CheckResult(f"{self.service}.{self.spec.kind}", False, 0.0,
                               f"internal error: {type(exc).__name__}", time.monotonic())


async def _until_started(service: str, spec: ProbeSpec, report: Report, failed: Failed,
                         spawner: ExecSpawner, env: dict[str, str], cwd: str) -> bool:
    consecutive = 0
    gen = _Prober(service, spec, spawner, env, cwd).attempts()
    try:
        async for result in gen:
            report("startup", result)
            if result.healthy:
                log.info("started service=%s probe=startup", service)
                return True
            consecutive += 1
            if consecutive >= spec.failure_threshold:
                failed("startup", result.error or "failed")
                return False
    finally:
        await gen.aclose()
    return False  # pragma: no cover - the generator never ends by itself


async def _liveness(service: str, spec: ProbeSpec, report: Report, failed: Failed,
                    spawner: ExecSpawner, env: dict[str, str], cwd: str,
                    scope: anyio.CancelScope) -> None:
    consecutive = 0
    gen = _Prober(service, spec, spawner, env, cwd).attempts()
    try:
        async for result in gen:
            report("liveness", result)
            consecutive = 0 if result.healthy else consecutive + 1
            if consecutive >= spec.failure_threshold:
                failed("liveness", result.error or "failed")
                scope.cancel()  # the process is being restarted: probe it no more
                return
    finally:
        await gen.aclose()


async def _readiness(service: str, spec: ProbeSpec, report: Report, ready: Ready,
                     spawner: ExecSpawner, env: dict[str, str], cwd: str,
                     after_startup: bool) -> None:
    passes = fails = 0
    state = False  # a process is not ready until its probe says so
    # After a startup probe, initial_delay has already passed (as in Kubernetes, the other
    # probes start once startup succeeds).
    gen = _Prober(service, spec, spawner, env, cwd).attempts(skip_delay=after_startup)
    try:
        async for result in gen:
            report("readiness", result)
            if result.healthy:
                passes, fails = passes + 1, 0
                if not state and passes >= spec.success_threshold:
                    state = True
                    ready(True, None)
            else:
                passes, fails = 0, fails + 1
                if state and fails >= spec.failure_threshold:
                    state = False
                    ready(False, result.error or "failed")
    finally:
        await gen.aclose()
