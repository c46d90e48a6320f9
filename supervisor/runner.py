"""The I/O shell around one service's Lifecycle: spawns, signals, timers, exit watching.

Everything that happens to the service becomes an event on one queue; one task applies the
events to the pure Lifecycle in order and performs the actions it returns. After each event
an immutable ServiceSnapshot is published for the HTTP threads.

The runner is the service's fault boundary: an unexpected exception in a spawn, a lifecycle
step or one of its tasks kills what is left of the service's process group and makes the
service `fatal` with the error (status, log, metrics); the daemon and the other services go
on, and an operator's start tries again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from supervisor.config import ServiceSpec, child_environment
from supervisor.core import lifecycle as lc
from supervisor.core.datatypes import signal_name
from supervisor.core.errors import SpawnError
from supervisor.core.snapshot import ProbeStatus, ServiceSnapshot
from supervisor.process import descendants
from supervisor.process.output import drain
from supervisor.process.spawn import Child, monotonic_and_wall, spawn

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from supervisor.checks.probes import CheckResult
    from supervisor.process.cgroup import ServiceCgroup
    from supervisor.process.stopbatch import StopBatch

Spawner = Callable[[Sequence[str], Mapping[str, str], str], Child]

log = logging.getLogger(__name__)


class ServiceRunner:
    def __init__(self, spec: ServiceSpec, *, environ: Mapping[str, str],
                 publish: Callable[[ServiceSnapshot], None],
                 rng: Callable[[], float] = random.random,
                 spawner: Spawner = spawn, cgroup: ServiceCgroup | None = None,
                 owned: Callable[[], Collection[int] | None] = lambda: None) -> None:
        self.spec = spec
        # Containment: the service's cgroup, or (without one) its process tree and the
        # escapees marked as its own among our children that are not in `owned()` (None:
        # not looked for, when we are no subreaper or the daemon's final sweep will do).
        self.cgroup = cgroup
        self._owned = owned
        self._invocations: dict[int, str] = {}  # leader pid -> its invocation id
        self._placed: dict[int, anyio.Event] = {}  # leader pid -> set once in its cgroup
        self._misplaced: int | None = None  # a leader whose placement failed (in our leaf)
        self._emptied: Child | None = None  # the last start whose cgroup was seen empty
        self.machine = lc.Lifecycle(spec.policy(), rng)
        self._environ = environ
        self._publish = publish
        self._spawner = spawner
        self._send, self._receive = anyio.create_memory_object_stream[lc.Event](math.inf)
        self._child: Child | None = None
        self._timer_scope: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None  # while the event loop below runs
        # Set by a batched stop (daemon shutdown, reload): signals and the kill timer go
        # through it (stopbatch.py) until the daemon ends the batch.
        self._batch: StopBatch | None = None
        self._keep_cgroup = False  # close(): the daemon removes every cgroup in one pass
        self._changed = anyio.Event()
        self.finished = False
        self._posted = self._applied = 0  # events queued / applied, for wait_applied
        probes = spec.probes()
        self._probe_scope: anyio.CancelScope | None = None  # the current process's probes
        self._ready: bool | None = False if "readiness" in probes else None
        self._probe_status: dict[str, ProbeStatus] = dict.fromkeys(probes, ProbeStatus())
        self.snapshot = self._make_snapshot()

    def __repr__(self) -> str:
        return f"<ServiceRunner {self.machine!r}>"

    # -- public, called from the daemon's tasks ------------------------------------------
    def start(self) -> int:
        """Ask for a start; returns the request's number for `wait_applied`."""
        return self._post(lc.StartRequested(_now()))

    def stop(self, batch: StopBatch | None = None) -> int:
        """Ask for a stop; returns the request's number for `wait_stopped`. With a `batch`
        the stop is applied at once when nothing is queued before it (no wake-up of this
        runner's task), and its signals and kill timer go through the batch."""
        event = lc.StopRequested(_now())
        if batch is None:
            return self._post(event)
        self._batch = batch
        return self._post_batched(event)

    def _post_batched(self, event: lc.Event) -> int:
        """In a batched stop: apply `event` now if nothing is queued before it (one wake-up
        of this runner's task less per event, at 1,000 services a tenth of a shutdown);
        else queue it, to be applied in order."""
        if self._tg is None or self.finished or self._posted != self._applied:
            return self._post(event)
        self._posted += 1
        try:
            self._apply(event)
        except Exception as exc:  # noqa: BLE001 - the service's fault boundary, as in run()
            log.error("service failed unexpectedly service=%s error=%s", self.spec.name,
                      _describe(exc), exc_info=exc)
            self.fault(_describe(exc))
        return self._posted

    def end_batch(self) -> None:
        """The batched stop is over (the service settled): back to signalling alone."""
        if self._batch is not None:
            self._batch.cancel_timer(self)
            self._batch = None

    async def wait_stopped(self, number: int) -> ServiceSnapshot:
        """Wait until the stop numbered `number` is applied and the service settled."""
        return await self.wait_until(
            lambda s: self._applied >= number and s.state in lc.SETTLED_STATES)

    def close(self, keep_cgroup: bool = False) -> None:
        """End the runner without cancelling it (cheaper, at shutdown, once its service is
        stopped): its event loop ends, and with it the runner, as on cancellation. With
        `keep_cgroup` the caller removes the service's cgroup."""
        self._keep_cgroup = keep_cgroup
        self._send.close()

    def hold(self, reason: str, refresh: bool = False) -> None:
        """Show the service as `waiting` for `reason` (see lifecycle.Held)."""
        self._post(lc.Held(reason, _now(), refresh))

    def fault(self, error: str) -> None:
        """Make the service `fatal` with `error` (an unexpected error outside the runner)."""
        at, wall = monotonic_and_wall()
        self._post(lc.Faulted(error, at, wall))

    def release(self) -> None:
        """Start the service if it is still waiting (not if an operator stopped it)."""
        self._post(lc.Released(_now()))

    async def wait_until(self, predicate: Callable[[ServiceSnapshot], bool]) -> ServiceSnapshot:
        """Wait for a snapshot matching `predicate`; returns early if the runner has ended."""
        while not predicate(self.snapshot) and not self.finished:
            changed = self._changed
            await changed.wait()
        return self.snapshot

    async def wait_applied(self, number: int) -> ServiceSnapshot:
        """Wait until the event numbered `number` (see start) has been applied."""
        return await self.wait_until(lambda s: self._applied >= number)

    def carry_counters(self, starts: int, exits: Mapping[str, int],
                       probe_failures: Mapping[str, int] | None = None) -> None:
        """Continue the counts of the runner this one replaces (a reload changed the service):
        they count for the daemon's lifetime and never go back. Before run() only."""
        self.machine.starts = starts
        self.machine.exits.update(exits)
        for kind, count in (probe_failures or {}).items():
            if kind in self._probe_status:
                self._probe_status[kind] = dataclasses.replace(self._probe_status[kind],
                                                               failures=count)
        self.snapshot = self._make_snapshot()

    def probe_failures(self) -> dict[str, int]:
        return {kind: status.failures for kind, status in self._probe_status.items()}

    def child_pid(self) -> int | None:
        """The pid of our child while it is unreaped (and so safe to signal)."""
        child = self._child
        return child.pid if child is not None and child.status is None else None

    async def stop_and_wait(self) -> ServiceSnapshot:
        self.stop()
        # Not settled before our stop is handled: a start still queued ahead of it would spawn
        # a process after a "stopped" snapshot (a reload then ran old and new side by side).
        stop = self._posted
        return await self.wait_until(
            lambda s: self._applied >= stop and s.state in lc.SETTLED_STATES)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Process events until cancelled; on the way out, stop the child for good."""
        started = False
        try:
            while True:
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        if not started:
                            started = True
                            task_status.started()
                        try:
                            async for event in self._receive:
                                self._apply(event)
                        finally:
                            self._tg = None
                    return
                except Exception as exc:  # noqa: BLE001 - the service's fault boundary
                    # Cancellation is a BaseException (never caught here); an error in any of
                    # this runner's tasks ends its task group and lands here.
                    await self._contain(exc)
        finally:
            self._tg = None
            self._receive.close()
            self._send.close()
            with anyio.CancelScope(shield=True):
                await self._terminate()
            if self.cgroup is not None and not self._keep_cgroup and (
                    self._seen_empty() or not self.cgroup.populated()):
                self.cgroup.remove()
            self.finished = True
            self._changed.set()

    # -- internals -------------------------------------------------------------------------
    async def _contain(self, exc: Exception) -> None:
        """Make the service `fatal` with the error, killing and reaping what it left."""
        error = _describe(exc)
        log.error("service failed unexpectedly service=%s state=fatal error=%s",
                  self.spec.name, error, exc_info=exc)
        self._timer_scope = None
        child, self._child = self._child, None
        with anyio.CancelScope(shield=True):
            if child is not None:
                # Also once the leader is reaped: leftovers in its group go with it.
                child.signal_group(lc.SIGKILL)
            if child is not None and child.status is None:
                try:
                    with anyio.move_on_after(5):
                        await child.wait()
                except Exception as wait_error:  # noqa: BLE001 - the wait itself failed
                    log.error("cannot reap service=%s pid=%d error=%s", self.spec.name,
                              child.pid, _describe(wait_error))
                child.close_if_unreaped()
        at, wall = monotonic_and_wall()
        before = self.machine.state
        self.machine.handle(lc.Faulted(error, at, wall))  # its SignalGroup was done above
        log.debug("state service=%s %s -> %s", self.spec.name, before, self.machine.state)
        self._published()

    def _post(self, event: lc.Event) -> int:
        try:
            self._send.send_nowait(event)
            self._posted += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("event after shutdown service=%s event=%r", self.spec.name, event)
        return self._posted

    def _apply(self, event: lc.Event) -> None:
        self._applied += 1
        before, reason = self.machine.state, self.machine.waiting_for
        for action in self.machine.handle(event):
            self._perform(action)
        after = self.machine.state
        if after is not before and after not in (lc.State.STARTING, lc.State.RUNNING):
            self._stop_probes()  # stopping or gone: its probes end with it
        waiting_for = self.machine.waiting_for
        if after is lc.State.WAITING and (before is not after or reason != waiting_for):
            log.info("waiting service=%s reason=%s", self.spec.name, waiting_for)
        if after is not before:
            log.debug("state service=%s %s -> %s", self.spec.name, before, after)
            if after is lc.State.FATAL and not isinstance(event, lc.Faulted):
                log.error("gave up service=%s after %d quick failures (max_retries)",
                          self.spec.name, self.machine.quick_failures)
        self._published()

    def _published(self) -> None:
        self.snapshot = self._make_snapshot()
        self._publish(self.snapshot)
        self._changed.set()
        self._changed = anyio.Event()

    def _perform(self, action: lc.Action) -> None:
        if isinstance(action, lc.Spawn):
            self._spawn(action.attempt)
        elif isinstance(action, lc.SignalGroup):
            child = self._child
            if child is not None:
                send = self._signaller(child, action.signal)
                # Batched: one line per batch (stopbatch.py), this one for debugging only.
                batched = self._batch is not None and self._batch.signal(self.spec.name, send)
                if child.status is None:
                    log.log(logging.DEBUG if batched else logging.INFO,
                            "signal service=%s pid=%d signal=%s", self.spec.name, child.pid,
                            signal_name(action.signal))
                if not batched:
                    send()
        elif isinstance(action, lc.StartTimer):
            self._start_timer(action.kind, action.delay, action.generation)
        elif isinstance(action, lc.CancelTimer):
            self._cancel_timer()

    def _spawn(self, attempt: int) -> None:
        assert self._tg is not None
        env = child_environment(self.spec, self._environ)
        # How an escapee is told apart without cgroups (descendants.py).
        invocation = os.urandom(16).hex()
        env[descendants.MARKER] = self.spec.name
        env[descendants.INVOCATION] = invocation
        try:
            child = self._spawner(self.spec.command, env, self.spec.cwd)
        except SpawnError as exc:
            at, wall = monotonic_and_wall()
            log.error("spawn failed service=%s error=%s", self.spec.name, exc)
            self._post(lc.SpawnFailed(str(exc), at, wall, attempt))
            return
        at, wall = monotonic_and_wall()
        self._child = child
        self._invocations[child.pid] = invocation
        log.info("spawned service=%s pid=%d", self.spec.name, child.pid)
        self._tg.start_soon(drain, child.stdout, self.spec.name, "stdout",
                            self.spec.stdout_priority, child.pid)
        self._tg.start_soon(drain, child.stderr, self.spec.name, "stderr",
                            self.spec.stderr_priority, child.pid)
        placed = None
        if self.cgroup is not None:
            placed = anyio.Event()
            self._placed = {child.pid: placed}  # an earlier start's is placed by now
            self.cgroup.tree.pending.add(child.pid)
        # One task places (in cgroup mode) and then watches: a task less per spawn.
        self._tg.start_soon(self._watch, child, invocation, placed)
        # Applied synchronously so that no other event can slip between Spawn and Spawned.
        for action in self.machine.handle(lc.Spawned(child.pid, at, wall)):
            self._perform(action)
        self._start_probes(env, child.pid)

    # -- probes ----------------------------------------------------------------------------
    def _start_probes(self, env: dict[str, str], pid: int) -> None:
        probes = self.spec.probes()
        self._stop_probes()
        if not probes:
            return
        assert self._tg is not None
        # Imported for probed services only: the probes' stack (asyncio, ssl, ~30 ms) would
        # delay every spawn at startup.
        from supervisor.checks.probe_runner import run_probes

        scope = self._probe_scope = anyio.CancelScope()
        name = self.spec.name
        # A new process: no verdict yet (failure counts and the last error stay).
        self._probe_status = {kind: ProbeStatus(old.failures, None, old.last_error)
                              for kind, old in self._probe_status.items()}

        async def probing() -> None:
            with scope:
                # Probe commands are spawned without the orphan guard (which keeps what it
                # is given for the daemon's lifetime): PR_SET_PDEATHSIG covers them instead.
                # Each verdict names the process it is about (a cancelled probe task may
                # still report once, after the next process started).
                await run_probes(name, probes,
                                 report=functools.partial(self._probe_report, pid),
                                 failed=functools.partial(self._probe_failed, pid),
                                 ready=functools.partial(self._probe_ready, pid),
                                 spawner=_probe_spawn, env=env, cwd=self.spec.cwd)

        self._tg.start_soon(probing)

    def _stop_probes(self) -> None:
        if self._probe_scope is not None:
            self._probe_scope.cancel()
            self._probe_scope = None
        if self._ready:
            self._ready = False
            log.info("not ready service=%s reason=process not running", self.spec.name)

    def _probe_report(self, pid: int, kind: str, result: CheckResult) -> None:
        if self.child_pid() != pid:
            return  # about a process that has exited: moot
        old = self._probe_status[kind]
        if result.healthy:
            new = dataclasses.replace(old, passing=True)
        else:
            new = dataclasses.replace(old, failures=old.failures + 1, passing=False,
                                      last_error=result.error)
            # One line when a probe starts failing (or its error changes), not one per period.
            level = logging.INFO if (old.passing, old.last_error) != (False, result.error) \
                else logging.DEBUG
            log.log(level, "probe failed service=%s probe=%s error=%s", self.spec.name, kind,
                    result.error)
        self._probe_status[kind] = new
        if new != old:
            self._published()

    def _probe_failed(self, pid: int, kind: str, error: str) -> None:
        spec = self.spec.probes()[kind]
        # About a process that has exited already: the lifecycle ignores it (ProbeFailed:stale),
        # so the log must not announce a restart it will not make.
        current = self.child_pid() == pid
        log.log(logging.WARNING if current else logging.DEBUG,
                "%s probe failed %d times, %s service=%s pid=%d error=%s", kind,
                spec.failure_threshold, "restarting" if current else "process already gone",
                self.spec.name, pid, error)
        self._post(lc.ProbeFailed(kind, error, _now(), pid))

    def _probe_ready(self, pid: int, ready: bool, error: str | None) -> None:
        if self.child_pid() != pid:
            return  # about a process that has exited: the next one is not ready for it
        self._ready = ready
        if ready:
            log.info("ready service=%s", self.spec.name)
        else:
            # Dependents keep running; the change is reported (log, status, service_ready).
            log.warning("not ready service=%s error=%s", self.spec.name, error)
        self._published()

    async def _place(self, cgroup: ServiceCgroup, child: Child, invocation: str,
                     placed: anyio.Event) -> None:
        """Into its cgroup, with whatever it forked meanwhile (cgroup.py: why after the
        exec). Strays moved after a stop signal was sent get it now."""
        try:
            strays = await cgroup.place(child.pid, invocation)
        except OSError as exc:
            log.error("cannot place service=%s pid=%d in its cgroup error=%s",
                      self.spec.name, child.pid, exc.strerror or exc)
            # It runs in the daemon's leaf: signals to its cgroup would miss it (a stop
            # then waited out stop_timeout and the daemon's bound). Its group and tree are
            # signalled instead, as without cgroups, and the guard's kill of our leaf holds.
            self._misplaced = child.pid
            strays = []
            if self.machine.state is lc.State.STOPPING and child is self._child:
                self._tree_signaller(child, self.spec.stop_signal)()
        finally:
            placed.set()
        if strays and self.machine.state is lc.State.STOPPING:
            descendants.signal_pids(strays, self.spec.stop_signal)

    async def _watch(self, child: Child, invocation: str, placed: anyio.Event | None) -> None:
        if placed is not None:
            assert self.cgroup is not None
            # Placed first: unreaped until then, so the pid written into the cgroup is ours.
            await self._place(self.cgroup, child, invocation, placed)
        status = await child.wait()
        # Not current: a fault let it go (and killed its group) and a new start owns the
        # cgroup now, which it must neither kill nor wait to see empty.
        current = child is self._child
        if current:
            self._stop_probes()
        at, wall = monotonic_and_wall()
        if self.cgroup is not None:
            # Stopped means empty. Stopping: the kill timer ends any straggler; otherwise
            # the leader died on its own and takes the rest with it, as it always did.
            if current and self.machine.state is not lc.State.STOPPING:
                self.cgroup.signal(lc.SIGKILL)
            if current:
                await self.cgroup.wait_empty()
                self._emptied = child  # nothing can enter it any more: no kill needed on Exited
            if self._batch is None or not self._batch.swept:  # else the final sweep does
                await self._kill_unplaced(child)
            self._invocations.pop(child.pid, None)  # one per start: a crash loop lasts weeks
        elif self._tg is not None and self._owned() is not None:
            self._tg.start_soon(self._sweep_after, child)
        else:  # no escapee of ours to look for (not a subreaper, or the final sweep will)
            self._invocations.pop(child.pid, None)
        level = logging.INFO if self.machine.state is lc.State.STOPPING else logging.WARNING
        log.log(level, "exited service=%s pid=%d %s", self.spec.name, child.pid, status.describe())
        exited = lc.Exited(child.pid, status.code, status.signal, at, wall)
        if self._batch is not None:
            self._post_batched(exited)
        else:
            self._post(exited)

    async def _kill_unplaced(self, child: Child, rounds: int = 5, pause: float = 0.01) -> None:
        """The start is over: whatever of it never reached its cgroup (a leader killed within
        its ~10 ms placement window leaves its setsid() children in our leaf, re-parented to
        us) goes now, or it would outlive its service. Seen under load in 1 of 200 fast
        restarts of `sh -c 'setsid sleep & exec sleep'`."""
        assert self.cgroup is not None
        invocation = self._invocations.get(child.pid)
        if invocation is None:
            return
        for _ in range(rounds):
            strays = self.cgroup.tree.strays(child.pid, invocation)
            if not strays:
                return
            log.warning("killing processes of service=%s that escaped its cgroup pids=%s",
                        self.spec.name, ",".join(map(str, strays)))
            descendants.signal_pids(strays, lc.SIGKILL)
            await anyio.sleep(pause)

    def _start_timer(self, kind: lc.TimerKind, delay: float, generation: int) -> None:
        """Post TimerFired in `delay` seconds. A timer that fires just as it is cancelled or
        replaced still posts; its `generation` tells the lifecycle to ignore it."""
        self._cancel_timer()

        def fired() -> None:
            self._post(lc.TimerFired(kind, _now(), generation))

        if self._batch is not None and kind == "kill":
            self._batch.start_timer(self, delay, fired)
            return
        assert self._tg is not None
        scope = anyio.CancelScope()
        self._timer_scope = scope

        async def fire() -> None:
            with scope:
                await anyio.sleep(delay)
                fired()

        self._tg.start_soon(fire)

    def _cancel_timer(self) -> None:
        if self._batch is not None:
            self._batch.cancel_timer(self)
        if self._timer_scope is not None:
            self._timer_scope.cancel()
            self._timer_scope = None

    def _signal_all(self, child: Child, sig: int) -> None:
        """`sig` to every process of the service: its cgroup, or its group, tree and
        adopted escapees."""
        self._signaller(child, sig)()

    def _signaller(self, child: Child, sig: int) -> Callable[[], object]:
        """What `_signal_all` sends, decided now (from the runner's state, on the event
        loop), to be sent now or from a batch's worker thread (system calls only)."""
        if self.cgroup is not None:
            if self._emptied is child:
                return _nothing
            if self._misplaced == child.pid:
                return self._tree_signaller(child, sig)
            placed = self._placed.get(child.pid)
            if placed is None or placed.is_set():
                return functools.partial(self.cgroup.signal, sig)
            # Not in its cgroup yet (~10 ms): its group now, strays once placed.
            return functools.partial(child.signal_group, sig)
        return self._tree_signaller(child, sig)

    def _tree_signaller(self, child: Child, sig: int) -> Callable[[], object]:
        """Without a cgroup (or outside it): the group, the tree, adopted escapees."""
        invocation = self._invocations.get(child.pid)
        if invocation is None:
            return functools.partial(child.signal_group, sig)
        leader = child.pid if child.status is None else None
        return functools.partial(_signal_tree, child, sig, invocation, leader, self._owned())

    async def _sweep_after(self, child: Child, rounds: int = 20, pause: float = 0.01) -> None:
        """Without a cgroup: after a start's leader is gone, SIGKILL what is left of that
        start a few more times, for escapees re-parented to us after the first sweep (their
        parent died of it). Keyed by invocation id, so never the next start's processes."""
        invocation = self._invocations.get(child.pid)
        if invocation is None:
            return
        try:
            for _ in range(rounds):
                await anyio.sleep(pause)
                owned = self._owned()
                if owned is None:
                    return
                found = descendants.live(descendants.of_invocation(invocation, None, owned))
                if not found:
                    return
                log.info("killing escapees service=%s count=%d", self.spec.name, len(found))
                descendants.signal_pids(found, lc.SIGKILL)
        finally:
            self._invocations.pop(child.pid, None)

    async def _terminate(self) -> None:
        """Last resort when the runner is torn down with the child still alive (daemon shutdown
        without an orderly stop, or an error): stop_signal, grace, SIGKILL, reap."""
        child = self._child
        cgroup = self.cgroup
        if cgroup is not None and not self._seen_empty() and cgroup.populated():
            cgroup.signal(self.spec.stop_signal)
            if not await cgroup.wait_empty(self.spec.stop_timeout):
                cgroup.signal(lc.SIGKILL)
                await cgroup.wait_empty(5)
        if child is None or child.status is not None:
            return
        self._signal_all(child, self.spec.stop_signal)
        with anyio.move_on_after(self.spec.stop_timeout):
            await child.wait()
        if child.status is None:
            self._signal_all(child, lc.SIGKILL)
            with anyio.move_on_after(5):
                await child.wait()
        self._signal_all(child, lc.SIGKILL)  # leftovers
        child.close_if_unreaped()

    def _seen_empty(self) -> bool:
        """The last start's cgroup was seen empty after it ended, so it is still empty (no
        start since): spares two cgroup.events reads per service at shutdown."""
        return self._child is not None and self._emptied is self._child

    def _make_snapshot(self) -> ServiceSnapshot:
        return self.machine.snapshot(
            autostart=self.spec.autostart, ready=self._ready, probes=self._probe_status,
            cgroup=self.cgroup.path if self.cgroup is not None else None)


def _nothing() -> None:
    return None


def _signal_tree(child: Child, sig: int, invocation: str, leader: int | None,
                 owned: Collection[int] | None) -> None:
    """Without a cgroup: the group, then the rest of the start's tree and its adopted
    escapees (`owned`: what to skip among our children, computed on the event loop)."""
    child.signal_group(sig)
    found = descendants.of_invocation(invocation, leader, owned)
    descendants.signal_pids([pid for pid in found if pid != leader], sig)


def _describe(exc: BaseException) -> str:
    """One line naming an unexpected error; the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")


def _probe_spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
    return spawn(argv, env, cwd)


def _now() -> float:
    return monotonic_and_wall()[0]

