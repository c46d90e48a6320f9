"""What can be seen of one service: its state, its last exit, its probes, as frozen values.

A `ServiceSnapshot` is built by `Lifecycle.snapshot()` after every event and swapped whole;
the HTTP threads (metrics, status) read it without a lock and without the runner.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args


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

# Why a process ended (service_exits_total{reason}): `liveness` after a failed liveness or
# startup probe stopped it, `stopped` after an operator's (or the daemon's) stop.
ExitReason = Literal["success", "failure", "signal", "stopped", "spawn_error", "liveness"]
EXIT_REASONS: tuple[ExitReason, ...] = get_args(ExitReason)


@dataclass(frozen=True)
class LastExit:
    code: int | None  # exit status, when the process called exit()
    signal: int | None  # the signal that killed it, otherwise
    reason: ExitReason
    wall: float


@dataclass(frozen=True)
class ProbeStatus:
    """What status and metrics show about one probe of a service."""

    failures: int = 0  # failed attempts since the daemon started (service_probe_failures_total)
    passing: bool | None = None  # the latest attempt's verdict; None before the first
    last_error: str | None = None  # the latest failure's error text (redacted, one line)


@dataclass(frozen=True)
class ServiceSnapshot:
    """What the HTTP threads may read about a service: immutable, swapped whole."""

    name: str
    state: State
    pid: int | None
    started_at: float | None  # monotonic
    started_wall: float | None
    starts: int
    exits: Mapping[str, int]  # by ExitReason
    last_exit: LastExit | None
    last_error: str | None
    next_start_at: float | None  # monotonic
    quick_failures: int
    autostart: bool
    waiting_for: str | None = None  # while `waiting`: which dependency or check, and why
    cgroup: str | None = None  # the service's cgroup directory, in cgroup mode
    # None without a readiness probe; else whether the current process's probe says ready
    ready: bool | None = None
    probes: Mapping[str, ProbeStatus] = field(default_factory=dict)  # by kind, if configured

    @property
    def is_ready(self) -> bool:
        """Ready by its readiness probe, or (without one) running."""
        return self.state is State.RUNNING if self.ready is None else self.ready

    def uptime(self, now: float) -> float:
        if self.state not in (State.STARTING, State.RUNNING) or self.started_at is None:
            return 0.0
        return max(0.0, now - self.started_at)
