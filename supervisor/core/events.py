"""The lifecycle's vocabulary: the events that go in and the actions that come out, as frozen
values. The table that joins them is in core/lifecycle.py.

An event that reports on something the lifecycle started (a process, a timer) names which one:
the process by its pid, the timer by the generation its StartTimer carried, a failed spawn by
the attempt its Spawn carried. Events sit in the
runner's queue behind others, so one can arrive after its process or timer was replaced; the
lifecycle then ignores it instead of applying it to the newer one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TimerKind = Literal["started", "backoff", "kill"]


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
    attempt: int  # Spawn's: only the outstanding spawn's failure counts


@dataclass(frozen=True)
class Exited:
    pid: int  # the process that exited: only the current one's exit counts
    code: int | None  # exit status, when the process called exit()
    signal: int | None  # the signal that killed it, otherwise
    at: float
    wall: float


@dataclass(frozen=True)
class TimerFired:
    kind: TimerKind
    at: float
    generation: int  # StartTimer's: only the live timer's firing counts


@dataclass(frozen=True)
class Held:
    """The daemon holds an autostart back: `reason` says what it waits for (note [11])."""

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
    pid: int  # the process the probes ran against: a verdict on an earlier one is moot


Event = (StartRequested | StopRequested | Spawned | SpawnFailed | Exited | TimerFired | Held
         | Released | Faulted | ProbeFailed)


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    attempt: int  # to be carried back by a SpawnFailed


@dataclass(frozen=True)
class SignalGroup:
    signal: int


@dataclass(frozen=True)
class StartTimer:
    kind: TimerKind
    delay: float
    generation: int  # to be carried back by its TimerFired


@dataclass(frozen=True)
class CancelTimer:
    pass


Action = Spawn | SignalGroup | StartTimer | CancelTimer
