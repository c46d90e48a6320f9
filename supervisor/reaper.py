"""Adopted orphans: as a child subreaper the daemon inherits descendants whose service parent
died (a double-forked helper, say). They are reaped here, never by a blanket waitpid(-1), which
would race the per-child pidfd watchers and corrupt exit codes; only pids the runners do not
own are touched."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)


def children_of_self() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return pids


def reap_unowned(owned: Collection[int]) -> int:
    """Reap exited adopted orphans; returns how many were reaped."""
    reaped = 0
    for pid in children_of_self() - set(owned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done:
            reaped += 1
    return reaped


def signal_unowned(owned: Collection[int], sig: int = signal.SIGKILL) -> int:
    """Signal live adopted orphans (at shutdown, so no descendant outlives the daemon)."""
    count = 0
    for pid in children_of_self() - set(owned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done:
                os.kill(pid, sig)  # still our unreaped child, so the pid cannot be reused
                count += 1
        except (ChildProcessError, ProcessLookupError):
            continue
    if count:
        log.warning("signalled orphans count=%d signal=%s", count, signal.Signals(sig).name)
    return count
