"""The per-service lifecycle as a pure state machine, with every transition in one table.

Events go in (`Exited(pid=7, code=3, signal=None, at=12.5)`), actions come out (`Spawn(1)`,
`SignalGroup(15)`, `StartTimer("kill", 10.0, 3)`). Nothing here reads a clock, forks or sleeps:
time arrives inside events, randomness through the `random` callable. The runner is the
imperative shell that performs the actions and feeds back what happened; what the lifecycle
decides with is a `Policy` (core/policy.py), what it shows is `snapshot()`.

States follow supervisord's well-known set (core/snapshot.py). A service whose start is held
back (an unsatisfied `depends_on`, `wait_for` checks) is `waiting`, with the reason; an
unexpected error in its runner makes it `fatal` (`Faulted`). A failed liveness (or startup)
probe stops the process through the normal stop path (stop_signal, stop_timeout, SIGKILL); its
exit is recorded with reason `liveness` and the restart policy and backoff then apply as to
any other failure.

The table
---------
Every event in every state (tests/test_lifecycle_table.py parses this table and checks the
code against it, pair by pair). A row reads `states -> next state(s)  actions  [note]`; a row
may continue on the next line. `=` keeps the state, `|` separates the outcomes that policy and
history choose between, `!` cannot happen and raises LifecycleError (the runner's fault
boundary then makes that service `fatal`), `other` is every state not in the event's other
rows, `-` cannot arise (there is no current process for the event to name).
`starting/no-pid` and `stopping/no-pid` are those states after a Spawn that failed,
while its SpawnFailed is still queued; otherwise `starting` and `stopping` have a pid, and
`running` always has one. Actions: Spawn, Cancel (CancelTimer), Stop (SignalGroup(stop_signal)),
Kill (SignalGroup(SIGKILL)), Timer:kind (StartTimer(kind, delay, generation)). An event about a
process or a timer names it (core/events.py); `:stale` is such an event about another one.

    StartRequested
      stopped exited fatal waiting      -> starting                Spawn [1]
      backoff                           -> starting                Cancel Spawn
      starting starting/no-pid running  -> =
      stopping stopping/no-pid          -> =                       [2]
    StopRequested
      starting starting/no-pid running  -> stopping                Stop Timer:kill
      backoff                           -> stopped                 Cancel
      exited fatal waiting              -> stopped
      stopped stopping stopping/no-pid  -> =                       [3]
    Spawned
      starting/no-pid                   -> starting|running        Timer:started [4]
      other                             -> !
    SpawnFailed
      starting/no-pid                   -> starting|backoff|fatal  Spawn Timer:backoff [5]
      stopping/no-pid                   -> stopped|starting        Cancel Spawn [2]
      other                             -> =                       [6]
    SpawnFailed:stale
      other                             -> =                       [6]
    Exited
      starting running                  -> starting|backoff|exited|fatal
                                           Kill Cancel Spawn Timer:backoff [5]
      stopping                          -> stopped|starting|backoff|exited|fatal
                                           Kill Cancel Spawn Timer:backoff [7]
      other                             -> -
    Exited:stale
      other                             -> =                       [8]
    TimerFired:started
      starting                          -> running                 [9]
      other                             -> !
    TimerFired:backoff
      backoff                           -> starting                Spawn [9]
      other                             -> !
    TimerFired:kill
      stopping stopping/no-pid          -> =                       Kill [9]
      other                             -> !
    TimerFired:stale
      other                             -> =                       [10]
    Held
      stopped exited fatal waiting      -> waiting                 [11]
      other                             -> =
    Held:refresh
      waiting                           -> waiting                 [11]
      other                             -> =
    Released
      waiting                           -> starting                Spawn
      other                             -> =
    Faulted
      other                             -> fatal                   Kill Cancel [12]
    ProbeFailed
      starting running                  -> stopping                Stop Timer:kill [13]
      stopping                          -> =                       [13]
      other                             -> -
    ProbeFailed:stale
      other                             -> =                       [14]

[1] An operator's start is a fresh attempt: the count of quick failures starts again at 0.
[2] Spawns again once stopped if a start came while stopping (a `restart` is stop + start).
[3] Stopping already: forgets a start asked meanwhile, and a failed probe's restart.
[4] `running` at once, without the timer, when start_seconds <= 0.
[5] By the restart policy and the backoff: `starting` when the delay is 0 (the first restart
    after a stable run), `backoff` with the delay's timer, `fatal` after max_retries quick
    failures in a row, `exited` when the policy says stay down. A failed spawn is quick.
[6] No spawn of this service is outstanding: the late failure of one that a fault overtook;
    `:stale`, of an attempt before the last Spawn (after a fault and a start), whichever
    state: counting it would count the new attempt's failure against the old one.
[7] `stopped` after a stop (`starting` if a start came meanwhile); after a failed probe's
    stop, as after a failure [5], with reason `liveness`.
[8] The exit of a process that is not the current one (another pid, or none is current): one
    that a fault let go, exiting after the next start. Counting it would count one exit twice
    and SIGKILL the current process's group. A pid can name a new process only after the
    kernel has gone round pid_max, far longer than an event waits in the queue.
[9] TimerFired:kind is the live timer: the generation of the last StartTimer, not cancelled
    since. Each kind is live only in its state: `started` in starting (with a pid), `backoff`
    in backoff, `kill` in stopping.
[10] A timer replaced or cancelled after it had fired (its event already queued), even one of
    the same kind: an earlier stop's kill timer must not cut a later stop's grace short.
[11] `Held(refresh=True)` only updates the reason of a service still waiting, so that an
    operator's stop is never undone by a later update; `Held` also puts one back to waiting.
[12] Kill when it has a process, Cancel when a timer is live; an operator's start tries again.
[13] Stops it as a stop would; stopping already, the verdict is moot.
[14] A verdict on an earlier process (the probes' pid), queued before it exited: moot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from supervisor.core.errors import LifecycleError
from supervisor.core.events import (
    Action,
    CancelTimer,
    Event,
    Exited,
    Faulted,
    Held,
    ProbeFailed,
    Released,
    SignalGroup,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRequested,
    StartTimer,
    StopRequested,
    TimerFired,
    TimerKind,
)
from supervisor.core.policy import Policy, restart_delay
from supervisor.core.snapshot import (
    ACTIVE_STATES,
    EXIT_REASONS,
    SETTLED_STATES,
    ExitReason,
    LastExit,
    ProbeStatus,
    ServiceSnapshot,
    State,
)

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # pragma: no cover
    from typing_extensions import assert_never

# The lifecycle's whole vocabulary, for `from supervisor.core import lifecycle as lc`.
__all__ = [
    "ACTIVE_STATES", "EXIT_REASONS", "SETTLED_STATES", "SIGKILL", "TIMER_STATE", "Action",
    "CancelTimer", "Event", "ExitReason", "Exited", "Faulted", "Held", "LastExit", "Lifecycle",
    "LifecycleError", "Policy", "ProbeFailed", "Released", "SignalGroup", "Spawn", "SpawnFailed",
    "Spawned", "StartRequested", "StartTimer", "State", "StopRequested", "TimerFired",
    "TimerKind",
]

SIGKILL = 9

# The one state in which each timer can be live (note [9]).
TIMER_STATE: Mapping[TimerKind, State] = {
    "started": State.STARTING, "backoff": State.BACKOFF, "kill": State.STOPPING}


@dataclass
class Lifecycle:
    policy: Policy
    random: Callable[[], float]
    state: State = State.STOPPED
    pid: int | None = None
    started_at: float | None = None  # monotonic, current process
    started_wall: float | None = None
    starts: int = 0
    quick_failures: int = 0
    next_start_at: float | None = None  # monotonic, while in BACKOFF
    last_exit: LastExit | None = None
    last_error: str | None = None
    exits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXIT_REASONS, 0))
    timer: TimerKind | None = None  # the live timer
    timer_generation: int = 0  # of the last StartTimer: a TimerFired must carry it (note [10])
    spawn_attempt: int = 0  # of the last Spawn: a SpawnFailed must carry it (note [6])
    start_after_stop: bool = False
    waiting_for: str | None = None  # while WAITING: what the start is held back for
    # While STOPPING because a probe failed: restart after the exit (as after a failure);
    # `probe_kill_running` says whether the process had reached RUNNING (for the backoff).
    probe_kill: str | None = None
    probe_kill_running: bool = False

    def __repr__(self) -> str:
        return (f"<Lifecycle {self.policy.name} {self.state} pid={self.pid} "
                f"starts={self.starts} quick_failures={self.quick_failures}>")

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; raises LifecycleError (changing nothing) for a pair marked `!`."""
        match event:  # the runner's most frequent events first
            case Spawned():
                actions = self._spawned(event)
            case Exited():
                actions = self._exited(event)
            case TimerFired():
                actions = self._timer_fired(event)
            case StartRequested():
                actions = self._start_requested()
            case StopRequested():
                actions = self._stop_requested()
            case SpawnFailed():
                actions = self._spawn_failed(event)
            case ProbeFailed():
                actions = self._probe_failed(event)
            case Held():
                actions = self._held(event)
            case Released():
                actions = self._spawn() if self.state is State.WAITING else []
            case Faulted():
                actions = self._faulted(event)
            case _:
                assert_never(event)
        if self.state is not State.WAITING:
            self.waiting_for = None
        return actions

    def snapshot(self, *, autostart: bool, ready: bool | None = None,
                 probes: Mapping[str, ProbeStatus] | None = None,
                 cgroup: str | None = None) -> ServiceSnapshot:
        """The service as it is now, frozen; the runner adds what only it knows."""
        return ServiceSnapshot(
            name=self.policy.name, state=self.state, pid=self.pid, started_at=self.started_at,
            started_wall=self.started_wall, starts=self.starts, exits=dict(self.exits),
            last_exit=self.last_exit, last_error=self.last_error,
            next_start_at=self.next_start_at, quick_failures=self.quick_failures,
            autostart=autostart, waiting_for=self.waiting_for, ready=ready,
            probes={} if probes is None else dict(probes), cgroup=cgroup,
        )

    # -- requests ------------------------------------------------------------------------
    def _start_requested(self) -> list[Action]:
        state = self.state
        match state:
            case State.STOPPED | State.EXITED | State.FATAL | State.WAITING:
                self.quick_failures = 0  # an operator's start is a fresh attempt
                return self._spawn()
            case State.BACKOFF:  # start now rather than after the delay
                return [*self._cancel_timer(), *self._spawn()]
            case State.STOPPING:
                self.start_after_stop = True
                return []
            case State.STARTING | State.RUNNING:
                return []
            case _:
                assert_never(state)

    def _stop_requested(self) -> list[Action]:
        self.start_after_stop = False
        self.probe_kill = None  # an operator's stop wins over a probe's restart
        state = self.state
        match state:
            case State.STARTING | State.RUNNING:
                return self._stop(self.policy.stop_signal)
            case State.BACKOFF:
                self.state = State.STOPPED
                self.next_start_at = None
                return self._cancel_timer()
            case State.EXITED | State.FATAL | State.WAITING:
                self.state = State.STOPPED
                return []
            case State.STOPPED | State.STOPPING:
                return []
            case _:
                assert_never(state)

    def _held(self, event: Held) -> list[Action]:
        if self.state is State.WAITING or (
                not event.refresh and self.state in (State.STOPPED, State.EXITED, State.FATAL)):
            self.state = State.WAITING
            self.waiting_for = event.reason
        return []

    def _probe_failed(self, event: ProbeFailed) -> list[Action]:
        if event.pid != self.pid or self.state is State.STOPPING:
            return []  # an earlier process's verdict, or stopping already (notes [13], [14])
        if self.state not in (State.STARTING, State.RUNNING):
            raise LifecycleError(f"{self.policy.name}: a pid in state {self.state}")
        self.probe_kill = event.probe
        self.probe_kill_running = self.state is State.RUNNING
        self.last_error = f"{event.probe} probe failed: {event.error}"
        return self._stop(self.policy.stop_signal)

    def _faulted(self, event: Faulted) -> list[Action]:
        """Contain an unexpected error: the service goes to `fatal`, with the error, and what
        is left of its process group is killed. An operator's start tries again."""
        actions: list[Action] = [SignalGroup(SIGKILL)] if self.pid is not None else []
        self.last_error = event.error
        self.pid = None
        self.started_at = None
        self.started_wall = None
        self.next_start_at = None
        self.start_after_stop = False
        self.probe_kill = None
        self.state = State.FATAL
        return actions + self._cancel_timer()

    # -- what the runner reports ---------------------------------------------------------
    def _spawned(self, event: Spawned) -> list[Action]:
        if self.state is not State.STARTING or self.pid is not None:
            raise LifecycleError(f"{self.policy.name}: Spawned in state {self.state} "
                                 f"pid={self.pid}: no spawn was outstanding")
        self.pid = event.pid
        self.started_at = event.at
        self.started_wall = event.wall
        self.starts += 1
        self.last_error = None
        if self.policy.start_seconds <= 0:
            self.state = State.RUNNING
            return []
        return [self._timer("started", self.policy.start_seconds)]

    def _spawn_failed(self, event: SpawnFailed) -> list[Action]:
        if event.attempt != self.spawn_attempt or self.pid is not None \
                or self.state not in (State.STARTING, State.STOPPING):
            return []  # note [6]
        self.last_error = event.error
        self._record_exit(None, None, "spawn_error", event.wall)
        if self.state is State.STARTING:
            return self._after_exit(event.at, quick=True)
        return self._stopped()  # a stop came while the spawn was failing

    def _timer_fired(self, event: TimerFired) -> list[Action]:
        kind = event.kind
        if kind != self.timer or event.generation != self.timer_generation:
            return []  # a timer that was replaced or cancelled (note [10])
        if TIMER_STATE[kind] is not self.state or (kind == "started" and self.pid is None):
            raise LifecycleError(f"{self.policy.name}: the {kind} timer live in state "
                                 f"{self.state}")
        self.timer = None
        match kind:
            case "started":
                self.state = State.RUNNING
                return []
            case "backoff":
                return self._spawn()
            case "kill":
                return [SignalGroup(SIGKILL)]
            case _:
                assert_never(kind)

    def _exited(self, event: Exited) -> list[Action]:
        if self.pid is None or event.pid != self.pid:
            return []  # not the current process's exit (note [8])
        state = self.state
        if state is not State.STARTING and state is not State.RUNNING \
                and state is not State.STOPPING:
            raise LifecycleError(f"{self.policy.name}: a pid in state {state}")
        # Whatever the service left in its process group goes with it, so that a restart
        # never races a half-dead predecessor for its port.
        actions: list[Action] = [SignalGroup(SIGKILL)]
        ran_for = event.at - (self.started_at if self.started_at is not None else event.at)
        self.pid = None
        self.started_at = None
        self.started_wall = None
        if state is State.STOPPING and self.probe_kill is not None:
            self.probe_kill = None
            self._record_exit(event.code, event.signal, "liveness", event.wall)
            actions += self._cancel_timer()
            if self.start_after_stop:  # an operator asked for a start meanwhile
                self.start_after_stop = False
                self.quick_failures = 0
                return actions + self._spawn()
            if self.policy.restart == "never":
                self.state = State.EXITED
                return actions
            stable = self.probe_kill_running and ran_for >= self.policy.backoff.reset_after
            return actions + self._after_exit(event.at, quick=not stable)
        if state is State.STOPPING:
            self._record_exit(event.code, event.signal, "stopped", event.wall)
            return actions + self._stopped()
        success = event.signal is None and event.code in self.policy.success_exit_codes
        reason: ExitReason = "success" if success else (
            "signal" if event.signal is not None else "failure")
        self._record_exit(event.code, event.signal, reason, event.wall)
        stable = state is State.RUNNING and ran_for >= self.policy.backoff.reset_after
        actions += self._cancel_timer()
        restart = self.policy.restart == "always" or (
            self.policy.restart == "on-failure" and not success)
        if not restart:
            self.state = State.EXITED
            return actions
        return actions + self._after_exit(event.at, quick=not stable)

    # -- helpers -------------------------------------------------------------------------
    def _stop(self, signal: int) -> list[Action]:
        self.state = State.STOPPING
        return [SignalGroup(signal), self._timer("kill", self.policy.stop_timeout)]

    def _stopped(self) -> list[Action]:
        """The end of a stop: `stopped`, or a new start if one was asked meanwhile."""
        self.state = State.STOPPED
        actions = self._cancel_timer()
        if self.start_after_stop:
            self.start_after_stop = False
            self.quick_failures = 0
            actions += self._spawn()
        return actions

    def _after_exit(self, now: float, quick: bool) -> list[Action]:
        if not quick:
            self.quick_failures = 0
        limit = self.policy.backoff.max_retries
        if limit is not None and self.quick_failures >= limit and quick:
            self.state = State.FATAL
            return []
        delay = restart_delay(self.policy.backoff, self.quick_failures, self.random)
        # Counts restarts since the last stable run: the first is immediate, later ones wait.
        self.quick_failures += 1
        if delay <= 0:
            return self._spawn()
        self.state = State.BACKOFF
        self.next_start_at = now + delay
        return [self._timer("backoff", delay)]

    def _spawn(self) -> list[Action]:
        self.state = State.STARTING
        self.next_start_at = None
        self.spawn_attempt += 1
        return [Spawn(self.spawn_attempt)]

    def _timer(self, kind: TimerKind, delay: float) -> StartTimer:
        self.timer = kind
        self.timer_generation += 1
        return StartTimer(kind, delay, self.timer_generation)

    def _cancel_timer(self) -> list[Action]:
        if self.timer is None:
            return []
        self.timer = None
        return [CancelTimer()]

    def _record_exit(self, code: int | None, sig: int | None, reason: ExitReason,
                     wall: float) -> None:
        self.last_exit = LastExit(code, sig, reason, wall)
        self.exits[reason] += 1
