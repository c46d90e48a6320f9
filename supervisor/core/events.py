"""The lifecycle's vocabulary: the events that go in and the actions that come out, as frozen
values. The table that joins them is in core/lifecycle.py."""

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


@dataclass(frozen=True)
class Exited:
    code: int | None  # exit status, when the process called exit()
    signal: int | None  # the signal that killed it, otherwise
    at: float
    wall: float


@dataclass(frozen=True)
class TimerFired:
    kind: TimerKind
    at: float


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
    kind: TimerKind
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    pass


Action = Spawn | SignalGroup | StartTimer | CancelTimer
