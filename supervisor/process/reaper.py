"""Adopted orphans: as a child subreaper the daemon inherits descendants whose service parent
died (a double-forked helper, say). They are reaped here, never by a blanket waitpid(-1), which
would race the per-child pidfd watchers and corrupt exit codes; only pids the runners do not
own are touched.

`reap_orphans` reaps them as they exit: SIGCHLD (sent for adopted children too) wakes it, so a
fork-heavy service cannot fill the process table with zombies between two timer rounds."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Collection

import anyio

from supervisor.process import descendants
from supervisor.process.descendants import children
from supervisor.process.signals import signal_receiver

log = logging.getLogger(__name__)


def children_of_self(leader_only: bool = False) -> set[int]:
    """Our children (descendants.children: why `leader_only` suffices for orphans)."""
    return set(children("self", leader_only))


def reap_unowned(owned: Collection[int], leader_only: bool = False) -> int:
    """Reap exited adopted orphans; returns how many were reaped."""
    reaped = 0
    for pid in children_of_self(leader_only) - set(owned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done:
            reaped += 1
    return reaped


REAP_COALESCE = 0.02  # s: a burst of SIGCHLDs (100 orphans exiting) costs a few /proc scans


async def reap_orphans(owned: Callable[[], Collection[int]], *,
                       task_status: anyio.abc.TaskStatus[bool] = anyio.TASK_STATUS_IGNORED
                       ) -> None:
    """Reap adopted orphans whenever a child exits, until cancelled. Starts with False (and
    returns) where no SIGCHLD receiver can be installed (not the main thread): the caller's
    periodic reap_unowned is then all there is. `owned` is called on the event loop thread
    right before each reap, so a child spawned meanwhile is never taken from its runner."""
    try:
        receiver = signal_receiver(signal.SIGCHLD)
        signals = receiver.__enter__()
    except (ValueError, RuntimeError) as exc:
        log.warning("orphans reaped on the stats timer only: no SIGCHLD receiver (%s)", exc)
        task_status.started(False)
        return
    try:
        wake = anyio.Event()

        async def listen() -> None:
            async for _ in signals:
                wake.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            reap_unowned(owned())  # whatever exited before we listened
            task_status.started(True)
            while True:
                await wake.wait()
                wake = anyio.Event()
                # The main thread's list only: adopted orphans land there (and the stats
                # round, a backstop, scans every thread).
                reap_unowned(owned(), leader_only=True)
                await anyio.sleep(REAP_COALESCE)
    finally:
        receiver.__exit__(None, None, None)


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


async def sweep(owned: Callable[[], Collection[int]], spare: int | None,
                rounds: int = 200, pause: float = 0.01) -> None:
    """At shutdown, as subreaper: SIGKILL every descendant left (escapees and theirs) but
    `spare` (the orphan guard), reap, and repeat until nothing of ours is left (bounded:
    `rounds` x `pause`, ~2 s)."""
    killed = 0
    left: list[int] = []
    for _ in range(rounds):
        reap_unowned(owned())
        left = descendants.live(
            p for p in descendants.subtree(descendants.children("self")) if p != spare)
        if not left:
            break
        killed += descendants.signal_pids(left, signal.SIGKILL)
        await anyio.sleep(pause)
    else:
        log.warning("descendants left after the shutdown sweep count=%d", len(left))
    if killed:
        log.info("killed leftover descendants at shutdown count=%d", killed)
