"""The daemon's services as a set: one runner each, started in dependency order and stopped in
reverse, replaced one by one when a reload changes them.

Start order follows `depends_on`: a service starts once its dependencies run (or, for one with
a readiness probe, are ready) or exited successfully, and until then it is `waiting`, with the
reason. Stop order is the reverse: a service is stopped once everything depending on it has
stopped. Services without a relation start and stop concurrently.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
from anyio.abc import TaskGroup

from supervisor.config import ServiceSpec
from supervisor.core import lifecycle as lc
from supervisor.core.snapshot import ServiceSnapshot
from supervisor.process.cgroup import ServiceCgroup
from supervisor.process.spawn import Child
from supervisor.process.stopbatch import CHUNK as STOP_CHUNK
from supervisor.process.stopbatch import StopBatch, stop_levels
from supervisor.runner import ServiceRunner

log = logging.getLogger("supervisor.daemon")  # operators know these lines by this name

# What a service's counters were when its runner was retired: starts, exits, probe failures.
Counters = tuple[int, dict[str, int], dict[str, int]]


class Services:
    def __init__(self, *, environ: Mapping[str, str],
                 publish: Callable[[ServiceSnapshot], None],
                 spawner: Callable[[Sequence[str], Mapping[str, str], str], Child],
                 owned: Callable[[], list[int] | None],
                 cgroup_for: Callable[[ServiceSpec], ServiceCgroup | None],
                 wait_healthy: Callable[[tuple[str, ...], float], Awaitable[bool]],
                 may_start: Callable[[], bool]) -> None:
        self.runners: dict[str, ServiceRunner] = {}
        self._environ = environ
        self._publish = publish
        self._spawner = spawner
        self._owned = owned
        self._cgroup_for = cgroup_for
        self._wait_healthy = wait_healthy
        self._may_start = may_start  # False once shutdown began
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._start_scopes: set[anyio.CancelScope] = set()  # pending starts, cancelled at shutdown
        # Per service name, the counters of runners a reload replaced or removed: starts and
        # exits count for the daemon's lifetime, so a new runner for the name carries them on.
        self._retired: dict[str, Counters] = {}
        self.replacing: frozenset[str] = frozenset()  # runners a reload is stopping for good

    # -- runners ---------------------------------------------------------------------------
    def add(self, spec: ServiceSpec, tg: TaskGroup) -> None:
        runner = ServiceRunner(spec, environ=self._environ, publish=self._publish,
                               spawner=self._spawner, cgroup=self._cgroup_for(spec),
                               owned=self._owned)
        if spec.name in self._retired:
            runner.carry_counters(*self._retired.pop(spec.name))
        scope = anyio.CancelScope()
        self.runners[spec.name] = runner
        self._scopes[spec.name] = scope
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
        tg.start_soon(run_runner)

    async def end(self, names: Sequence[str]) -> list[ServiceRunner]:
        """End these runners (each terminates whatever it spawned, within its stop_timeout)
        and wait until they have; they stay listed until `retire`."""
        ending = [self.runners[name] for name in names]
        for name in names:
            self._scopes[name].cancel()
        for runner in ending:
            await runner.wait_until(lambda s: False)  # returns once the runner has finished
        return ending

    def retire(self, ending: Sequence[ServiceRunner]) -> None:
        """Unlist ended runners, keeping their counters for a successor of the same name."""
        for runner in ending:
            name = runner.spec.name
            del self._scopes[name], self.runners[name]
            self._retired[name] = (runner.machine.starts, dict(runner.machine.exits),
                                   runner.probe_failures())

    # -- start -----------------------------------------------------------------------------
    @staticmethod
    def independent(specs: Sequence[ServiceSpec]) -> list[ServiceSpec]:
        """Autostarts with nothing to wait for."""
        return [s for s in specs if s.autostart and not s.depends_on and not s.wait_for]

    @staticmethod
    def dependent(specs: Sequence[ServiceSpec]) -> list[ServiceSpec]:
        """Autostarts that wait for a dependency or a check."""
        return [s for s in specs if s.autostart and (s.depends_on or s.wait_for)]

    async def spawn_independent(self, specs: Sequence[ServiceSpec]) -> None:
        """Spawn what has nothing to wait for, so READY=1 means "spawned and listening";
        services with depends_on or wait_for follow in the background (start_all)."""
        now = self.independent(specs)
        for spec in now:
            self.runners[spec.name].start()
        with anyio.move_on_after(10):
            for spec in now:
                await self.runners[spec.name].wait_until(lambda s: s.state is not lc.State.STOPPED)

    async def start_all(self, specs: Sequence[ServiceSpec]) -> None:
        with anyio.CancelScope() as scope:
            self._start_scopes.add(scope)
            try:
                async with anyio.create_task_group() as tg:
                    for spec in specs:
                        if spec.autostart:
                            tg.start_soon(self._start_when_ready, spec)
            finally:
                self._start_scopes.discard(scope)

    def cancel_pending_starts(self) -> None:
        for scope in self._start_scopes:
            scope.cancel()

    def start(self, name: str) -> None:
        self.runners[name].start()

    def stop(self, name: str) -> None:
        self.runners[name].stop()

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
                if not await self._wait_healthy(spec.wait_for, spec.wait_timeout):
                    log.warning("checks still failing after wait_timeout, starting anyway "
                                "service=%s checks=%s", spec.name, ",".join(spec.wait_for))
            # Shutdown cancels pending starts, but one queued just before it began may run
            # after; a reload replacing this runner ends it before its successor starts.
            if (self.runners.get(spec.name) is runner and self._may_start()
                    and spec.name not in self.replacing):
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
            if other is not None and dep not in ignore and not dependency_satisfied(
                    other.snapshot):
                blockers[dep] = blocked_because(other.snapshot)
        return blockers

    async def _wait_dependency_change(self, blockers: Mapping[str, str]) -> None:
        """Return once any of `blockers` is satisfied or blocks for another reason."""
        watched = [(self.runners.get(dep), why) for dep, why in blockers.items()]
        async with anyio.create_task_group() as tg:

            async def watch(runner: ServiceRunner | None, why: str) -> None:
                if runner is not None:  # None: removed by a reload meanwhile
                    await runner.wait_until(lambda s: dependency_satisfied(s)
                                            or blocked_because(s) != why)
                tg.cancel_scope.cancel()

            for runner, why in watched:
                tg.start_soon(watch, runner, why)

    # -- stop ------------------------------------------------------------------------------
    async def stop_in_order(self, names: list[str], *, swept: bool = False) -> None:
        """Stop `names`, dependents before their dependencies: one dependency level after
        another, each as one batch (process/stopbatch.py: a task and a signalling pass per
        service made a shutdown of 1,000 services take ~1 s). `swept`: a final sweep of every
        descendant follows (shutdown as subreaper), so no runner looks for its escapees."""
        depends_on = {n: r.spec.depends_on for n in names if (r := self.runners.get(n))}
        for level in stop_levels(names, depends_on):
            runners = [r for n in level if (r := self.runners.get(n)) is not None]
            batch = StopBatch(swept=swept)
            async with anyio.create_task_group() as tg:
                tg.start_soon(batch.run_timers)
                stops: list[tuple[ServiceRunner, int]] = []
                for start in range(0, len(runners), STOP_CHUNK):
                    if start:  # the previous chunk's signals go out before these stops
                        await batch.send_queued()
                    stops += [(runner, runner.stop(batch))
                              for runner in runners[start:start + STOP_CHUNK]]
                await batch.flush()
                for runner, number in stops:
                    await runner.wait_stopped(number)
                tg.cancel_scope.cancel()
            for runner in runners:
                runner.end_batch()

    async def end_all(self, remove_cgroups: Callable[[], object] | None,
                      within: float = 0.5) -> None:
        """At shutdown, once every service is stopped: end the runners by closing their event
        queues (cancelling 1,000 runners' task groups took 0.16 s) while `remove_cgroups`
        removes their cgroups in one pass in a worker thread. Whatever has not ended within
        `within` is cancelled with the daemon's task group."""
        runners = list(self.runners.values())
        async with anyio.create_task_group() as tg:
            if remove_cgroups is not None:  # rmdir ~60 us each
                tg.start_soon(functools.partial(anyio.to_thread.run_sync, remove_cgroups))
            for runner in runners:
                runner.close(keep_cgroup=remove_cgroups is not None)
            with anyio.move_on_after(within):
                for runner in runners:
                    await runner.wait_until(lambda s: False)  # returns once it has ended


def dependency_satisfied(s: ServiceSnapshot) -> bool:
    if s.state is lc.State.EXITED and s.last_exit is not None and s.last_exit.reason == "success":
        return True
    if s.ready is not None:  # it has a readiness probe: ready, not merely running
        return s.ready and s.state in (lc.State.STARTING, lc.State.RUNNING)
    return s.state is lc.State.RUNNING


def blocked_because(s: ServiceSnapshot) -> str:
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
