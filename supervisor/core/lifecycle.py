"""The per-service lifecycle as a pure state machine.

Events go in (`Exited(code=3, signal=None, at=12.5)`), actions come out (`Spawn()`,
`SignalGroup(15)`, `StartTimer("kill", 10.0)`). Nothing here reads a clock, forks or sleeps:
time arrives inside events, randomness through the `random` callable. The runner is the
imperative shell that performs the actions and feeds back what happened.

States follow supervisord's well-known set. Restart policy (after Kubernetes' CrashLoopBackOff,
never giving up by default): the first exit after a stable run restarts at once; each further
quick exit waits initial * factor**(n-1) seconds, capped at `max`, jittered by +-jitter.
The delay is computed in log space, so no count of quick failures and no factor can overflow.

A service whose start is held back (an unsatisfied `depends_on`, `wait_for` checks) is
`waiting`, with the reason; an unexpected error in its runner makes it `fatal` (`Faulted`).

A failed liveness (or startup) probe (`ProbeFailed`) stops the process through the normal stop
path (stop_signal, stop_timeout, SIGKILL); its exit is recorded with reason `liveness` and the
restart policy and backoff then apply as to any other failure.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.config import Backoff, ServiceSpec


class State(str, enum.Enum):
    STOPPED = "stopped"  # not running, and not meant to be
    STARTING = "starting"  # spawned, not yet up for start_seconds
    RUNNING = "running"
    BACKOFF = "backoff"  # exited; waiting out a restart delay
    STOPPING = "stopping"  # stop signal sent; waiting for the exit
    EXITED = "exited"  # exited and the restart policy says stay down
    FATAL = "fatal"  # gave up after max_retries quick failures, or its runner failed
    WAITING = "waiting"  # held back until its dependencies or checks are satisfied

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
SETTLED_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})
EXIT_REASONS = ("success", "failure", "signal", "stopped", "spawn_error", "liveness")


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartRequested:
    at: float


@dataclass(frozen=True)
class StopRequested:
    at: float


@dataclass(frozen=True)
class Spawned:
    pid: int
    at: float
    wall: float


@dataclass(frozen=True)
class SpawnFailed:
    error: str
    at: float
    wall: float


@dataclass(frozen=True)
class Exited:
    code: int | None  # exit status, when the process called exit()
    signal: int | None  # the signal that killed it, otherwise
    at: float
    wall: float


@dataclass(frozen=True)
class TimerFired:
    kind: str  # "started" | "backoff" | "kill"
    at: float


@dataclass(frozen=True)
class Held:
    """The daemon holds an autostart back: `reason` says what it waits for. Enters `waiting`
    from a settled state; with `refresh`, only updates the reason of a service still waiting
    (so that an operator's stop is never undone by a later update)."""

    reason: str
    at: float
    refresh: bool = False


@dataclass(frozen=True)
class Released:
    """What a waiting service waited for is there: start it, if it is still waiting."""

    at: float


@dataclass(frozen=True)
class Faulted:
    """An unexpected error in the service's runner (a spawn, a lifecycle step, a task)."""

    error: str
    at: float
    wall: float


@dataclass(frozen=True)
class ProbeFailed:
    """The service's liveness (or startup) probe failed failure_threshold times in a row:
    stop the process, then restart it as after a failure."""

    probe: str  # "liveness" | "startup"
    error: str
    at: float


Event = (StartRequested | StopRequested | Spawned | SpawnFailed | Exited | TimerFired | Held
         | Released | Faulted | ProbeFailed)


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    pass


@dataclass(frozen=True)
class SignalGroup:
    signal: int


@dataclass(frozen=True)
class StartTimer:
    kind: str
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    pass


Action = Spawn | SignalGroup | StartTimer | CancelTimer

SIGKILL = 9


def restart_delay(policy: Backoff, quick_failures: int, random: Callable[[], float]) -> float:
    """Delay before the next spawn, given how many quick failures came right before this one.

    Total for any input: initial * factor**(n-1) is compared with `max` in log space, so a
    crash loop of any length (or a huge factor) gives `max`, never an OverflowError; a
    non-finite or negative policy value gives a finite, non-negative delay."""
    if quick_failures <= 0:
        return 0.0
    cap = _finite(policy.max, 0.0)
    initial = min(_finite(policy.initial, cap), cap)
    factor = _finite(policy.factor, 1.0)
    if initial <= 0.0 or cap <= 0.0:
        return 0.0
    base = initial
    if factor > 1.0:
        steps = min(quick_failures - 1, 1 << 62)  # an int too big for a float cannot overflow
        log_base = math.log(initial) + steps * math.log(factor)
        base = cap if log_base >= math.log(cap) else math.exp(log_base)
    jitter = min(max(_finite(policy.jitter, 0.0), 0.0), 1.0)
    draw = _finite(random(), 0.5)
    jittered = base * (1.0 + jitter * (2.0 * draw - 1.0))
    return max(0.0, min(cap, jittered))


def _finite(value: float, fallback: float) -> float:
    return max(0.0, value) if math.isfinite(value) else fallback


@dataclass
class LastExit:
    code: int | None
    signal: int | None
    reason: str
    wall: float


@dataclass
class Lifecycle:
    spec: ServiceSpec
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
    timer: str | None = None
    start_after_stop: bool = False
    waiting_for: str | None = None  # while WAITING: what the start is held back for
    # While STOPPING because a probe failed: restart after the exit (as after a failure);
    # `probe_kill_running` says whether the process had reached RUNNING (for the backoff).
    probe_kill: str | None = None
    probe_kill_running: bool = False

    def __repr__(self) -> str:
        return (f"<Lifecycle {self.spec.name} {self.state} pid={self.pid} starts={self.starts} "
                f"quick_failures={self.quick_failures}>")

    def handle(self, event: Event) -> list[Action]:
        handler = getattr(self, "_on_" + type(event).__name__)
        actions: list[Action] = handler(event)
        if self.state is not State.WAITING:
            self.waiting_for = None
        return actions

    # -- requests ------------------------------------------------------------------------
    def _on_StartRequested(self, event: StartRequested) -> list[Action]:
        if self.state in (State.STOPPED, State.EXITED, State.FATAL, State.WAITING):
            self.quick_failures = 0  # an operator's start is a fresh attempt
            return self._spawn()
        if self.state is State.BACKOFF:  # start now rather than after the delay
            return [CancelTimer(), *self._spawn()]
        if self.state is State.STOPPING:
            self.start_after_stop = True
        return []

    def _on_StopRequested(self, event: StopRequested) -> list[Action]:
        self.start_after_stop = False
        self.probe_kill = None  # an operator's stop wins over a probe's restart
        if self.state in (State.STARTING, State.RUNNING):
            self.state = State.STOPPING
            return [SignalGroup(self.spec.stop_signal), self._timer("kill", self.spec.stop_timeout)]
        if self.state is State.BACKOFF:
            self.state = State.STOPPED
            self.next_start_at = None
            return self._cancel_timer()
        if self.state in (State.EXITED, State.FATAL, State.WAITING):
            self.state = State.STOPPED
        return []

    def _on_Held(self, event: Held) -> list[Action]:
        if self.state is State.WAITING or (
                not event.refresh and self.state in (State.STOPPED, State.EXITED, State.FATAL)):
            self.state = State.WAITING
            self.waiting_for = event.reason
        return []

    def _on_Released(self, event: Released) -> list[Action]:
        if self.state is State.WAITING:
            return self._spawn()
        return []

    def _on_ProbeFailed(self, event: ProbeFailed) -> list[Action]:
        if self.state not in (State.STARTING, State.RUNNING):
            return []  # already stopping, or gone: nothing to restart
        self.probe_kill = event.probe
        self.probe_kill_running = self.state is State.RUNNING
        self.last_error = f"{event.probe} probe failed: {event.error}"
        self.state = State.STOPPING
        return [SignalGroup(self.spec.stop_signal), self._timer("kill", self.spec.stop_timeout)]

    def _on_Faulted(self, event: Faulted) -> list[Action]:
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
    def _on_Spawned(self, event: Spawned) -> list[Action]:
        self.pid = event.pid
        self.started_at = event.at
        self.started_wall = event.wall
        self.starts += 1
        self.last_error = None
        if self.spec.start_seconds <= 0:
            self.state = State.RUNNING
            return []
        return [self._timer("started", self.spec.start_seconds)]

    def _on_SpawnFailed(self, event: SpawnFailed) -> list[Action]:
        self.last_error = event.error
        self._record_exit(None, None, "spawn_error", event.wall)
        return self._after_exit(event.at, quick=True)

    def _on_TimerFired(self, event: TimerFired) -> list[Action]:
        if event.kind != self.timer:
            return []  # a timer that was replaced or cancelled
        self.timer = None
        if event.kind == "started" and self.state is State.STARTING:
            self.state = State.RUNNING
        elif event.kind == "backoff" and self.state is State.BACKOFF:
            self.next_start_at = None
            return self._spawn()
        elif event.kind == "kill" and self.state is State.STOPPING:
            return [SignalGroup(SIGKILL)]
        return []

    def _on_Exited(self, event: Exited) -> list[Action]:
        if self.state not in ACTIVE_STATES:
            return []
        # Whatever the service left in its process group goes with it, so that a restart
        # never races a half-dead predecessor for its port.
        actions: list[Action] = [SignalGroup(SIGKILL)]
        ran_for = event.at - (self.started_at if self.started_at is not None else event.at)
        self.pid = None
        self.started_at = None
        self.started_wall = None
        if self.state is State.STOPPING and self.probe_kill is not None:
            self.probe_kill = None
            self._record_exit(event.code, event.signal, "liveness", event.wall)
            actions += self._cancel_timer()
            if self.start_after_stop:  # an operator asked for a start meanwhile
                self.start_after_stop = False
                self.quick_failures = 0
                return actions + self._spawn()
            if self.spec.restart == "never":
                self.state = State.EXITED
                return actions
            stable = self.probe_kill_running and ran_for >= self.spec.backoff.reset_after
            return actions + self._after_exit(event.at, quick=not stable)
        if self.state is State.STOPPING:
            self._record_exit(event.code, event.signal, "stopped", event.wall)
            self.state = State.STOPPED
            actions += self._cancel_timer()
            if self.start_after_stop:
                self.start_after_stop = False
                self.quick_failures = 0
                actions += self._spawn()
            return actions
        success = event.signal is None and event.code in self.spec.success_exit_codes
        reason = "success" if success else ("signal" if event.signal is not None else "failure")
        self._record_exit(event.code, event.signal, reason, event.wall)
        stable = self.state is State.RUNNING and ran_for >= self.spec.backoff.reset_after
        actions += self._cancel_timer()
        restart = self.spec.restart == "always" or (
            self.spec.restart == "on-failure" and not success)
        if not restart:
            self.state = State.EXITED
            return actions
        return actions + self._after_exit(event.at, quick=not stable)

    # -- helpers -------------------------------------------------------------------------
    def _after_exit(self, now: float, quick: bool) -> list[Action]:
        if not quick:
            self.quick_failures = 0
        limit = self.spec.backoff.max_retries
        if limit is not None and self.quick_failures >= limit and quick:
            self.state = State.FATAL
            return []
        delay = restart_delay(self.spec.backoff, self.quick_failures, self.random)
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
        return [Spawn()]

    def _timer(self, kind: str, delay: float) -> StartTimer:
        self.timer = kind
        return StartTimer(kind, delay)

    def _cancel_timer(self) -> list[Action]:
        if self.timer is None:
            return []
        self.timer = None
        return [CancelTimer()]

    def _record_exit(self, code: int | None, sig: int | None, reason: str, wall: float) -> None:
        self.last_exit = LastExit(code, sig, reason, wall)
        self.exits[reason] += 1
