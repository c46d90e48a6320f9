"""The daemon's observability half, wired in one place: the HTTP stack and its router, what
/v1/metrics serves (`observe.metrics.Catalogue`), the scrapes of the services' own metrics and
their deny list, the readiness checks behind /v1/ready, and the resource stats sampler.

The daemon imports this module once, after its services are spawned: prometheus_client,
wsgiref, psutil, httpx and asyncio (for the checks' bridge) take about 80 ms to import, and the
services start that much sooner (tests/test_process.py checks it). It reads the daemon through
`DaemonState`, the objects the event loop swaps whole, and never calls back into it.

/v1/metrics goes one way: `SharedRenderMetricsApp` (one render shared by concurrent scrapes,
a kept body while `Catalogue.version` is the same) -> `CachingRenderer` (merge, each source
cached as it declares) -> `Catalogue.sources()` -> the metric functions over snapshots.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry

from supervisor.checks.aioloop import AsyncioThread
from supervisor.checks.readiness import ReadinessMonitor
from supervisor.config import Config
from supervisor.control.status import DaemonFacts, status_document
from supervisor.core.redact import Redactor
from supervisor.observe.denylist import DenyList
from supervisor.observe.instrument import HttpMetrics, instrument_wsgi
from supervisor.observe.integrity import Drop, DropLedger, Policy
from supervisor.observe.metrics import Catalogue, PublishedState, own_process_collector
from supervisor.observe.metrics_endpoint import SharedRenderMetricsApp
from supervisor.observe.render import CachingRenderer
from supervisor.observe.scraper import Scraper, Target
from supervisor.process.procstats import ProcStatsSampler, TreeStats
from supervisor.web import http
from supervisor.web.webauth import WebGate

log = logging.getLogger(__name__)

# Answered by the listener's accepting thread itself (see http.BoundedWSGIServer).
INLINE_PATHS = ("/v1/health", "/v1/ready")
HEARTBEAT_INTERVAL = 1.0  # /v1/health calls the loop wedged after health_stale_after (5 s)


class DaemonState(PublishedState, Protocol):
    """What the observability half reads of the daemon, besides what /v1/metrics shows."""

    @property
    def started_at(self) -> float: ...
    @property
    def health_stale_after(self) -> float: ...
    @property
    def redactor(self) -> Redactor: ...
    @property
    def warnings(self) -> Sequence[str]: ...


class Observability:
    def __init__(self, daemon: DaemonState) -> None:
        config = daemon.config
        self.daemon = daemon
        self.heartbeat = time.monotonic()  # the event loop's last beat (see beat())
        self.sampler = ProcStatsSampler()
        self.bridge = AsyncioThread()
        self.monitor = ReadinessMonitor(config.checks, self.bridge)
        self._monitor_scope: anyio.CancelScope | None = None
        # Families dropped from services' payloads (screening, limits, clashes), counted.
        self.drops = DropLedger()
        self.scraper = Scraper(scrape_targets(config), config.settings.scrape_interval,
                               ledger=self.drops)
        # The daemon's own endpoints are instrumented like any service (service="supervisor").
        http_registry = CollectorRegistry(auto_describe=False)
        self.http_metrics = HttpMetrics(http_registry)
        self.catalogue = Catalogue(daemon, self.scraper, self.drops,
                                   lambda: self.monitor.snapshot(), http_registry,
                                   own_process_collector())
        self.renderer = CachingRenderer(
            self.catalogue.sources, self.catalogue.deny,
            lambda service, family: self.drops.record(service, [Drop(family, "type_clash")]))
        self.metrics_app = SharedRenderMetricsApp(self.renderer.render, self._version)
        # Read per connection and per request: a reload's web config applies to the next one.
        self.gate = WebGate(lambda: self.daemon.config.settings.web_config)
        self.router = self._build_router()
        self.http_server: http.BoundedWSGIServer | None = None

    def _build_router(self) -> http.WSGIApp:
        # INLINE_PATHS are answered on the accepting thread: their handlers must stay
        # non-blocking with small bodies (health reads a clock, ready one snapshot attribute).
        router = http.Router()
        router.add_app("/v1/metrics", self.metrics_app)
        router.add_json("/v1/health", self.health)
        router.add_json("/v1/ready", self.ready)
        router.add_json("/v1/status", self.status)
        known = set(router.paths())
        return instrument_wsgi(self.gate.wsgi(router), self.http_metrics,
                               lambda environ: environ.get("PATH_INFO") if environ.get(
                                   "PATH_INFO") in known else "other")

    def _version(self) -> tuple[object, ...]:
        return self.catalogue.version(self.renderer.clock.token(self.renderer.monotonic()))

    # -- started and stopped by the daemon ------------------------------------------------
    def serve(self, listener: socket.socket) -> http.BoundedWSGIServer:
        """Serve HTTP on the socket the daemon bound before spawning anything."""
        settings = self.daemon.config.settings
        self.http_server, _ = http.serve(settings.listen_host, settings.listen_port,
                                         self.router, settings.max_connections, INLINE_PATHS,
                                         sock=listener, gate=self.gate)
        return self.http_server

    async def start(self, tg: TaskGroup) -> None:
        """The checks' asyncio thread, the readiness checks, the scrapes, the heartbeat."""
        await anyio.to_thread.run_sync(self.bridge.start)
        await self.restart_monitor(tg)
        await tg.start(self.scraper.run)
        tg.start_soon(self.beat)

    async def beat(self) -> None:
        """/v1/health is answered on an HTTP thread; this shows the event loop still runs."""
        while True:
            self.heartbeat = time.monotonic()
            await anyio.sleep(HEARTBEAT_INTERVAL)

    async def restart_monitor(self, tg: TaskGroup) -> None:
        """(Re)start the readiness checks; a reload with other checks replaces the monitor."""
        if self._monitor_scope is not None:
            self._monitor_scope.cancel()
        self.monitor = ReadinessMonitor(self.daemon.config.checks, self.bridge)
        scope = self._monitor_scope = anyio.CancelScope()
        monitor = self.monitor

        async def run_monitor(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await monitor.run(task_status=task_status)

        await tg.start(run_monitor)

    def reconfigure(self, new: Config) -> None:
        """A reload's scrape targets, policies and interval (the web config is read per
        request). The interval applies from each target's next round."""
        self.scraper.set_interval(new.settings.scrape_interval)
        self.scraper.set_targets(scrape_targets(new))
        self.drops.retain(n for n in new.services if new.services[n].metrics_url)

    def stop_serving(self) -> None:
        """socketserver's loop sees a shutdown request only at its next poll (every 0.5 s):
        raise the flag it reads, then make its listening socket readable, so it sees it now."""
        server: Any = self.http_server
        server._BaseServer__shutdown_request = True
        try:
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.shutdown()

    def close_server(self) -> None:
        assert self.http_server is not None
        self.http_server.shutdown()
        self.http_server.server_close()

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.bridge.stop)

    async def sample_stats(self) -> dict[str, TreeStats]:
        """Every service's process figures, sampled in a worker thread (psutil, /proc)."""
        snapshots = self.daemon.snapshots
        leaders = {name: s.pid for name, s in snapshots.items() if s.pid is not None}
        groups = {name: s.cgroup for name, s in snapshots.items() if s.cgroup is not None}
        sampled = await anyio.to_thread.run_sync(self.sampler.sample, leaders, groups)
        return {name: sampled.get(name) or TreeStats(self.sampler.cpu_carried(name), 0, 0, 0, 0)
                for name in self.daemon.snapshots}

    def poke(self, service: str) -> None:
        """`service` runs (again): scrape it now rather than up to two intervals on."""
        self.scraper.poke(service)

    # -- views read from HTTP threads (and the control socket) ----------------------------
    def health(self) -> tuple[int, dict[str, Any]]:
        lag = time.monotonic() - self.heartbeat
        healthy = lag < self.daemon.health_stale_after
        body = {"status": "healthy" if healthy else "unhealthy",
                "uptime_seconds": round(time.monotonic() - self.daemon.started_at, 3),
                "loop_heartbeat_age_seconds": round(lag, 3)}
        return (200 if healthy else 503), body

    def ready(self) -> tuple[int, dict[str, Any]]:
        daemon = self.daemon
        body = self.monitor.snapshot().body()
        if daemon.config.settings.ready_includes_services:
            # Every service with a readiness probe must be ready too (one snapshot read).
            services = {name: s.is_ready for name, s in daemon.snapshots.items()
                        if s.ready is not None}
            body["services"] = services
            if not all(services.values()):
                body["status"] = "not_ready"
        if daemon.redactor.secrets:
            body = daemon.redactor.redact_obj(body)
        return (200 if body["status"] == "ready" else 503), body

    def status(self) -> tuple[int, dict[str, Any]]:
        daemon = self.daemon
        config = daemon.config
        facts = DaemonFacts(config.settings.environment, config.path, daemon.started_at,
                            daemon.last_reload_ok, daemon.warnings)
        scrapes, dropped, dropping = (self.scraper.snapshot(), self.drops.counts(),
                                      self.drops.current())
        document = status_document(facts, daemon.snapshots, scrapes, dropped, dropping,
                                   self.monitor.snapshot().body())
        return 200, daemon.redactor.redact_obj(document)


def scrape_targets(config: Config) -> dict[str, Target]:
    """Each service with a metrics_url, with its screening policy."""
    deny = DenyList(config.settings.deny_metrics)
    return {name: Target(spec.metrics_url, spec.scrape_timeout, Policy(
                deny, spec.allow_metrics if spec.allow_metrics is not None
                else config.settings.allow_metrics))
            for name, spec in config.services.items() if spec.metrics_url}

