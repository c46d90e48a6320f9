"""What the lifecycle is told about one service, as small frozen values, and the backoff
arithmetic. config builds a `Policy` from each service's table (`ServiceSpec.policy()`);
nothing here knows about TOML, processes or clocks.

Restart delays (after Kubernetes' CrashLoopBackOff, never giving up by default): the first
exit after a stable run restarts at once; each further quick exit waits
initial * factor**(n-1) seconds, capped at `max`, jittered by +-jitter. The delay is computed
in log space, so no count of quick failures and no factor can overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

RestartPolicy = Literal["always", "on-failure", "never"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = get_args(RestartPolicy)


@dataclass(frozen=True)
class Backoff:
    """Restart delays: immediate after a stable run, then initial * factor**n, capped, jittered."""

    initial: float = 1.0
    max: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    reset_after: float = 10.0
    max_retries: int | None = None  # consecutive quick failures before `fatal`; None: never


@dataclass(frozen=True)
class Policy:
    """Everything the lifecycle decides with: when to restart, how to stop, how long a start
    takes to count as running."""

    name: str  # the service's, for logs and snapshots
    restart: RestartPolicy = "always"
    stop_signal: int = 15
    stop_timeout: float = 10.0
    start_seconds: float = 1.0
    success_exit_codes: frozenset[int] = frozenset({0})
    backoff: Backoff = field(default_factory=Backoff)


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
