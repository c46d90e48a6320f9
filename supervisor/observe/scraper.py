"""Fetch each service's metrics endpoint in the background and publish immutable results.

One task per target, each on its own schedule, so a slow target never delays another; one
shared httpx.AsyncClient (works on asyncio and trio). Every fetch runs under its target's
timeout (connect + headers + body) and a body-size cap; parsing runs in a worker thread so a
large payload never stalls the event loop. Every failure becomes a value (`ok=False` with a
short `error` that never contains the URL), never an exception.

Each payload is screened once, in the same worker thread as its parsing (integrity.screen: the
FR52 guard, reserved names, the allow list, promtool's rules): `families` is the payload as
parsed, `passed` what of it may reach /v1/metrics, and the drops are counted in a DropLedger
when the result is published.

Publishing is a reference swap of an immutable mapping, so `snapshot()` can be called from any
thread (the HTTP server's collector threads) and never blocks.

Staleness: a target's data is served for at most `stale_after = 3 * interval + timeout`
seconds after the scrape that produced it. A failed scrape keeps serving the previous good
families (with `ok=False`) until that bound, then they are dropped at read time; a target
whose last attempt is itself older than the bound (scraper stopped) reads as `ok=False`.

`run()`, `set_targets()` and everything else that writes belong to the event loop's thread.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from supervisor.observe.families import (
    DEFAULT_MAX_SERIES,
    ExpositionError,
    SeriesLimitExceeded,
    parse_exposition,
    sample_count,
)
from supervisor.observe.integrity import Drop, DropLedger, Policy, screen

# httpx is imported where it is used: importing it (and, through httpcore, trio) costs about
# 0.1 s, which the daemon would otherwise spend before spawning its services.
if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"  # the format parse_exposition reads
BYTES_PER_SAMPLE = 512  # body cap = max_series * this: generous for long label sets and HELP
STALE_INTERVALS = 3


@dataclass(frozen=True)
class Target:
    url: str
    timeout: float
    policy: Policy = field(default_factory=Policy)  # what of the payload may pass


@dataclass(frozen=True)
class ScrapeResult:
    service: str
    ok: bool
    duration_seconds: float
    families: tuple[Metric, ...]  # the latest good payload (never mutated; relabel copies)
    fetched_at: float  # clock() when this attempt ended
    error: str | None = None
    samples: int = 0  # samples parsed by this attempt (> max_series when it was cut)
    good_at: float | None = None  # clock() of the attempt that produced `families`
    stale_after: float = math.inf  # seconds `families` may be served after good_at
    limited: bool = False  # this attempt was dropped for exceeding max_series or the byte cap
    drops: tuple[Drop, ...] = ()  # families this attempt dropped (see integrity.screen)
    # What of `families` may reach /v1/metrics; None: not screened (a result made by hand).
    passed: tuple[Metric, ...] | None = None

    def served(self) -> tuple[Metric, ...]:
        """The families to re-export: the screened ones (screening now if it never was)."""
        if self.passed is not None:
            return self.passed
        return tuple(screen(self.families, Policy())[0])


TargetsArg = Mapping[str, "Target | tuple[str, float]"]


def _targets(targets: TargetsArg) -> dict[str, Target]:
    return {name: t if isinstance(t, Target) else Target(str(t[0]), float(t[1]))
            for name, t in targets.items()}


class _Failed(Exception):
    def __init__(self, message: str, limited: bool = False, families: int = 1) -> None:
        super().__init__(message)
        self.limited = limited
        self.families = families  # families of a payload dropped for a limit (>= 1)


def parse_and_screen(text: str, openmetrics: bool, max_series: int, policy: Policy
                     ) -> tuple[list[Metric], list[Metric], list[Drop]]:
    """Parse a payload and screen its families (a worker thread's job: both take time); the
    families parsed, those that pass, and the drops."""
    invalid: list[str] = []
    families = parse_exposition(text, max_series, openmetrics=openmetrics, invalid=invalid)
    kept, drops = screen(families, policy)
    drops.extend(Drop(name, "invalid") for name in invalid)
    return families, kept, drops


class _Unanswered(Exception):
    """The peer closed the connection before sending any response (a keep-alive race)."""


class Scraper:
    def __init__(self, targets: TargetsArg, interval: float,
                 max_series: int = DEFAULT_MAX_SERIES,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_bytes: int | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: Callable[[], float] = random.random,
                 ledger: DropLedger | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = float(interval)
        self.max_series = max_series
        self.max_bytes = max_bytes if max_bytes is not None else max_series * BYTES_PER_SAMPLE
        self._clock = clock
        self._transport = transport
        self._targets: dict[str, Target] = _targets(targets)
        self._results: Mapping[str, ScrapeResult] = MappingProxyType({})
        self._changed: anyio.Event | None = None
        self._scopes: dict[str, tuple[Target, anyio.CancelScope]] = {}
        self._rng = rng
        self.ledger = ledger if ledger is not None else DropLedger()
        self._stale: dict[str, tuple[ScrapeResult, bool, ScrapeResult]] = {}  # see _staled
        self._pokes: dict[str, anyio.Event] = {}  # target -> wakes its loop's wait (poke)
        self._health: dict[str, str] = {}  # target -> "up" | "down" | "first-failed": see _log
        self._running = False
        self._client: httpx.AsyncClient | None = None  # http:// targets
        self._tls_client: httpx.AsyncClient | None = None  # https:// targets, made on demand

    def __repr__(self) -> str:
        ok = sum(r.ok for r in self._results.values())
        return (f"<Scraper targets={len(self._targets)} ok={ok} interval={self.interval:g} "
                f"running={self._running}>")

    def stale_after(self, target: Target) -> float:
        return STALE_INTERVALS * self.interval + target.timeout

    # -- reading (any thread) ------------------------------------------------------------------
    def snapshot(self) -> Mapping[str, ScrapeResult]:
        """Per-service results with stale data removed; lock-free, safe from any thread."""
        results = self._results  # one read of the reference: a consistent view
        now = self._clock()
        fresh: dict[str, ScrapeResult] = {}
        for name, result in results.items():
            if now - result.fetched_at > result.stale_after or (
                    result.good_at is not None and now - result.good_at > result.stale_after):
                result = self._staled(name, result, now)
            fresh[name] = result
        return MappingProxyType(fresh)

    def _staled(self, name: str, result: ScrapeResult, now: float) -> ScrapeResult:
        """`result` with its stale parts dropped; the same object on every read until the
        result itself changes, so readers that key caches by identity (the /v1/metrics
        renderer) do not rebuild a stale target on every scrape of their own."""
        unattempted = now - result.fetched_at > result.stale_after
        cached = self._stale.get(name)
        if cached is not None and cached[0] is result and cached[1] == unattempted:
            return cached[2]
        if unattempted:
            staled = replace(result, ok=False, families=(), passed=(), good_at=None,
                             error=result.error or "stale: no recent scrape attempt")
        else:  # attempted lately, but its last good payload is too old to serve
            staled = replace(result, families=(), passed=(), good_at=None)
        self._stale[name] = (result, unattempted, staled)
        return staled

    # -- writing (event loop thread) -----------------------------------------------------------
    def set_targets(self, targets: TargetsArg) -> None:
        """Replace the target set (on reload); changed or removed targets restart or stop."""
        old, self._targets = self._targets, _targets(targets)
        # A changed target (URL, timeout, or what of its payload may pass) starts afresh: its
        # last result was screened by the old policy.
        kept = {k: v for k, v in self._results.items()
                if k in self._targets and old.get(k) == self._targets[k]}
        self._results = MappingProxyType(kept)
        self._health = {k: v for k, v in self._health.items() if k in self._targets}
        if self._changed is not None:
            self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Clients are made on first use, so a daemon without metrics_url never loads httpx.
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    self._changed = anyio.Event()
                    self._reconcile(tg)
                    await self._changed.wait()
        finally:
            self._running = False
            self._changed = None
            self._scopes.clear()
            for client in (self._client, self._tls_client):
                if client is not None:
                    with anyio.CancelScope(shield=True):
                        await client.aclose()
            self._client = self._tls_client = None

    def _new_client(self, verify: bool) -> httpx.AsyncClient:
        # trust_env=False: HTTP(S)_PROXY from the daemon's environment must not route loopback
        # scrapes through a proxy; redirects are not followed (a metrics URL is exact).
        import httpx

        return httpx.AsyncClient(transport=self._transport, trust_env=False, verify=verify,
                                 follow_redirects=False, headers={"Accept": ACCEPT})

    def _reconcile(self, tg: TaskGroup) -> None:
        for name, (target, scope) in list(self._scopes.items()):
            if self._targets.get(name) != target:
                scope.cancel()
                del self._scopes[name]
                self._pokes.pop(name, None)
        for name, target in self._targets.items():
            if name not in self._scopes:
                scope = anyio.CancelScope()
                self._scopes[name] = (target, scope)
                phase = self._rng() * self.interval
                tg.start_soon(self._loop, name, target, scope, phase, name=f"scrape {name}")

    async def _loop(self, name: str, target: Target, scope: anyio.CancelScope,
                    phase: float) -> None:
        # The first scrape is at once (data as soon as possible); after it each target moves
        # to a random phase of the interval, so that 200 targets do not scrape (and parse,
        # holding the GIL) in one burst every interval, which stalled /v1/ready and
        # /v1/metrics for about a second in five.
        with scope:
            while True:
                began = anyio.current_time()
                result = await self.scrape_once(name, target)
                self._publish(result, target)
                # Fixed-rate schedule; an attempt that overran the interval is followed at once,
                # and a poke (the service has just come up) cuts the wait short.
                poked = self._pokes[name] = anyio.Event()
                with anyio.move_on_after(began + self.interval + phase - anyio.current_time()):
                    await poked.wait()
                phase = 0.0

    def set_interval(self, interval: float) -> None:
        """A reload's scrape_interval: every target is scraped now and then on the new
        schedule (a wait begun on the old interval, up to a week, is not sat out)."""
        if interval <= 0:
            raise ValueError("interval must be > 0")
        if float(interval) == self.interval:
            return
        self.interval = float(interval)
        for name in list(self._pokes):
            self.poke(name)

    def poke(self, name: str) -> None:
        """Scrape `name` now rather than at its next turn: its service has just (re)started,
        so the last result is about a process that is gone, or about one not yet listening.
        Event loop thread only."""
        poked = self._pokes.get(name)
        if poked is not None:
            poked.set()

    def _publish(self, result: ScrapeResult, target: Target | None = None) -> None:
        current = self._targets.get(result.service)
        if current is None or (target is not None and target != current):
            return  # removed or changed (by a reload) while its fetch was in flight
        if result.ok or result.limited:  # a payload was judged (else the last one still is)
            self.ledger.record_scrape(result.service, result.drops)
        self._log_change(result)
        previous = self._results.get(result.service)
        if not result.ok and previous is not None and previous.good_at is not None:
            # Keep serving the last good copy until it is stale (checked at read time).
            result = replace(result, families=previous.families, passed=previous.passed,
                             good_at=previous.good_at)
        self._results = MappingProxyType({**self._results, result.service: result})

    def _log_change(self, result: ScrapeResult) -> None:
        """Log a target's scrape state when it changes, not every scrape: going down at
        WARNING with the reason, coming back at INFO. The very first scrape of a target failing
        is logged at INFO only (a service just spawned is often not listening yet, and is
        scraped again as soon as it runs); a second failure in a row is a WARNING."""
        name = result.service
        was = self._health.get(name)
        if result.ok:
            if was in ("down", "first-failed"):
                logger.info("scrape recovered service=%s", name)
            self._health[name] = "up"
        elif was is None:
            logger.info("scrape not answering yet service=%s error=%s", name, result.error)
            self._health[name] = "first-failed"
        elif was != "down":
            logger.warning("scrape failing service=%s error=%s", name, result.error)
            self._health[name] = "down"

    async def scrape_once(self, name: str, target: Target | tuple[str, float]) -> ScrapeResult:
        """One fetch and parse; never raises (except cancellation)."""
        target = target if isinstance(target, Target) else Target(str(target[0]),
                                                                   float(target[1]))
        if not self._running:
            raise RuntimeError("Scraper.run() is not running")
        if target.url.startswith("https://"):
            if self._tls_client is None:
                self._tls_client = self._new_client(verify=True)
            client = self._tls_client
        else:
            # verify=False is safe here because this client only fetches http:// URLs; it
            # spares the daemon the ~5 MiB of a loaded CA bundle.
            if self._client is None:
                self._client = self._new_client(verify=False)
            client = self._client
        started = self._clock()
        families: tuple[Metric, ...] = ()
        passed: list[Metric] = []
        samples = 0
        try:
            with anyio.move_on_after(target.timeout) as deadline:
                body, charset, openmetrics = await self._fetch(client, target)
            if deadline.cancelled_caught:
                raise _Failed(f"timeout after {target.timeout:g}s")
            text = body.decode(charset, errors="replace")
            try:
                # A worker thread: 10,000 samples take tens of milliseconds to parse.
                parsed, passed, drops = await anyio.to_thread.run_sync(
                    parse_and_screen, text, openmetrics, self.max_series, target.policy)
            except SeriesLimitExceeded as exc:
                samples = exc.seen
                raise _Failed(str(exc), limited=True, families=exc.families) from None
            except ExpositionError as exc:
                raise _Failed(str(exc)) from None
            families = tuple(parsed)
            samples = sample_count(families)
        except _Failed as exc:
            logger.debug("scrape failed service=%s error=%s", name, exc)
            limit = (Drop("(whole payload)", "limit", exc.families),) if exc.limited else ()
            return ScrapeResult(name, False, self._clock() - started, (), self._clock(),
                                str(exc), samples, None, self.stale_after(target), exc.limited,
                                limit)
        except Exception as exc:  # anything else a child can provoke is still just a failure
            logger.debug("scrape failed service=%s error=%s", name, type(exc).__name__)
            return ScrapeResult(name, False, self._clock() - started, (), self._clock(),
                                f"unexpected error: {type(exc).__name__}", 0, None,
                                self.stale_after(target))
        done = self._clock()
        return ScrapeResult(name, True, done - started, families, done, None, samples, done,
                            self.stale_after(target), drops=tuple(drops), passed=tuple(passed))

    async def _fetch(self, client: httpx.AsyncClient, target: Target
                     ) -> tuple[bytes, str, bool]:
        """One GET, retried once if the connection closed before any response: a service's
        keep-alive timer (uvicorn's 5 s) that fires as a scrape reuses the connection (every
        5 s) loses nothing but that connection. The retry runs within the same timeout."""
        try:
            return await self._fetch_once(client, target)
        except _Unanswered:
            logger.debug("scrape retried: the peer closed a connection unanswered")
        try:
            return await self._fetch_once(client, target)
        except _Unanswered as exc:
            raise _Failed(str(exc)) from None

    async def _fetch_once(self, client: httpx.AsyncClient, target: Target
                          ) -> tuple[bytes, str, bool]:
        import httpx

        answered = False
        try:
            async with client.stream("GET", target.url,
                                     timeout=httpx.Timeout(target.timeout)) as response:
                answered = True
                if response.status_code != 200:
                    raise _Failed(f"HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise _Failed(f"body larger than {self.max_bytes} bytes", limited=True)
                chunks: list[bytes] = []
                size = 0
                # Stopping early by cancelling rather than breaking out of the loop: the
                # cancellation unwinds httpx's nested async generators, where a `break` would
                # leave them for the garbage collector (trio warns about each one).
                with anyio.CancelScope() as cap:
                    async for chunk in response.aiter_bytes():  # decoded: gzip bombs count too
                        size += len(chunk)
                        if size > self.max_bytes:
                            chunks.clear()
                            cap.cancel()
                        elif not cap.cancel_called:
                            chunks.append(chunk)
                if size > self.max_bytes:
                    raise _Failed(f"body larger than {self.max_bytes} bytes", limited=True)
                # A child may answer OpenMetrics although we asked for text 0.0.4: read it as
                # what it says it is (the text parser would misread its exemplars and EOF).
                openmetrics = response.headers.get("content-type", "").split(";")[0].strip(
                    ).lower() == "application/openmetrics-text"
                return b"".join(chunks), response.charset_encoding or "utf-8", openmetrics
        except httpx.TimeoutException:
            raise _Failed(f"timeout after {target.timeout:g}s") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            if answered:
                raise _Failed(f"{type(exc).__name__}") from None
            raise _Unanswered(f"{type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            # httpx messages can embed the URL (credentials); the class name is enough.
            raise _Failed(f"{type(exc).__name__}") from None
        except OSError as exc:
            raise _Failed(f"{type(exc).__name__}") from None


def scrape_families(snapshot: Mapping[str, ScrapeResult], environment: str) -> list[Metric]:
    """Per-service scrape health, for the daemon's own /v1/metrics."""
    labels = ["service", "environment"]
    up = GaugeMetricFamily("service_scrape_up",
                           "1 if the last fetch of the service's metrics endpoint succeeded.",
                           labels=labels)
    duration = GaugeMetricFamily("service_scrape_duration_seconds",
                                 "How long the last fetch and parse of the service's metrics "
                                 "took.", labels=labels)
    samples = GaugeMetricFamily("service_scrape_samples",
                                "Samples in the service's last payload (over the limit: the "
                                "count when it was cut).", labels=labels)
    limited = GaugeMetricFamily("service_scrape_limit_exceeded",
                                "1 if the service's last payload was dropped for exceeding the "
                                "series or size limit.", labels=labels)
    for name in sorted(snapshot):
        result = snapshot[name]
        values = [name, environment]
        up.add_metric(values, 1.0 if result.ok else 0.0)
        duration.add_metric(values, result.duration_seconds)
        samples.add_metric(values, float(result.samples))
        limited.add_metric(values, 1.0 if result.limited else 0.0)
    return [up, duration, samples, limited]
