"""A signal sent while hundreds of children exit is still delivered (process/signals.py).

On asyncio, anyio's own receiver (loop.add_signal_handler) loses it: the SIGCHLD burst fills
the socket pair its dispatch reads signal numbers from, and later numbers are dropped."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import anyio
import pytest

from supervisor.process.signals import signal_receiver

pytestmark = pytest.mark.anyio

CHILDREN = 600  # ~300 SIGCHLDs within one busy loop iteration overflowed the pair here


def _burst_then_sigterm() -> list[subprocess.Popen[bytes]]:
    """Runs inside one loop iteration: the loop sees none of this until it returns."""
    children = [subprocess.Popen(["sleep", "0.05"]) for _ in range(CHILDREN)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every child has exited (a zombie) before SIGTERM
        if all(_exited(c.pid) for c in children):
            break
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    return children


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_sigterm_after_a_sigchld_burst_is_delivered() -> None:
    got: list[int] = []
    with signal_receiver(signal.SIGTERM, signal.SIGCHLD) as signals:
        children = _burst_then_sigterm()  # blocks the loop on purpose
        try:
            with anyio.fail_after(10):
                async for signum in signals:
                    got.append(signum)
                    if signum == signal.SIGTERM:
                        break
        finally:
            for child in children:
                child.wait()
    assert signal.SIGTERM in got and signal.SIGCHLD in got


async def test_receivers_share_the_process_and_restore_it() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGUSR1)}
    with signal_receiver(signal.SIGHUP) as hups, signal_receiver(signal.SIGUSR1) as usr:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        with anyio.fail_after(5):
            assert await hups.__anext__() == signal.SIGHUP
            assert await usr.__anext__() == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before
