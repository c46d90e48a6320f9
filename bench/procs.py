"""/proc helpers for the bench: a daemon's children, exec detection, subreaping, CPU and RSS.

Every system is judged the same way: a child "runs" once it is a live (not zombie) child of the
daemon whose `comm` is the child program's (so it has exec'd, not just forked).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """PID 1 on these machines reaps nothing: orphans of a SIGKILLed daemon must come to us."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def children(pid: int) -> set[int]:
    """Direct children of `pid` across all its threads (zombies included)."""
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def stat_of(pid: int) -> tuple[str, str] | None:
    """(comm, state) of a process, or None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    lparen, rparen = raw.index("("), raw.rindex(")")
    return raw[lparen + 1:rparen], raw[rparen + 2:rparen + 3]


def alive(pid: int) -> bool:
    st = stat_of(pid)
    return st is not None and st[1] != "Z"


def running_children(daemon: int, comm: str) -> set[int]:
    """Children of `daemon` that are alive and have exec'd `comm`."""
    out = set()
    for pid in children(daemon):
        st = stat_of(pid)
        if st is not None and st[1] != "Z" and st[0] == comm:
            out.add(pid)
    return out


def reap(pids: set[int] | None = None) -> None:
    """Reap zombies that re-parented to us (only the pids given, or any when None)."""
    if pids is None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process itself (children excluded), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode(errors="replace")
    fields = raw[raw.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def on_cpu_seconds(pid: int) -> float:
    """Time the process's live threads have run on a CPU (schedstat, nanosecond resolution,
    where stat's utime+stime count 10 ms ticks); children excluded."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def uss_bytes(pid: int) -> int:
    """Memory only this process holds (private clean + dirty pages), 0 if it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def wait_until(predicate, timeout: float, interval: float = 0.0005) -> float | None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until true; return the monotonic time it first held, None on timeout.

    A short fixed sleep between polls keeps one of the machine's two cores free for the daemon.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
