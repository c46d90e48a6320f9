"""The daemon's file descriptor budget: RLIMIT_NOFILE's soft limit, raised at startup to what
the services and the HTTP port need (never above the hard limit, never down).

The daemon holds about FDS_PER_SERVICE descriptors per service (the read ends of its stdout
and stderr pipes, a pidfd, room for a probe's connection) and its orphan guard, which
inherits the limit, one or two (a pidfd; a cgroup.events at shutdown). With the usual soft
limit of 1,024, 400 services got as far as 335: the rest failed to spawn with "Too many open
files", as would the HTTP port's accepts and the control socket. supervisord (`minfds`) and
nginx (`worker_rlimit_nofile`) raise it the same way; systemd's units set it with
LimitNOFILE= (the shipped unit: 65536). Services inherit the raised soft limit.
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger(__name__)

FDS_PER_SERVICE = 4
# The HTTP port (connections and waiting heads: web/http.py sizes its queue from the limit),
# checks, scrapes, logs and the interpreter's own.
BASE = 4096
# Below this, the daemon would run out (warned about at startup).
RESERVE = 256
# Held back while a startup spawns its services: what the daemon's own start needs after
# them (importing its HTTP and metrics half, the checks' asyncio thread, the control
# socket). Without it, spawns that used up the descriptors made that start fail, and with it
# the daemon and every service.
DAEMON_RESERVE = 64


def wanted(services: int) -> int:
    """The soft limit the daemon raises itself to for `services` services."""
    return BASE + FDS_PER_SERVICE * services


def needed(services: int) -> int:
    """The least the daemon can run `services` services with."""
    return RESERVE + FDS_PER_SERVICE * services


def raise_soft_limit(target: int = BASE) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards `target` (at most the hard limit, never down);
    returns (soft, hard) as they are now (RLIM_INFINITY as such)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft, hard


def short_of(soft: int, services: int) -> bool:
    """Whether a soft limit of `soft` is too low for `services` services."""
    return soft != resource.RLIM_INFINITY and soft < needed(services)


def ensure(services: int) -> None:
    """Before spawning `services` services (at startup, and at a reload that may add some):
    the soft limit raised for them, and a WARNING naming the numbers where the hard limit
    is too low."""
    soft, hard = raise_soft_limit(wanted(services))
    if short_of(soft, services):
        log.warning("file descriptors: %d services need about %d, the limit is %d (hard %d); "
                    "services will fail to start with 'Too many open files': raise "
                    "LimitNOFILE= in the unit, or the hard limit (ulimit -Hn)", services,
                    needed(services), soft, hard)


class Reserve:
    """Descriptors held (on /dev/null) until `release()`, so that what runs out first is
    whatever is spawned meanwhile, not the daemon's own next step."""

    def __init__(self, count: int = DAEMON_RESERVE) -> None:
        self._fds: list[int] = []
        try:
            for _ in range(count):
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass  # as many as there are

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
