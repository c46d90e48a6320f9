"""The composition root: owns the top task group and wires runners, signals, reload and the
observability half (observability.py, imported once the services are spawned).

Start order follows `depends_on` (a service starts once its dependencies run -- or, for one
with a readiness probe, are ready -- or exited successfully; until then it is `waiting`, with
the reason); stop order is the reverse (a
service is stopped once everything depending on it has stopped); services without a relation
start and stop concurrently.
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

from supervisor.config import Config, ServiceSpec, load_config
from supervisor.control import rundir
from supervisor.control.notify import Notifications, watchdog_interval, watchdog_loop
from supervisor.control.server import (
    ControlSocket,
    ReloadResult,
    default_socket_path,
    serve_control,
)
from supervisor.core import lifecycle as lc
from supervisor.core.errors import ConfigError, SupervisorError
from supervisor.core.redact import LogRedactor, Redactor, config_secrets
from supervisor.core.snapshot import ServiceSnapshot
from supervisor.process import cgroup as cgroups
from supervisor.process import descendants, reaper
from supervisor.process.guard import OrphanGuard
from supervisor.process.spawn import Child, become_subreaper, spawn
from supervisor.runner import ServiceRunner, Spawner
from supervisor.web import listen

# The observability half (HTTP, metrics, checks, stats: prometheus_client, wsgiref, psutil,
# asyncio for the bridge, about 80 ms of imports) is imported by run(), once the services are
# spawned, so that they start that much sooner.
if TYPE_CHECKING:
    from supervisor.checks.readiness import ReadinessMonitor
    from supervisor.observability import Observability
    from supervisor.process.procstats import TreeStats

log = logging.getLogger(__name__)

# sd_notify STATUS= follows state changes, at most once per this many seconds (1000 services
# flapping send 5 datagrams a second, not thousands).
STATUS_MIN_INTERVAL = 0.2


class Daemon:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None,
                 notifier: Notifications | None = None, handle_signals: bool = True,
                 subreaper: bool = False, health_stale_after: float = 5.0,
                 spawner: Spawner | None = None,
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
        self.spawner = spawner  # (argv, env, cwd) -> Child; default: spawn() with the guard
        self.started_at = time.monotonic()
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
        self._shutdown: anyio.Event | None = None  # anyio primitives need the running loop
        self._observing: anyio.Event | None = None  # set once the observability half serves
        self._obs: Observability | None = None  # built once the services are spawned
        self._tg: TaskGroup | None = None
        self._start_scopes: set[anyio.CancelScope] = set()  # pending starts, cancelled at shutdown
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
        self.control_socket = config.settings.control_socket or default_socket_path(self.environ)

    @property
    def obs(self) -> Observability:
        """HTTP, metrics, readiness checks, scrapes and stats (see observability.py)."""
        assert self._obs is not None, "the daemon is not observing yet"
        return self._obs

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
                from supervisor.observability import Observability

                obs = self._obs = Observability(self)
                server = obs.serve(listener)
                self._observing.set()
                await obs.start(tg)
                tg.start_soon(self._sample_stats)
                await tg.start(serve_control, self, control)
                interval = watchdog_interval(self.environ)
                if self.notifier is not None and interval is not None:
                    tg.start_soon(watchdog_loop, self.notifier, interval)
                if self.notifier is not None:
                    tg.start_soon(self._refresh_status)
                tg.start_soon(self._start_all, self._dependent_autostarts())
                self._notify("ready")
                self._notify_status()
                task_status.started()
                await self._shutdown.wait()
                log.info("shutting down services=%d", len(self.runners))
                self._notify("stopping")
                # While the services stop, not after them (it took up to 0.5 s).
                tg.start_soon(anyio.to_thread.run_sync, obs.stop_serving)
                for scope in self._start_scopes:
                    scope.cancel()
                # Shielded so that cancellation still stops every child, bounded so that a
                # runner that died cannot hold the daemon forever.
                bound = max((r.spec.stop_timeout for r in self.runners.values()), default=0) + 10
                with anyio.move_on_after(bound, shield=True):
                    await self._stop_services(list(self.runners))
                    if self.subreaper:
                        await self._sweep()
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
        self.guard.cgroup = tree.instance
        tg.start_soon(watcher.run)
        log.info("cgroup per service path=%s", tree.instance)

    async def _add_runner(self, spec: ServiceSpec) -> None:
        assert self._tg is not None
        cgroup = None
        if self.cgroups is not None and self._empty_watcher is not None:
            cgroup = cgroups.ServiceCgroup(self.cgroups, self._empty_watcher, spec.name)
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
            self.obs.poke(snapshot.name)  # its metrics, now rather than up to 2 intervals on

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
        # Who depends on whom, once: a scan of every stopping service per service was
        # quadratic (0.03 s of a shutdown at 200 services, 0.7 s at 1,000).
        dependents: dict[str, list[ServiceRunner]] = {}
        for other in names:
            runner = self.runners.get(other)
            if runner is not None:
                for dep in runner.spec.depends_on:
                    dependents.setdefault(dep, []).append(runner)
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(self._stop_after_dependents, name, dependents.get(name, []))

    async def _stop_after_dependents(self, name: str, dependents: list[ServiceRunner]) -> None:
        for runner in dependents:
            await runner.wait_until(lambda s: s.state in lc.SETTLED_STATES)
        await self.runners[name].stop_and_wait()

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
            assert self._tg is not None
            await self.obs.restart_monitor(self._tg)
        self.obs.reconfigure(new)
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

    async def _sample_stats(self) -> None:
        while True:
            self.stats = await self.obs.sample_stats()
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
