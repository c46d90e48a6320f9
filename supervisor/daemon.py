"""The composition root: owns the top task group and wires runners, HTTP, stats and signals.

Start order follows `depends_on` (a service starts once its dependencies run -- or, for one
with a readiness probe, are ready -- or exited successfully; until then it is `waiting`, with
the reason); stop order is the reverse (a
service is stopped once everything depending on it has stopped); services without a relation
start and stop concurrently.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup

from supervisor.config import Config, ServiceSpec, load_config
from supervisor.control import rundir
from supervisor.control.notify import watchdog_interval, watchdog_loop
from supervisor.control.server import ControlSocket, default_socket_path, serve_control
from supervisor.control.status import status_document
from supervisor.core import lifecycle as lc
from supervisor.core.errors import ConfigError, SupervisorError
from supervisor.core.redact import LogRedactor, Redactor, config_secrets
from supervisor.process import cgroup as cgroups
from supervisor.process import descendants, reaper
from supervisor.process.guard import OrphanGuard
from supervisor.process.spawn import Child, become_subreaper, spawn
from supervisor.process.stopbatch import StopBatch, stop_levels
from supervisor.runner import ServiceRunner, ServiceSnapshot, Spawner
from supervisor.web import listen

# The HTTP, metrics, checks and stats stack (prometheus_client, wsgiref, psutil, asyncio for
# the bridge: about 80 ms of imports) is imported by Daemon._observe, once the services are
# spawned, so that they start that much sooner.
if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from supervisor.checks.aioloop import AsyncioThread
    from supervisor.checks.readiness import ReadinessMonitor
    from supervisor.observe.denylist import DenyList
    from supervisor.observe.instrument import HttpMetrics
    from supervisor.observe.integrity import DropLedger
    from supervisor.observe.metrics import MetricsView
    from supervisor.observe.metrics_endpoint import SharedRenderMetricsApp
    from supervisor.observe.render import CachingRenderer, Source, Ticker
    from supervisor.observe.scraper import Scraper, ScrapeResult, Target
    from supervisor.process.procstats import ProcStatsSampler, TreeStats
    from supervisor.web.http import BoundedWSGIServer, WSGIApp
    from supervisor.web.webauth import WebGate

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000  # see run(): gc.set_threshold under `supervisor run`
HEARTBEAT_INTERVAL = 1.0  # /v1/health calls the loop wedged after health_stale_after (5 s)
CLOCK_RESOLUTION = 0.1  # s; /v1/metrics' uptimes and own process figures are at most this old
# Answered by the listener's accepting thread itself (see http.BoundedWSGIServer).
INLINE_PATHS = ("/v1/health", "/v1/ready")
# sd_notify STATUS= follows state changes, at most once per this many seconds (1000 services
# flapping send 5 datagrams a second, not thousands).
STATUS_MIN_INTERVAL = 0.2


class Notifier(Protocol):
    def ready(self) -> object: ...
    def status(self, text: str) -> object: ...
    def reloading(self) -> object: ...
    def stopping(self) -> object: ...
    def watchdog(self) -> object: ...


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    problems: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    error: str | None = None  # refused without reading the file (the daemon is stopping)


class Daemon:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None,
                 notifier: Notifier | None = None, handle_signals: bool = True,
                 subreaper: bool = False, health_stale_after: float = 5.0,
                 freeze_gc: bool = False, spawner: Spawner | None = None,
                 log_redactor: LogRedactor | None = None) -> None:
        self.config = config
        # Masks the config's secrets in every string that leaves: HTTP bodies, control replies
        # and (through `log_redactor`, the CLI's log handler filter) log records.
        self.redactor = _redactor(config)
        self.log_redactor = log_redactor
        if log_redactor is not None:
            log_redactor.redactor = self.redactor
        self.environ = dict(os.environ if environ is None else environ)
        self.notifier = notifier
        self.handle_signals = handle_signals
        self.subreaper = subreaper
        self.health_stale_after = health_stale_after
        self.freeze_gc = freeze_gc  # the process is ours alone (not a test's, not embedded)
        self.spawner = spawner  # (argv, env, cwd) -> Child; default: spawn() with the guard
        self.started_at = time.monotonic()
        self.heartbeat = time.monotonic()
        self.snapshots: Mapping[str, ServiceSnapshot] = {}  # swapped whole, read by HTTP threads
        self.stats: Mapping[str, TreeStats] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_ok = True
        self.runners: dict[str, ServiceRunner] = {}
        self._runner_scopes: dict[str, anyio.CancelScope] = {}
        # Kills every service if this process dies without stopping them (see guard.py).
        self.guard = OrphanGuard()
        # A cgroup per service (cgroup.py), made in run(); None: fallback containment.
        self.cgroups: cgroups.CgroupTree | None = None
        self._empty_watcher: cgroups.EmptyWatcher | None = None
        self._placer: cgroups.Placer | None = None
        # Built once per deny_metrics tuple; the render caches each family's answer per list.
        self._deny: tuple[tuple[str, ...], DenyList] | None = None
        self._shutdown: anyio.Event | None = None  # anyio primitives need the running loop
        self._observing: anyio.Event | None = None  # set once _observe() has built the stack
        self._tg: TaskGroup | None = None
        self._start_scopes: set[anyio.CancelScope] = set()  # pending starts, cancelled at shutdown
        self._monitor_scope: anyio.CancelScope | None = None
        self._states_changed: anyio.Event | None = None  # set when a service's state changes
        self._last_status: str | None = None  # the last STATUS= sent
        self._reload_lock: anyio.Lock | None = None  # one reload at a time (SIGHUP, socket)
        self._stopping_sent = False  # STOPPING=1 went out: no READY=1 may follow it
        # Per service name, the counters of runners a reload replaced or removed: starts and
        # exits count for the daemon's lifetime, so a new runner for the name carries them on.
        self._retired: dict[str, tuple[int, dict[str, int], dict[str, int]]] = {}
        self._replacing: frozenset[str] = frozenset()  # runners a reload is stopping for good
        self.listen_address: tuple[str, int] | None = None
        self.warnings: tuple[str, ...] = ()  # shown in /v1/status and `supervisor status`
        self.http_server: BoundedWSGIServer | None = None
        self.control_socket = config.settings.control_socket or default_socket_path(self.environ)

    def _observe(self) -> None:
        """Build the HTTP, metrics, readiness, scrape and stats stack (and import it)."""
        from prometheus_client import CollectorRegistry

        from supervisor.checks.aioloop import AsyncioThread
        from supervisor.checks.readiness import ReadinessMonitor
        from supervisor.observe.instrument import HttpMetrics
        from supervisor.observe.integrity import Drop, DropLedger
        from supervisor.observe.metrics import own_process_collector
        from supervisor.observe.render import CachingRenderer, Ticker
        from supervisor.observe.scraper import Scraper
        from supervisor.process.procstats import ProcStatsSampler
        from supervisor.web.webauth import WebGate

        config = self.config
        self._sampler: ProcStatsSampler = ProcStatsSampler()
        self.bridge: AsyncioThread = AsyncioThread()
        self.monitor: ReadinessMonitor = ReadinessMonitor(config.checks, self.bridge)
        # Families dropped from services' payloads (screening, limits, clashes), counted.
        self.drops: DropLedger = DropLedger()
        self.scraper: Scraper = Scraper(self._scrape_targets(config),
                                        config.settings.scrape_interval, ledger=self.drops)
        # The daemon's own endpoints are instrumented like any service (service="supervisor").
        self._http_registry = CollectorRegistry(auto_describe=False)
        self.http_metrics: HttpMetrics = HttpMetrics(self._http_registry)
        self._own_process = own_process_collector()
        self._clock_tick: Ticker = Ticker(CLOCK_RESOLUTION)
        self.renderer: CachingRenderer = CachingRenderer(
            self._metric_sources, self._deny_list,
            lambda service, family: self.drops.record(service, [Drop(family, "type_clash")]))
        # Read per connection and per request: a reload's web config applies to the next one.
        self.gate: WebGate = WebGate(lambda: self.config.settings.web_config)
        self.router: WSGIApp = self._build_router()

    # -- views read from HTTP threads -----------------------------------------------------
    def metrics_view(self) -> MetricsView:
        from supervisor.observe.metrics import MetricsView

        return MetricsView(self.config.settings.environment, self.snapshots, self.stats,
                           dict(self.reloads), self.last_reload_ok)

    def health(self) -> tuple[int, dict[str, Any]]:
        lag = time.monotonic() - self.heartbeat
        healthy = lag < self.health_stale_after
        body = {"status": "healthy" if healthy else "unhealthy",
                "uptime_seconds": round(time.monotonic() - self.started_at, 3),
                "loop_heartbeat_age_seconds": round(lag, 3)}
        return (200 if healthy else 503), body

    def status(self) -> tuple[int, dict[str, Any]]:
        return 200, self.redactor.redact_obj(status_document(self))

    def ready(self) -> tuple[int, dict[str, Any]]:
        body = self.monitor.snapshot().body()
        if self.config.settings.ready_includes_services:
            # Every service with a readiness probe must be ready too (one snapshot read).
            services = {name: s.is_ready for name, s in self.snapshots.items()
                        if s.ready is not None}
            body["services"] = services
            if not all(services.values()):
                body["status"] = "not_ready"
        if self.redactor.secrets:
            body = self.redactor.redact_obj(body)
        return (200 if body["status"] == "ready" else 503), body

    def _deny_list(self) -> DenyList:
        from supervisor.observe.denylist import DenyList

        patterns = self.config.settings.deny_metrics
        if self._deny is None or self._deny[0] is not patterns:  # a reload made new settings
            self._deny = (patterns, DenyList(patterns))
        return self._deny[1]

    def _scrape_targets(self, config: Config) -> dict[str, Target]:
        from supervisor.observe.denylist import DenyList
        from supervisor.observe.integrity import Policy
        from supervisor.observe.scraper import Target

        deny = DenyList(config.settings.deny_metrics)
        return {name: Target(spec.metrics_url, spec.scrape_timeout, Policy(
                    deny, spec.allow_metrics if spec.allow_metrics is not None
                    else config.settings.allow_metrics))
                for name, spec in config.services.items() if spec.metrics_url}

    def _metric_sources(self) -> list[Source]:
        """What /v1/metrics merges, in precedence order. Keyed sources are re-rendered only
        when their key objects change (the loop swaps snapshots and stats whole)."""
        from supervisor.checks.readiness import collect_families
        from supervisor.observe.families import relabel
        from supervisor.observe.integrity import drop_families
        from supervisor.observe.metrics import (
            SELF,
            config_families,
            live_service_families,
            resource_families,
            service_families,
        )
        from supervisor.observe.render import Source

        env = self.config.settings.environment
        view = self.metrics_view()
        now = time.monotonic()
        tick = self._clock_tick.token(now)
        scrapes = self.scraper.snapshot()
        readiness = self.monitor.snapshot()
        drop_token = self.drops.token
        dropped = self.drops.counts()
        sources = [
            Source("services", lambda: service_families(view), (view.services, env)),
            Source("resources", lambda: resource_families(view),
                   (view.services, view.stats, env)),
            # Uptimes and the daemon's own process figures move with the clock; they are
            # rebuilt at most once per CLOCK_RESOLUTION (0.1 s), not on every scrape: with 200
            # services that was ~2.5 ms of each render.
            Source("services-live", lambda: live_service_families(view, now),
                   (view.services, env, tick)),
            Source("config", lambda: config_families(view)),
            Source("process", lambda: relabel(self._own_process.collect(), SELF, env),
                   (env, tick)),
            Source("http", lambda: relabel(self._http_registry.collect(), SELF, env)),
            Source("readiness", lambda: collect_families(readiness, env)),
            # The token first: the ledger swaps its counts before its token.
            Source("scrape-drops", functools.partial(drop_families, dropped, env),
                   (drop_token, env)),
        ]
        # One source per scraped service, keyed by its latest result: its scrape health
        # first (so the daemon's series win over a child's same-named ones), then its own
        # families relabelled. Re-rendered once per scrape of that service.
        for name in sorted(scrapes):
            result = scrapes[name]
            sources.append(Source("service:" + name,
                                  functools.partial(_scraped_service, result, env),
                                  (result, env), service=name))
        return sources

    def _metrics_version(self) -> tuple[object, ...]:
        """What a kept /v1/metrics body must match to be served again: the clock tick, and
        every object the loop swaps whole when something an operator acts on changes."""
        return (self._clock_tick.token(time.monotonic()), self.snapshots, self.stats,
                self.monitor.snapshot(), self.config, self.last_reload_ok)

    def _build_router(self) -> WSGIApp:
        # INLINE_PATHS are answered on the accepting thread: their handlers must stay
        # non-blocking with small bodies (health reads a clock, ready one snapshot attribute).
        from supervisor.observe.instrument import instrument_wsgi
        from supervisor.observe.metrics_endpoint import SharedRenderMetricsApp
        from supervisor.web.http import Router

        router = Router()
        self.metrics_app: SharedRenderMetricsApp = SharedRenderMetricsApp(
            self.renderer.render, self._metrics_version)
        router.add_app("/v1/metrics", self.metrics_app)
        router.add_json("/v1/health", self.health)
        router.add_json("/v1/ready", self.ready)
        router.add_json("/v1/status", self.status)
        known = set(router.paths())
        return instrument_wsgi(self.gate.wsgi(router), self.http_metrics,
                               lambda environ: environ.get("PATH_INFO") if environ.get(
                                   "PATH_INFO") in known else "other")

    # -- lifecycle ------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        """Thread-unsafe: call from the daemon's event loop (signals do)."""
        assert self._shutdown is not None, "daemon not running"
        self._shutdown.set()

    def shutting_down(self) -> bool:
        """Shutdown has been requested: nothing may start services or reload any more."""
        return self._shutdown is not None and self._shutdown.is_set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        settings = self.config.settings
        # Both sockets are taken before anything is spawned: a second daemon with the same
        # control socket or port is refused before it has started a single service. (Binding
        # is cheap; the heavy imports are what _observe defers.)
        control = ControlSocket(self.control_socket, settings.control_socket_group)
        try:
            listener = listen.bind(settings.listen_host, settings.listen_port)
        except OSError as exc:
            control.close()
            raise SupervisorError(f"cannot listen on {settings.listen_host}:"
                                  f"{settings.listen_port}: {exc.strerror or exc}") from None
        self._shutdown = anyio.Event()
        self._observing = anyio.Event()
        self._states_changed = anyio.Event()
        self._reload_lock = anyio.Lock()
        bound_host, bound_port = listener.getsockname()[:2]
        self.listen_address = (str(bound_host), int(bound_port))
        scheme = "https" if settings.web_config and settings.web_config.tls else "http"
        log.info("listening address=%s://%s/v1/metrics", scheme,
                 _host_port(*self.listen_address))
        web = settings.web_config
        if web is not None:
            log.info("web config path=%s tls=%s client_auth=%s basic_auth_users=%d",
                     web.path, "on" if web.tls else "off", web.client_auth_type, len(web.users))
        self._check_exposure()
        self._write_status_file(control.directory)
        if self.subreaper:
            become_subreaper()
        server = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.handle_signals:
                    await tg.start(self._watch_signals)
                if self.subreaper:
                    await tg.start(reaper.reap_orphans, self._owned_pids)
                self._setup_cgroups(tg)
                # Services first: checks, scrapes and the control socket are not needed to
                # spawn them, and starting those (imports, threads) would delay every service.
                for spec in self.config.services.values():
                    await self._add_runner(spec)
                await self._spawn_independent()
                # Requests that arrived meanwhile wait in the listen backlog.
                self._observe()
                from supervisor.web.http import serve

                server, _ = serve(settings.listen_host, settings.listen_port, self.router,
                                  settings.max_connections, INLINE_PATHS, sock=listener,
                                  gate=self.gate)
                self.http_server = server
                self._observing.set()
                await anyio.to_thread.run_sync(self.bridge.start)
                await self._start_monitor()
                await tg.start(self.scraper.run)
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._sample_stats)
                await tg.start(serve_control, self, control)
                interval = watchdog_interval(self.environ)
                if self.notifier is not None and interval is not None:
                    tg.start_soon(watchdog_loop, self.notifier, interval)
                if self.notifier is not None:
                    tg.start_soon(self._refresh_status)
                tg.start_soon(self._start_all, self._dependent_autostarts())
                # Everything that exists now (modules, classes, the loop) lives as long as the
                # daemon: move it out of the collector's sight, so that full collections, which
                # the scrapes' churn triggers every second or so at 200 services, scan only
                # newer objects (a 25 ms pause in every /v1/metrics render it hits -> 8 ms).
                if self.freeze_gc:
                    gc.freeze()
                    # Scrapes keep ~16,000 new long-lived objects a second at 200 services, so
                    # with the default thresholds (700, 10, 10) a full collection ran every
                    # second or two, holding the GIL 10-50 ms: the worst /v1/metrics waits.
                    # Young collections every 10,000 net allocations make full ones rare;
                    # /v1/metrics p99 with 20 scrapers: 52-139 -> 37-53 ms (asyncio).
                    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
                self._notify("ready")
                self._notify_status()
                task_status.started()
                await self._shutdown.wait()
                log.info("shutting down services=%d", len(self.runners))
                self._notify("stopping")
                # While the services stop, not after them (it took up to 0.5 s).
                tg.start_soon(anyio.to_thread.run_sync, _stop_serving, server)
                for scope in self._start_scopes:
                    scope.cancel()
                # Shielded so that cancellation still stops every child, bounded so that a
                # runner that died cannot hold the daemon forever.
                bound = max((r.spec.stop_timeout for r in self.runners.values()), default=0) + 10
                with anyio.move_on_after(bound, shield=True):
                    await self._stop_services(list(self.runners))
                    if self.subreaper:
                        await self._sweep()
                    await self._end_runners()
                tg.cancel_scope.cancel()
        finally:
            control.close()
            rundir.remove_status_file(control.directory, os.getpid())
            if server is not None:
                server.shutdown()
                server.server_close()
            else:
                listener.close()
            with anyio.CancelScope(shield=True):
                if self._observing.is_set():
                    await anyio.to_thread.run_sync(self.bridge.stop)
                if self.cgroups is not None:
                    # Out of our leaf first: the guard kills whatever is left in it.
                    self.cgroups.release()
                # After the services are stopped, so the guard has nothing left to kill.
                await anyio.to_thread.run_sync(self.guard.close)
                if self.cgroups is not None:
                    self.cgroups.remove_rest()
                if self._empty_watcher is not None:
                    self._empty_watcher.close()
            if self.subreaper:
                reaper.reap_unowned(self._owned_pids())
        log.info("stopped")

    def _write_status_file(self, directory: str) -> None:
        """Tell `supervisor status`, run from anywhere by this user, where the HTTP port is."""
        assert self.listen_address is not None
        host, port = self.listen_address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
        web = self.config.settings.web_config
        scheme = "https" if web is not None and web.tls else "http"
        try:
            rundir.write_status_file(directory, {"url": f"{scheme}://{_host_port(host, port)}",
                                                 "pid": os.getpid(), "config": self.config.path})
        except OSError as exc:
            log.warning("status file not written directory=%s error=%s", directory,
                        exc.strerror or exc)

    async def _start_monitor(self) -> None:
        """(Re)start the readiness checks; a reload with other checks replaces the monitor."""
        from supervisor.checks.readiness import ReadinessMonitor

        assert self._tg is not None
        if self._monitor_scope is not None:
            self._monitor_scope.cancel()
        self.monitor = ReadinessMonitor(self.config.checks, self.bridge)
        scope = self._monitor_scope = anyio.CancelScope()
        monitor = self.monitor

        async def run_monitor(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await monitor.run(task_status=task_status)

        await self._tg.start(run_monitor)

    def _setup_cgroups(self, tg: TaskGroup) -> None:
        tree = cgroups.available(self.config.settings.cgroups)
        if tree is None:
            return
        try:
            watcher = cgroups.EmptyWatcher()
        except OSError as exc:
            log.warning("no cgroup per service (inotify) reason=%s", exc.strerror or exc)
            tree.remove_all()
            return
        self.cgroups, self._empty_watcher = tree, watcher
        self._placer = cgroups.Placer(tree)
        self.guard.cgroup = tree.instance
        tg.start_soon(watcher.run)
        tg.start_soon(self._placer.run)
        log.info("cgroup per service path=%s", tree.instance)

    async def _add_runner(self, spec: ServiceSpec) -> None:
        assert self._tg is not None
        cgroup = None
        if self.cgroups is not None and self._empty_watcher is not None:
            cgroup = cgroups.ServiceCgroup(self.cgroups, self._empty_watcher, spec.name,
                                           self._placer)
        runner = ServiceRunner(spec, environ=self.environ, publish=self._publish,
                               spawner=self._spawn,
                               cgroup=cgroup, owned=self._owned_by_runners)
        if spec.name in self._retired:
            runner.carry_counters(*self._retired.pop(spec.name))
        scope = anyio.CancelScope()
        self.runners[spec.name] = runner
        self._runner_scopes[spec.name] = scope
        self._publish(runner.snapshot)

        async def run_runner() -> None:
            with scope:
                try:
                    await runner.run()
                except Exception:  # noqa: BLE001 - last resort: runner.run contains its own
                    log.exception("runner ended with an error service=%s", spec.name)

        # Not tg.start(): a round trip through the scheduler per service adds up (200 services
        # on trio: 60 ms), and the runner's event queue is unbounded, so events posted before
        # its task first runs wait for it.
        self._tg.start_soon(run_runner)

    def _publish(self, snapshot: ServiceSnapshot) -> None:
        previous = self.snapshots.get(snapshot.name)
        self.snapshots = {**self.snapshots, snapshot.name: snapshot}
        if self._states_changed is not None and (
                previous is None or previous.state is not snapshot.state):
            self._states_changed.set()
        if (snapshot.state is lc.State.RUNNING and self._observing is not None
                and self._observing.is_set()
                and (previous is None or previous.state is not lc.State.RUNNING)):
            self.scraper.poke(snapshot.name)  # its metrics, now rather than up to 2 intervals on

    def _autostarts(self) -> list[ServiceSpec]:
        return [s for s in self.config.services.values() if s.autostart]

    def _dependent_autostarts(self) -> list[ServiceSpec]:
        return [s for s in self._autostarts() if s.depends_on or s.wait_for]

    async def _spawn_independent(self) -> None:
        """Spawn what has nothing to wait for, so READY=1 means "spawned and listening";
        services with depends_on or wait_for follow in the background."""
        now = [s for s in self._autostarts() if not s.depends_on and not s.wait_for]
        for spec in now:
            self.runners[spec.name].start()
        with anyio.move_on_after(10):
            for spec in now:
                await self.runners[spec.name].wait_until(lambda s: s.state is not lc.State.STOPPED)

    async def _start_all(self, specs: list[ServiceSpec]) -> None:
        with anyio.CancelScope() as scope:
            self._start_scopes.add(scope)
            try:
                async with anyio.create_task_group() as tg:
                    for spec in specs:
                        if spec.autostart:
                            tg.start_soon(self._start_when_ready, spec)
            finally:
                self._start_scopes.discard(scope)

    async def _start_when_ready(self, spec: ServiceSpec) -> None:
        """Hold an autostart back, as `waiting` with the reason, until its dependencies run
        (or exited successfully) and its checks pass (or wait_timeout passes); then start it
        unless an operator stopped it meanwhile."""
        runner = self.runners.get(spec.name)
        if runner is None or runner.spec is not spec:
            return
        try:
            held = False
            while self.runners.get(spec.name) is runner and not runner.finished:
                blockers = self.unsatisfied_dependencies(spec.name)
                if not blockers:
                    break
                runner.hold(waiting_reason(blockers), refresh=held)
                held = True
                await self._wait_dependency_change(blockers)
            if spec.wait_for:
                runner.hold(f"checks {','.join(spec.wait_for)} (up to wait_timeout "
                            f"{spec.wait_timeout:g}s)", refresh=held)
                held = True
                log.info("waiting for checks service=%s checks=%s timeout=%g", spec.name,
                         ",".join(spec.wait_for), spec.wait_timeout)
                if not await self.monitor.wait_healthy(spec.wait_for, spec.wait_timeout):
                    log.warning("checks still failing after wait_timeout, starting anyway "
                                "service=%s checks=%s", spec.name, ",".join(spec.wait_for))
            # Shutdown cancels pending starts, but one queued just before it began may run
            # after; a reload replacing this runner ends it before its successor starts.
            if (self.runners.get(spec.name) is runner and not self.shutting_down()
                    and spec.name not in self._replacing):
                if held:
                    runner.release()  # a no-op if an operator stopped it meanwhile
                else:
                    runner.start()
        except Exception as exc:  # noqa: BLE001 - one service never takes the daemon down
            log.exception("start failed service=%s", spec.name)
            runner.fault(f"internal error: {type(exc).__name__}")

    def unsatisfied_dependencies(self, name: str, ignore: tuple[str, ...] = ()
                                 ) -> dict[str, str]:
        """`name`'s dependencies that neither run nor exited successfully -> why not."""
        runner = self.runners.get(name)
        if runner is None:
            return {}
        blockers: dict[str, str] = {}
        for dep in runner.spec.depends_on:
            other = self.runners.get(dep)
            if other is not None and dep not in ignore and not _dependency_satisfied(
                    other.snapshot):
                blockers[dep] = _blocked_because(other.snapshot)
        return blockers

    async def _wait_dependency_change(self, blockers: Mapping[str, str]) -> None:
        """Return once any of `blockers` is satisfied or blocks for another reason."""
        watched = [(self.runners.get(dep), why) for dep, why in blockers.items()]
        async with anyio.create_task_group() as tg:

            async def watch(runner: ServiceRunner | None, why: str) -> None:
                if runner is not None:  # None: removed by a reload meanwhile
                    await runner.wait_until(lambda s: _dependency_satisfied(s)
                                            or _blocked_because(s) != why)
                tg.cancel_scope.cancel()

            for runner, why in watched:
                tg.start_soon(watch, runner, why)

    async def _stop_services(self, names: list[str]) -> None:
        """Stop `names`, dependents before their dependencies: one dependency level after
        another, each as one batch (stopbatch.py: a task and a signalling pass per service
        made a shutdown of 1,000 services take ~1 s)."""
        depends_on = {n: r.spec.depends_on for n in names if (r := self.runners.get(n))}
        for level in stop_levels(names, depends_on):
            runners = [r for n in level if (r := self.runners.get(n)) is not None]
            batch = StopBatch(swept=self.subreaper and self.shutting_down())
            async with anyio.create_task_group() as tg:
                tg.start_soon(batch.run_timers)
                stops = [(runner, runner.stop(batch)) for runner in runners]
                await batch.flush()
                for runner, number in stops:
                    await runner.wait_stopped(number)
                tg.cancel_scope.cancel()
            for runner in runners:
                runner.end_batch()

    async def _end_runners(self, within: float = 0.5) -> None:
        """At shutdown, once every service is stopped: end the runners by closing their
        event queues (cancelling 1,000 runners' task groups took 0.16 s), then their
        cgroups in one pass. Whatever has not ended within `within` is cancelled with the
        daemon's task group."""
        runners = list(self.runners.values())
        async with anyio.create_task_group() as tg:
            if self.cgroups is not None:  # rmdir in a worker thread meanwhile (~60 us each)
                tg.start_soon(functools.partial(anyio.to_thread.run_sync,
                                                self.cgroups.remove_services))
            for runner in runners:
                runner.close(keep_cgroup=self.cgroups is not None)
            with anyio.move_on_after(within):
                for runner in runners:
                    await runner.wait_until(lambda s: False)  # returns once it has ended

    async def _sweep(self, rounds: int = 200, pause: float = 0.01) -> None:
        """At shutdown, as subreaper: SIGKILL every descendant left (escapees and theirs),
        reap, and repeat until nothing of ours is left but the guard (bounded: ~2 s)."""
        guard = self.guard.pid
        killed = 0
        for _ in range(rounds):
            reaper.reap_unowned(self._owned_pids())
            left = descendants.live(
                p for p in descendants.subtree(descendants.children("self")) if p != guard)
            if not left:
                break
            killed += descendants.signal_pids(left, signal.SIGKILL)
            await anyio.sleep(pause)
        else:
            log.warning("descendants left after the shutdown sweep count=%d", len(left))
        if killed:
            log.info("killed leftover descendants at shutdown count=%d", killed)

    # -- control (used by the control socket and SIGHUP) ----------------------------------
    def start_service(self, name: str) -> None:
        self.runners[name].start()

    def stop_service(self, name: str) -> None:
        self.runners[name].stop()

    async def reload(self) -> ReloadResult:
        """Re-read the config file; apply it only if entirely valid. Reloads run one at a time
        and are refused once shutdown has begun."""
        if self._observing is not None:  # a SIGHUP while the services are being spawned
            await self._observing.wait()
        assert self._reload_lock is not None, "daemon not running"
        async with self._reload_lock:
            if self.shutting_down():
                log.warning("reload refused: the daemon is shutting down")
                return ReloadResult(False, error="the daemon is shutting down; reload refused")
            return await self._reload()

    async def _reload(self) -> ReloadResult:
        self._notify("reloading")
        try:
            new = load_config(self.config.path, self.environ)
        except ConfigError as exc:
            self.reloads["failure"] += 1
            self.last_reload_ok = False
            for problem in exc.problems:
                log.error("reload rejected path=%s problem=%s", exc.path, problem)
            self._notify("ready")
            return ReloadResult(False, tuple(exc.problems))
        old = self.config
        removed = [n for n in old.services if n not in new.services]
        added = [n for n in new.services if n not in old.services]
        changed = [n for n in new.services
                   if n in old.services and new.services[n] != old.services[n]]
        if (new.settings.listen_host, new.settings.listen_port) != (
                old.settings.listen_host, old.settings.listen_port):
            log.warning("reload: listen address changes take effect on restart only")
        self.config = new
        if new.settings.web_config_file:
            log.info("reload: web config applied path=%s", new.settings.web_config_file)
        self._check_exposure()
        self.redactor = _redactor(new, old)  # old secrets may linger in texts for a while
        if self.log_redactor is not None:
            self.log_redactor.redactor = self.redactor
        if new.checks != old.checks:
            await self._start_monitor()
        self.scraper.set_targets(self._scrape_targets(new))
        self.drops.retain(n for n in new.services if new.services[n].metrics_url)
        self._replacing = frozenset(removed + changed)
        try:
            return await self._replace(new, added, removed, changed)
        finally:
            self._replacing = frozenset()

    async def _replace(self, new: Config, added: list[str], removed: list[str],
                       changed: list[str]) -> ReloadResult:
        await self._stop_services(removed + changed)
        if self.shutting_down():
            # Shutdown stops every runner still listed, these included; swapping runners now
            # would start services again behind its back.
            log.warning("reload abandoned: the daemon is shutting down")
            return ReloadResult(False, error="the daemon began shutting down during the "
                                             "reload; it was not applied")
        # End the old runners before any replacement exists: a start queued for one of them
        # (by an earlier reload's pending starts) would otherwise spawn it next to its
        # successor; ending it terminates whatever it spawned, within its stop_timeout.
        old_runners = [self.runners[name] for name in removed + changed]
        for name in removed + changed:
            self._runner_scopes[name].cancel()
        for runner in old_runners:
            await runner.wait_until(lambda s: False)  # returns once the runner has finished
        if self.shutting_down():
            log.warning("reload abandoned: the daemon is shutting down")
            return ReloadResult(False, error="the daemon began shutting down during the "
                                             "reload; it was not applied")
        for runner in old_runners:
            name = runner.spec.name
            del self._runner_scopes[name], self.runners[name]
            self._retired[name] = (runner.machine.starts, dict(runner.machine.exits),
                                   runner.probe_failures())
        self.snapshots = {n: s for n, s in self.snapshots.items() if n in new.services}
        for name in new.services:
            if name in added or name in changed:
                await self._add_runner(new.services[name])
        # Start in dependency order; unchanged services keep their processes.
        assert self._tg is not None
        self._tg.start_soon(self._start_all, [new.services[n] for n in new.services
                                              if n in added or n in changed])
        self.reloads["success"] += 1
        self.last_reload_ok = True
        log.info("reloaded added=%s removed=%s changed=%s", ",".join(added) or "-",
                 ",".join(removed) or "-", ",".join(changed) or "-")
        self._notify("ready")
        return ReloadResult(True, (), tuple(added), tuple(removed), tuple(changed))

    def _check_exposure(self) -> None:
        """Warn (log and status) when the port is reachable beyond this host unprotected."""
        if self.listen_address is None:
            return
        warning = listen.exposure_warning(*self.listen_address, self.config.settings.web_config)
        warnings = (warning,) if warning else ()
        if warning and warnings != self.warnings:
            log.warning("%s", warning)
        self.warnings = warnings

    # -- background tasks -----------------------------------------------------------------
    async def _refresh_status(self) -> None:
        """STATUS= follows state changes within STATUS_MIN_INTERVAL, and no more often."""
        while self._states_changed is not None:
            await self._states_changed.wait()
            self._states_changed = anyio.Event()
            self._notify_status()
            await anyio.sleep(STATUS_MIN_INTERVAL)

    async def _heartbeat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await anyio.sleep(HEARTBEAT_INTERVAL)

    async def _sample_stats(self) -> None:
        while True:
            leaders = {name: s.pid for name, s in self.snapshots.items() if s.pid is not None}
            groups = {name: s.cgroup for name, s in self.snapshots.items()
                      if s.cgroup is not None}
            sampled = await anyio.to_thread.run_sync(self._sampler.sample, leaders, groups)
            self.stats = {name: sampled.get(name) or _no_stats(
                self._sampler.cpu_carried(name)) for name in self.snapshots}
            self._notify_status()
            if self.subreaper:  # a backstop: reaper.reap_orphans reaps them on SIGCHLD
                reaper.reap_unowned(self._owned_pids())
            await anyio.sleep(self.config.settings.stats_interval)

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if self.shutting_down():
                        log.warning("SIGHUP during shutdown: reload ignored")
                        continue
                    log.info("SIGHUP: reloading path=%s", self.config.path)
                    # In a task of its own: a reload that is stopping services must never keep
                    # a SIGTERM behind it waiting (reload() serialises reloads itself).
                    assert self._tg is not None
                    self._tg.start_soon(self.reload)
                elif self._shutdown is not None and self._shutdown.is_set():
                    log.warning("%s during shutdown: still stopping services",
                                signal.Signals(signum).name)
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self.request_shutdown()

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
        if self.spawner is not None:
            return self.spawner(argv, env, cwd)
        return spawn(argv, env, cwd, self.guard)

    def _owned_by_runners(self) -> list[int] | None:
        """What a runner's escapee search must skip among our children; None: no search
        (not a subreaper, so no escapee is ours; or shutting down, where the final sweep
        kills them all at once instead of a walk per service: 200 walks took 0.1 s)."""
        if not self.subreaper or (self._shutdown is not None and self._shutdown.is_set()):
            return None
        return self._owned_pids()

    def _owned_pids(self) -> list[int]:
        guard = [self.guard.pid] if self.guard.pid is not None else []
        return [s.pid for s in self.snapshots.values() if s.pid is not None] + [
            pid for r in self.runners.values() if (pid := r.child_pid()) is not None] + guard

    def _notify(self, what: str) -> None:
        if what == "stopping":
            self._stopping_sent = True
        elif self._stopping_sent:  # READY=1 or RELOADING=1 after STOPPING=1 would be a lie
            return
        if self.notifier is not None:
            getattr(self.notifier, what)()

    def _notify_status(self) -> None:
        if self.notifier is not None:
            counts: dict[str, int] = {}
            for s in self.snapshots.values():
                counts[s.state.value] = counts.get(s.state.value, 0) + 1
            text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            if text != self._last_status:
                self._last_status = text
                self.notifier.status(text)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redactor(*configs: Config) -> Redactor:
    """The secrets load_config found, and (for a Config built another way) those of the
    targets themselves."""
    secrets: set[str] = set()
    for config in configs:
        secrets |= config.secrets
        secrets |= config_secrets(
            [c.target for c in config.checks.values() if c.type != "tcp"]
            + [s.metrics_url for s in config.services.values() if s.metrics_url]
            + [p.target for s in config.services.values() for p in s.probes().values()
               if p.type == "http"])
    return Redactor(secrets)


def _stop_serving(server: Any) -> None:
    """socketserver's loop sees a shutdown request only at its next poll (every 0.5 s):
    raise the flag it reads, then make its listening socket readable, so it sees it now."""
    server._BaseServer__shutdown_request = True
    try:
        server.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    server.shutdown()


def _no_stats(cpu_carried: float) -> TreeStats:
    from supervisor.process.procstats import TreeStats

    return TreeStats(cpu_carried, 0, 0, 0, 0)


def _dependency_satisfied(s: ServiceSnapshot) -> bool:
    if s.state is lc.State.EXITED and s.last_exit is not None and s.last_exit.reason == "success":
        return True
    if s.ready is not None:  # it has a readiness probe: ready, not merely running
        return s.ready and s.state in (lc.State.STARTING, lc.State.RUNNING)
    return s.state is lc.State.RUNNING


def _blocked_because(s: ServiceSnapshot) -> str:
    """Why a dependency holds its dependents back, coarse enough that a crash-looping
    dependency (starting, backoff, starting...) does not change the reason each time."""
    if s.ready is not None and s.state in (lc.State.STARTING, lc.State.RUNNING,
                                           lc.State.BACKOFF):
        return "not ready"
    if s.state in (lc.State.STARTING, lc.State.BACKOFF):
        return "not running yet"
    if s.state is lc.State.EXITED:
        return "exited with failure"
    return str(s.state)  # fatal, stopped, stopping, waiting


def waiting_reason(blockers: Mapping[str, str]) -> str:
    """`{"db": "fatal"}` -> "dependency db is fatal"."""
    return "; ".join(f"dependency {dep} is {why}" for dep, why in blockers.items())


def _scraped_service(result: ScrapeResult, environment: str) -> list[Metric]:
    from supervisor.observe.families import relabel
    from supervisor.observe.scraper import scrape_families

    return [*scrape_families({result.service: result}, environment),
            *relabel(result.served(), result.service, environment)]
