"""The daemon's own metric families, built from immutable snapshots, and `Catalogue`: every
source /v1/metrics merges, each declaring how it is cached (render.keyed / clocked / always).

These run in the HTTP server's threads (see render.CachingRenderer). They read snapshots the
event loop published by reference swap and never call into the loop or psutil. Every series
carries `service` and `environment`; the daemon's own process figures come from
prometheus_client's stock collectors, relabelled with service="supervisor".

Adding a metric: a family that changes only with the snapshots goes in `service_families`; one
that moves with the clock takes `now` and goes in `live_service_families` (a clocked source).
A keyed source's builder is never given the time, so it cannot freeze a time-dependent value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from supervisor.checks.readiness import ReadinessSnapshot, collect_families
from supervisor.core.snapshot import EXIT_REASONS, ServiceSnapshot, State
from supervisor.observe.denylist import DenyList
from supervisor.observe.families import relabel
from supervisor.observe.integrity import drop_families
from supervisor.observe.render import Source, always, clocked, keyed
from supervisor.observe.scraper import scrape_families
from supervisor.process.procstats import TreeStats

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.observe.integrity import DropLedger
    from supervisor.observe.scraper import Scraper, ScrapeResult

SELF = "supervisor"
LABELS = ["service", "environment"]


@dataclass(frozen=True)
class MetricsView:
    environment: str
    services: Mapping[str, ServiceSnapshot]
    stats: Mapping[str, TreeStats] = field(default_factory=dict)
    reloads: Mapping[str, int] = field(default_factory=dict)
    last_reload_ok: bool = True


def own_process_collector() -> CollectorRegistry:
    """prometheus_client's stock process, platform and GC collectors, in a private registry
    (relabelled service="supervisor" on the way out)."""
    own = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=own)
    PlatformCollector(registry=own)
    GCCollector(registry=own)
    return own


def _gauge(view: MetricsView, name: str, doc: str,
           value_of: Callable[[ServiceSnapshot], float | None]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=LABELS)
    for s in view.services.values():
        value = value_of(s)
        if value is not None:
            family.add_metric([s.name, view.environment], value)
    return family


def live_service_families(view: MetricsView, now: float) -> Iterator[Metric]:
    """The services' families that change with the clock, not only with their events."""
    yield _gauge(view, "uptime_seconds", "Seconds since the service's current process started; "
                 "0 while it is not running.", lambda s: s.uptime(now))
    yield _gauge(view, "service_restart_backoff_seconds", "Seconds until the next restart "
                 "while in backoff, else 0.",
                 lambda s: max(0.0, s.next_start_at - now) if s.next_start_at is not None
                 else 0.0)


def config_families(view: MetricsView) -> Iterator[Metric]:
    env = view.environment
    ok = GaugeMetricFamily("config_last_reload_successful", "1 if the last reload of "
                           "services.toml was applied, 0 if it was rejected.", labels=LABELS)
    ok.add_metric([SELF, env], 1.0 if view.last_reload_ok else 0.0)
    yield ok
    reloads = CounterMetricFamily("config_reloads", "Reloads of services.toml by result.",
                                  labels=[*LABELS, "result"])
    for result in ("success", "failure"):
        reloads.add_metric([SELF, env, result], view.reloads.get(result, 0))
    yield reloads


def service_families(view: MetricsView) -> Iterator[Metric]:
    """The lifecycle families, which change only when a service's snapshot does: the daemon
    swaps that mapping whole, so /v1/metrics can reuse their rendering while it is the same."""
    env = view.environment
    snaps = list(view.services.values())

    def gauge(name: str, doc: str, value_of: Callable[[ServiceSnapshot], float | None]
              ) -> GaugeMetricFamily:
        return _gauge(view, name, doc, value_of)

    starts = CounterMetricFamily("service_starts", "Processes spawned for the service since the "
                                 "daemon started.", labels=LABELS)
    for s in snaps:
        starts.add_metric([s.name, env], s.starts)
    yield starts
    yield gauge("service_up", "1 if the service's process is running (past start_seconds).",
                lambda s: 1.0 if s.state is State.RUNNING else 0.0)
    state = GaugeMetricFamily("service_state", "1 for the service's current lifecycle state, "
                              "0 for the others.", labels=[*LABELS, "state"])
    for s in snaps:
        for st in State:
            state.add_metric([s.name, env, st.value], 1.0 if s.state is st else 0.0)
    yield state
    yield gauge("service_start_time_seconds", "Unix time the current process started.",
                lambda s: s.started_wall if s.pid is not None else None)
    exits = CounterMetricFamily("service_exits", "Process exits by reason: success, failure "
                                "(non-success exit code), signal, stopped (asked by the "
                                "supervisor), spawn_error, liveness (restarted by a failed "
                                "liveness or startup probe).", labels=[*LABELS, "reason"])
    for s in snaps:
        for reason in EXIT_REASONS:
            exits.add_metric([s.name, env, reason], s.exits.get(reason, 0))
    yield exits
    yield gauge("service_ready", "1 if the service is ready: its readiness probe passes, or "
                "(without one) its process is running.", lambda s: 1.0 if s.is_ready else 0.0)
    probe_failures = CounterMetricFamily("service_probe_failures", "Failed probe attempts "
                                         "(liveness, readiness, startup) since the daemon "
                                         "started.", labels=[*LABELS, "probe"])
    for s in snaps:
        for kind, status in s.probes.items():
            probe_failures.add_metric([s.name, env, kind], status.failures)
    yield probe_failures
    yield gauge("service_last_exit_code", "Exit code of the last exit; 128+N for a process "
                "killed by signal N (the shell's convention).", _last_exit_code)


def resource_families(view: MetricsView) -> Iterator[Metric]:
    """Per-service resource use: changes with each stats sample (stats_interval)."""
    env = view.environment
    snaps = list(view.services.values())
    stats = view.stats
    cpu = CounterMetricFamily("service_cpu_seconds", "CPU time (user+system) of the service's "
                              "process group, carried across restarts.", labels=LABELS)
    for s in snaps:
        if s.name in stats:
            cpu.add_metric([s.name, env], stats[s.name].cpu_seconds)
    yield cpu
    for name, doc, attr in (
        ("service_memory_resident_bytes", "Resident memory of the service's process group.",
         "rss_bytes"),
        ("service_threads", "Threads in the service's process group.", "threads"),
        ("service_open_fds", "Open file descriptors in the service's process group.", "open_fds"),
        ("service_processes", "Processes in the service's process group.", "processes"),
    ):
        yield _gauge(view, name, doc, functools.partial(_stat_of, stats, attr))


def _stat_of(stats: Mapping[str, TreeStats], attr: str, s: ServiceSnapshot) -> float | None:
    entry = stats.get(s.name)
    return None if entry is None else float(getattr(entry, attr))


def _last_exit_code(s: ServiceSnapshot) -> float | None:
    if s.last_exit is None or s.last_exit.reason == "spawn_error":
        return None
    if s.last_exit.signal is not None:
        return 128.0 + s.last_exit.signal
    return float(s.last_exit.code or 0)


class PublishedState(Protocol):
    """What the daemon's event loop publishes by swapping whole objects (read from threads)."""

    @property
    def config(self) -> Config: ...
    @property
    def snapshots(self) -> Mapping[str, ServiceSnapshot]: ...
    @property
    def stats(self) -> Mapping[str, TreeStats]: ...
    @property
    def reloads(self) -> Mapping[str, int]: ...
    @property
    def last_reload_ok(self) -> bool: ...


class Catalogue:
    """What /v1/metrics merges, in precedence order, each source with its cache policy."""

    def __init__(self, state: PublishedState, scraper: Scraper, drops: DropLedger,
                 readiness: Callable[[], ReadinessSnapshot], http: CollectorRegistry,
                 own_process: CollectorRegistry) -> None:
        self.state = state
        self.scraper = scraper
        self.drops = drops
        self.readiness = readiness  # the current monitor's (a reload may replace it)
        self.http = http
        self.own_process = own_process
        # Built once per deny_metrics tuple; the render caches each family's answer per list.
        self._deny: tuple[tuple[str, ...], DenyList] | None = None

    def view(self) -> MetricsView:
        state = self.state
        return MetricsView(state.config.settings.environment, state.snapshots, state.stats,
                           dict(state.reloads), state.last_reload_ok)

    def sources(self) -> list[Source]:
        view = self.view()
        env = view.environment
        scrapes = self.scraper.snapshot()
        readiness = self.readiness()
        drop_token = self.drops.token  # first: the ledger swaps its counts before its token
        dropped = self.drops.counts()
        own, http = self.own_process, self.http
        sources = [
            keyed("services", lambda: service_families(view), view.services, env),
            keyed("resources", lambda: resource_families(view), view.services, view.stats, env),
            # Uptimes and the daemon's own process figures move with the clock; they are
            # rebuilt at most once per CLOCK_RESOLUTION (0.1 s), not on every scrape: with 200
            # services that was ~2.5 ms of each render.
            clocked("services-live", lambda now: live_service_families(view, now),
                    view.services, env),
            always("config", lambda: config_families(view)),
            clocked("process", lambda _now: relabel(own.collect(), SELF, env), env),
            always("http", lambda: relabel(http.collect(), SELF, env)),
            # Freshness ages with the clock (ReadinessSnapshot.effective): every render.
            always("readiness", lambda: collect_families(readiness, env)),
            keyed("scrape-drops", functools.partial(drop_families, dropped, env),
                  drop_token, env),
        ]
        # One source per scraped service, keyed by its latest result: its scrape health
        # first (so the daemon's series win over a child's same-named ones), then its own
        # families relabelled. Re-rendered once per scrape of that service.
        for name in sorted(scrapes):
            result = scrapes[name]
            sources.append(keyed("service:" + name,
                                 functools.partial(scraped_service, result, env),
                                 result, env, service=name))
        return sources

    def deny(self) -> DenyList:
        patterns = self.state.config.settings.deny_metrics
        if self._deny is None or self._deny[0] is not patterns:  # a reload made new settings
            self._deny = (patterns, DenyList(patterns))
        return self._deny[1]

    def version(self, tick: object) -> tuple[object, ...]:
        """What a kept /v1/metrics body must match to be served again: the clock tick, and
        every object the loop swaps whole when something an operator acts on changes."""
        state = self.state
        return (tick, state.snapshots, state.stats, self.readiness(), state.config,
                state.last_reload_ok)


def scraped_service(result: ScrapeResult, environment: str) -> list[Metric]:
    return [*scrape_families({result.service: result}, environment),
            *relabel(result.served(), result.service, environment)]
