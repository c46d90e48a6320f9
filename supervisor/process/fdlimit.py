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

import resource

FDS_PER_SERVICE = 4
# The HTTP port (connections and waiting heads: web/http.py sizes its queue from the limit),
# checks, scrapes, logs and the interpreter's own.
BASE = 4096
# Below this, the daemon would run out (warned about at startup).
RESERVE = 256


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
