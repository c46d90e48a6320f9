"""Containment without cgroups: find every descendant of a service, escapees included.

A process that calls setsid() leaves its service's process group, so killpg() misses it. It
stays findable two ways, both used here:

* while its ancestors live, through the process tree: /proc/<pid>/task/*/children, walked
  from the service's leader;
* once an ancestor dies, the kernel re-parents it to the nearest child subreaper, which is
  the daemon under `supervisor run`: it is then one of the daemon's children that no runner
  owns, and the `SUPERVISOR_SERVICE` variable every service process starts with (read from
  /proc/<pid>/environ, the environment it was exec'd with) says whose it is, and
  `SUPERVISOR_INVOCATION_ID` which start of it (so that a sweep after a restart never hits
  the new start's processes).

What this cannot find (docs/operator-guide.md): a process that cleared or replaced its
environment *and* whose ancestors up to the daemon all died; and, when the daemon is not a
subreaper, anything re-parented to PID 1. Pids are signalled only right after being read
from a live parent's children list or from our own children (which stay ours until we reap
them), so a reused pid is not hit in practice.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

MARKER = "SUPERVISOR_SERVICE"
INVOCATION = "SUPERVISOR_INVOCATION_ID"  # one per start of a service, like systemd's
_MAX_PROCESSES = 100_000  # bounds a walk over a pathological tree


def children(pid: int | str, leader_only: bool = False) -> list[int]:
    """`pid`'s children, as listed per thread (a child belongs to the thread that forked it).
    Orphans are re-parented to the first live thread of a subreaper, its main thread:
    `leader_only` reads that one list (~15 us), not one per thread (~14 us each)."""
    pids: list[int] = []
    if leader_only:
        tasks = [str(os.getpid() if pid == "self" else pid)]
    else:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return pids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def subtree(roots: Iterable[int]) -> list[int]:
    """`roots` and all their descendants, parents before children."""
    out: list[int] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack and len(out) < _MAX_PROCESSES:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children(pid))
    return out


def invocation_of(pid: int) -> str | None:
    """The SUPERVISOR_INVOCATION_ID a process was exec'd with, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = INVOCATION.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def adopted(owned: Collection[int]) -> list[int]:
    """Our children that no runner owns: escapees re-parented to us as subreaper."""
    return [pid for pid in children("self") if pid not in owned]


def of_invocation(invocation: str, leader: int | None, owned: Collection[int] | None
                  ) -> list[int]:
    """Every process of one start of a service we can find: the leader's tree, and (unless
    `owned` is None) adopted escapees marked with its invocation id, with their trees."""
    roots = [leader] if leader is not None else []
    if owned is not None:
        roots += [pid for pid in adopted(owned) if invocation_of(pid) == invocation]
    return subtree(roots)


def signal_pids(pids: Iterable[int], sig: int) -> int:
    count = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            count += 1
        except (ProcessLookupError, PermissionError):
            continue
    return count


def live(pids: Iterable[int]) -> list[int]:
    """The pids that are not zombies (a zombie shows in its parent's children until reaped)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            out.append(pid)
    return out
