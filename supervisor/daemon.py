"""The composition root: owns the top task group and wires the services (services.py: their
runners, start and stop order), signals, reload, the control socket, containment (cgroups, the
orphan guard, the subreaper's sweep) and the observability half (observability.py, imported once
the services are spawned).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from supervisor.config import Config, ServiceSpec, load_config, restart_only_changes
from supervisor.control import rundir
from supervisor.control.notify import (
    Announcer,
    Notifications,
    watchdog_interval,
    watchdog_loop,
)
from supervisor.control.server import (
    ControlSocket,
    ReloadResult,
    default_socket_path,
    serve_control,
)
from supervisor.core import lifecycle as lc
from supervisor.core.errors import ConfigError, SupervisorError
from supervisor.core.redact import LogRedactor, Redactor
from supervisor.core.snapshot import ServiceSnapshot
from supervisor.process import cgroup as cgroups
from supervisor.process import fdlimit, reaper
from supervisor.process.guard import OrphanGuard
from supervisor.process.signals import signal_receiver
from supervisor.process.spawn import Child, become_subreaper, spawn
from supervisor.runner import ServiceRunner, Spawner
from supervisor.services import Services
from supervisor.web import listen

# The observability half (HTTP, metrics, checks, stats: prometheus_client, wsgiref, psutil,
# asyncio for the bridge, about 80 ms of imports) is imported by run(), once the services are
# spawned, so that they start that much sooner.
if TYPE_CHECKING:
    from supervisor.checks.readiness import ReadinessMonitor
    from supervisor.observability import Observability
    from supervisor.process.procstats import TreeStats

log = logging.getLogger(__name__)



class Daemon:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None,
                 notifier: Notifications | None = None, handle_signals: bool = True,
                 subreaper: bool = False, health_stale_after: float = 5.0,
                 spawner: Spawner | None = None,
                 log_redactor: LogRedactor | None = None) -> None:
        self.config = config
        # Masks the config's secrets in every string that leaves: HTTP bodies, control replies
        # and (through `log_redactor`, the CLI's log handler filter) log records.
        self.redactor = Redactor(config.all_secrets())
        self.log_redactor = log_redactor
        if log_redactor is not None:
            log_redactor.redactor = self.redactor
        self.environ = dict(os.environ if environ is None else environ)
        self.announce = Announcer(notifier, self._status_text)
        self.handle_signals = handle_signals
        self.subreaper = subreaper
        self.health_stale_after = health_stale_after
        self.spawner = spawner  # (argv, env, cwd) -> Child; default: spawn() with the guard
        self.started_at = time.monotonic()
        self.snapshots: Mapping[str, ServiceSnapshot] = {}  # swapped whole, read by HTTP threads
        self.stats: Mapping[str, TreeStats] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_ok = True
        self.services = Services(
            environ=self.environ, publish=self._publish, spawner=self._spawn,
            owned=self._owned_by_runners, cgroup_for=self._cgroup_for,
            wait_healthy=lambda checks, timeout: self.monitor.wait_healthy(checks, timeout),
            may_start=lambda: not self.shutting_down())
        # Kills every service if this process dies without stopping them (see guard.py).
        self.guard = OrphanGuard()
        # A cgroup per service (cgroup.py), made in run(); None: fallback containment.
        self.cgroups: cgroups.Containment | None = None
        self._shutdown: anyio.Event | None = None  # anyio primitives need the running loop
        self._observing: anyio.Event | None = None  # set once the observability half serves
        self._obs: Observability | None = None  # built once the services are spawned
        self._tg: TaskGroup | None = None
        self._stats_changed: anyio.Event | None = None  # set: sample now (a reload)
        self._reload_lock: anyio.Lock | None = None  # one reload at a time (SIGHUP, socket)
        self.listen_address: tuple[str, int] | None = None
        self.warnings: tuple[str, ...] = ()  # shown in /v1/status and `supervisor status`
        self.control_socket = config.settings.control_socket or default_socket_path(self.environ)

    @property
    def obs(self) -> Observability:
        """HTTP, metrics, readiness checks, scrapes and stats (see observability.py)."""
        assert self._obs is not None, "the daemon is not observing yet"
        return self._obs

    @property
    def runners(self) -> Mapping[str, ServiceRunner]:
        return self.services.runners

    def unsatisfied_dependencies(self, name: str, ignore: tuple[str, ...] = ()
                                 ) -> dict[str, str]:
        return self.services.unsatisfied_dependencies(name, ignore)

    @property
    def monitor(self) -> ReadinessMonitor:
        return self.obs.monitor

    def status(self) -> tuple[int, dict[str, Any]]:
        """The /v1/status document (also the control socket's `status`)."""
        return self.obs.status()

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
        # is cheap; the heavy imports are what observability.py defers.)
        control = ControlSocket(self.control_socket, settings.control_socket_group)
        try:
            listener = listen.bind(settings.listen_host, settings.listen_port)
        except OSError as exc:
            control.close()
            raise SupervisorError(f"cannot listen on {settings.listen_host}:"
                                  f"{settings.listen_port}: {exc.strerror or exc}") from None
        self._shutdown = anyio.Event()
        self._observing = anyio.Event()
        self._reload_lock = anyio.Lock()
        bound_host, bound_port = listener.getsockname()[:2]
        self.listen_address = (str(bound_host), int(bound_port))
        listen.log_listening(*self.listen_address, settings.web_config)
        self._check_exposure()
        rundir.announce(control.directory, listen.url(*self.listen_address, settings.web_config),
                        self.config.path)
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
                specs = list(self.config.services.values())
                for spec in specs:
                    self.services.add(spec, tg)
                reserve = fdlimit.Reserve()  # for what follows the spawns (fdlimit.py)
                try:
                    await self.services.spawn_independent(specs)
                finally:
                    reserve.release()
                # Requests that arrived meanwhile wait in the listen backlog.
                from supervisor.observability import Observability

                obs = self._obs = Observability(self)
                server = obs.serve(listener)
                self._observing.set()
                await obs.start(tg)
                tg.start_soon(self._sample_stats)
                await tg.start(serve_control, self, control)
                interval = watchdog_interval(self.environ)
                notifier = self.announce.notifier
                if notifier is not None and interval is not None:
                    tg.start_soon(watchdog_loop, notifier, interval)
                if notifier is not None:
                    tg.start_soon(self.announce.follow)
                tg.start_soon(self.services.start_all, self.services.dependent(specs))
                self.announce.send("ready")
                self.announce.status()
                task_status.started()
                await self._shutdown.wait()
                log.info("shutting down services=%d", len(self.runners))
                self.announce.send("stopping")
                # While the services stop, not after them (it took up to 0.5 s).
                tg.start_soon(anyio.to_thread.run_sync, obs.stop_serving)
                self.services.cancel_pending_starts()
                self.guard.stopping()  # cgroup mode: it removes the emptied cgroups meanwhile
                # Shielded so that cancellation still stops every child, bounded so that a
                # runner that died cannot hold the daemon forever.
                bound = max((r.spec.stop_timeout for r in self.runners.values()), default=0) + 10
                with anyio.move_on_after(bound, shield=True):
                    await self.services.stop_in_order(list(self.runners), swept=self.subreaper)
                    if self.subreaper:
                        await reaper.sweep(self._owned_pids, self.guard.pid)
                    await self.services.end_all(
                        self.cgroups.tree.remove_services if self.cgroups is not None else None)
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
                    await self.obs.stop()
                if self.cgroups is not None:
                    # Out of our leaf first: the guard kills whatever is left in it.
                    self.cgroups.tree.release()
                # After the services are stopped, so the guard has nothing left to kill.
                await anyio.to_thread.run_sync(self.guard.close)
                if self.cgroups is not None:
                    self.cgroups.close()
            if self.subreaper:
                reaper.reap_unowned(self._owned_pids())
        log.info("stopped")

    def _setup_cgroups(self, tg: TaskGroup) -> None:
        self.cgroups = cgroups.Containment.open(self.config.settings.cgroups)
        if self.cgroups is not None:
            self.guard.cgroup = self.cgroups.tree.instance
            self.cgroups.start(tg)

    def _cgroup_for(self, spec: ServiceSpec) -> cgroups.ServiceCgroup | None:
        return self.cgroups.for_service(spec.name) if self.cgroups is not None else None

    def _publish(self, snapshot: ServiceSnapshot) -> None:
        previous = self.snapshots.get(snapshot.name)
        self.snapshots = {**self.snapshots, snapshot.name: snapshot}
        if previous is None or previous.state is not snapshot.state:
            self.announce.state_changed()
        if (snapshot.state is lc.State.RUNNING and self._observing is not None
                and self._observing.is_set()
                and (previous is None or previous.state is not lc.State.RUNNING)):
            self.obs.poke(snapshot.name)  # its metrics, now rather than up to 2 intervals on

    # -- control (used by the control socket and SIGHUP) ----------------------------------
    def start_service(self, name: str) -> None:
        self.services.start(name)

    def stop_service(self, name: str) -> None:
        self.services.stop(name)

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
        self.announce.send("reloading")
        try:
            new = load_config(self.config.path, self.environ)
        except ConfigError as exc:
            self.reloads["failure"] += 1
            self.last_reload_ok = False
            for problem in exc.problems:
                log.error("reload rejected path=%s problem=%s", exc.path, problem)
            self.announce.send("ready")
            return ReloadResult(False, tuple(exc.problems))
        old = self.config
        removed = [n for n in old.services if n not in new.services]
        added = [n for n in new.services if n not in old.services]
        changed = [n for n in new.services
                   if n in old.services and new.services[n] != old.services[n]]
        restart_needed = restart_only_changes(old.settings, new.settings)
        for key in restart_needed:
            log.warning("reload: [supervisor] %s changes take effect on restart only; the "
                        "running value is kept", key)
        self.config = new
        if new.settings.web_config_file:
            log.info("reload: web config applied path=%s", new.settings.web_config_file)
        self._check_exposure()
        # Old secrets may linger in texts for a while.
        self.redactor = Redactor(new.all_secrets() | old.all_secrets())
        if self.log_redactor is not None:
            self.log_redactor.redactor = self.redactor
        if new.checks != old.checks:
            assert self._tg is not None
            await self.obs.restart_monitor(self._tg)
        self.obs.reconfigure(new)
        if (new.settings.stats_interval != old.settings.stats_interval
                and self._stats_changed is not None):
            self._stats_changed.set()
        fdlimit.ensure(len(new.services))  # as at startup (cli): it may add services
        self.services.replacing = frozenset(removed + changed)
        try:
            return await self._replace(new, added, removed, changed, restart_needed)
        finally:
            self.services.replacing = frozenset()

    async def _replace(self, new: Config, added: list[str], removed: list[str],
                       changed: list[str], restart_needed: list[str]) -> ReloadResult:
        await self.services.stop_in_order(removed + changed)
        if self.shutting_down():
            # Shutdown stops every runner still listed, these included; swapping runners now
            # would start services again behind its back.
            log.warning("reload abandoned: the daemon is shutting down")
            return ReloadResult(False, error="the daemon began shutting down during the "
                                             "reload; it was not applied")
        # End the old runners before any replacement exists: a start queued for one of them
        # (by an earlier reload's pending starts) would otherwise spawn it next to its
        # successor; ending it terminates whatever it spawned, within its stop_timeout.
        old_runners = await self.services.end(removed + changed)
        if self.shutting_down():
            log.warning("reload abandoned: the daemon is shutting down")
            return ReloadResult(False, error="the daemon began shutting down during the "
                                             "reload; it was not applied")
        self.services.retire(old_runners)
        self.snapshots = {n: s for n, s in self.snapshots.items() if n in new.services}
        assert self._tg is not None
        fresh = [spec for name, spec in new.services.items() if name in added or name in changed]
        for spec in fresh:
            self.services.add(spec, self._tg)
        # Start in dependency order; unchanged services keep their processes.
        self._tg.start_soon(self.services.start_all, fresh)
        self.reloads["success"] += 1
        self.last_reload_ok = True
        log.info("reloaded added=%s removed=%s changed=%s", ",".join(added) or "-",
                 ",".join(removed) or "-", ",".join(changed) or "-")
        self.announce.send("ready")
        return ReloadResult(True, (), tuple(added), tuple(removed), tuple(changed),
                            restart_needed=tuple(restart_needed))

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
    async def _sample_stats(self) -> None:
        while True:
            self.stats = await self.obs.sample_stats()
            self.announce.status()
            if self.subreaper:  # a backstop: reaper.reap_orphans reaps them on SIGCHLD
                reaper.reap_unowned(self._owned_pids())
            # Until the next round, or at once when a reload changes stats_interval (a wait
            # begun on the old one, up to a week, is not sat out).
            self._stats_changed = changed = anyio.Event()
            with anyio.move_on_after(self.config.settings.stats_interval):
                await changed.wait()

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
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


    def _status_text(self) -> str:
        """STATUS=: how many services are in each state."""
        counts: dict[str, int] = {}
        for s in self.snapshots.values():
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))

