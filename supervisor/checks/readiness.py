"""Background dependency checks and the immutable snapshot that /v1/ready and metrics read.

`ReadinessMonitor.run()` runs every check on its own interval, concurrently, each probe bounded
by its timeout (see `probes`). After each probe it publishes a new `ReadinessSnapshot` by
swapping one attribute reference: readers in HTTP server threads call `snapshot()`, which only
loads that reference, so they never block, never touch an event loop, and a burst of requests
never opens a connection to a dependency.

Freshness is judged when the snapshot is read, with `time.monotonic()`: a result older than
twice its check's interval counts as failed, so a stalled monitor never reports stale success.
(When a check's timeout exceeds its interval, the bound widens to interval + timeout, the
longest a healthy result can legitimately wait for its successor.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from prometheus_client.core import GaugeMetricFamily, Metric

from supervisor.checks.aioloop import AsyncioThread
from supervisor.checks.probes import CheckResult, make_http_client, probe
from supervisor.config import CheckSpec

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
SERVICE_LABEL = "supervisor"


def stale_after(spec: CheckSpec) -> float:
    """Age (seconds) beyond which a check's latest result no longer counts."""
    return max(2.0 * spec.interval, spec.interval + spec.timeout)


@dataclass(frozen=True)
class ReadinessSnapshot:
    """The latest result of every configured check; read-only, safe to share across threads.

    Use one `body()` per HTTP response and derive the status code from its `"status"`, so the
    code and the body are judged at the same instant.
    """

    specs: Mapping[str, CheckSpec]
    results: Mapping[str, CheckResult]
    generation: int = 0  # bumped on every publish; lets tests prove reads trigger no checks
    clock: Clock = field(default=time.monotonic, compare=False, repr=False)

    def effective(self, now: float | None = None) -> dict[str, CheckResult]:
        """Each check's result as it counts at `now`: missing or stale ones are failures."""
        now = self.clock() if now is None else now
        out: dict[str, CheckResult] = {}
        for name, spec in self.specs.items():
            result = self.results.get(name)
            if result is None:
                out[name] = CheckResult(name, False, 0.0, "no result yet", now)
                continue
            age = now - result.checked_at
            if result.healthy and age > stale_after(spec):
                out[name] = CheckResult(name, False, result.latency_ms,
                                        f"stale: last result {age:.1f}s old", result.checked_at)
            else:
                out[name] = result
        return out

    def healthy(self, names: Iterable[str], now: float | None = None) -> bool:
        current = self.effective(now)
        return all(current[name].healthy for name in names)

    @property
    def ready(self) -> bool:
        return all(r.healthy for r in self.effective().values())

    def body(self, now: float | None = None) -> dict[str, Any]:
        """The /v1/ready JSON document (200 when `status == "ready"`, else 503)."""
        current = self.effective(now)
        checks: dict[str, dict[str, Any]] = {}
        for name, result in current.items():
            entry: dict[str, Any] = {"name": name, "healthy": result.healthy,
                                     "latency_ms": round(result.latency_ms, 1)}
            if not result.healthy:
                entry["error"] = result.error or "failed"
            checks[name] = entry
        ready = all(r.healthy for r in current.values())
        return {"status": "ready" if ready else "not_ready", "checks": checks}


class ReadinessMonitor:
    """Runs the checks in the background; `snapshot()` is the only thing readers touch."""

    def __init__(self, checks: Mapping[str, CheckSpec], bridge: AsyncioThread, *,
                 clock: Clock = time.monotonic,
                 http_client_factory: Callable[[], httpx.AsyncClient] = make_http_client,
                 ) -> None:
        self._specs: Mapping[str, CheckSpec] = MappingProxyType(dict(checks))
        self._bridge = bridge
        self._clock = clock
        self._http_client_factory = http_client_factory
        self._snapshot = ReadinessSnapshot(self._specs, MappingProxyType({}), 0, clock)
        self._changed: anyio.Event | None = None  # created lazily: needs a running loop

    def __repr__(self) -> str:
        snap = self._snapshot
        return (f"<ReadinessMonitor checks={list(self._specs)} generation={snap.generation} "
                f"ready={snap.ready}>")

    @property
    def checks(self) -> Mapping[str, CheckSpec]:
        return self._specs

    def snapshot(self) -> ReadinessSnapshot:
        """Thread-safe and non-blocking: one attribute load of an immutable object."""
        return self._snapshot

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Check forever (until cancelled); `started` once every check's loop is scheduled."""
        http = None
        if any(spec.type == "http" for spec in self._specs.values()):
            http = self._http_client_factory()
        try:
            async with anyio.create_task_group() as tg:
                for spec in self._specs.values():
                    tg.start_soon(self._check_loop, spec, http, name=f"check:{spec.name}")
                task_status.started()
                if not self._specs:
                    await anyio.sleep_forever()
        finally:
            if http is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await http.aclose()

    async def _check_loop(self, spec: CheckSpec, http: httpx.AsyncClient | None) -> None:
        due = self._clock()
        while True:
            result = await probe(spec, self._bridge, http_client=http, clock=self._clock)
            self._publish(result)
            # Ticks are anchored to the first round so latency does not drift the schedule;
            # a probe slower than the interval skips the ticks it missed instead of bursting.
            due += spec.interval
            now = self._clock()
            if due < now:
                due = now
            await anyio.sleep(due - now)

    def _publish(self, result: CheckResult) -> None:
        # Runs on the event loop thread only, with no await between read and swap, so
        # concurrent check loops never lose each other's results.
        old = self._snapshot
        previous = old.results.get(result.name)
        if previous is None or previous.healthy != result.healthy:
            level = logging.INFO if result.healthy else logging.WARNING
            logger.log(level, "check %s check=%s latency_ms=%.1f error=%s",
                       "healthy" if result.healthy else "unhealthy", result.name,
                       result.latency_ms, result.error)
        results = dict(old.results)
        results[result.name] = result
        self._snapshot = ReadinessSnapshot(self._specs, MappingProxyType(results),
                                           old.generation + 1, self._clock)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_healthy(self, names: Iterable[str], timeout: float) -> bool:
        """True as soon as every named check passes; False if `timeout` passes first."""
        wanted = tuple(names)
        unknown = [n for n in wanted if n not in self._specs]
        if unknown:
            raise ValueError(f"unknown checks: {', '.join(unknown)}")
        with anyio.move_on_after(timeout):
            while True:
                if self._snapshot.healthy(wanted):
                    return True
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        return False


def collect_families(snapshot: ReadinessSnapshot, environment: str,
                     now: float | None = None) -> list[Metric]:
    """Per-check gauges for a custom collector; pure, no I/O (runs in scrape threads)."""
    labels = ["service", "environment", "check"]
    up = GaugeMetricFamily(
        "dependency_up",
        "Whether the dependency check passed within its freshness bound (1) or not (0).",
        labels=labels)
    duration = GaugeMetricFamily(
        "dependency_check_duration_seconds",
        "Duration of the latest dependency check, in seconds.",
        labels=labels)
    for name, result in snapshot.effective(now).items():
        values = [SERVICE_LABEL, environment, name]
        up.add_metric(values, 1.0 if result.healthy else 0.0)
        if name in snapshot.results:
            duration.add_metric(values, result.latency_ms / 1000.0)
    return [up, duration]
