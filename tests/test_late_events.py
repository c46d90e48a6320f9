"""Late events through a real daemon (config file, real children, both backends): a kill
timer of an earlier stop, or the exit of a process a fault let go, queued behind newer events,
must not act on the process that came after (core/lifecycle.py, notes [8] and [10]).

The daemon runs in the test's event loop, so the test can hold that loop up, as a loaded
machine or a slow spawn would, to put the events in the order that used to go wrong.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.core.lifecycle import State
from supervisor.process.spawn import Child, spawn
from tests.support import (
    SLEEPER_CODE,
    pid_alive,
    poll_until,
    running_daemon,
    service,
    until,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio
GRACE = 5.0  # stop_timeout: far longer than the 0.3 s the service needs to stop
# Starts kept queued ahead of the exit (the runner applies one event per pass of the loop):
# topped up by BATCH a pass while fewer than BACKLOG wait, however long the exit takes to be
# seen (a loaded machine: the cgroup's emptiness comes through another task), and bounded.
BATCH, BACKLOG = 100, 1000


def exit_logged(caplog: pytest.LogCaptureFixture, pid: int) -> bool:
    """The runner logs a process's exit just before it queues its Exited."""
    return any(r.getMessage().startswith(f"exited service=svc pid={pid} ")
               for r in caplog.records)


def stopping_service(tmp_path: Path, hold: Path) -> str:
    """Ignores SIGTERM while `hold` exists; otherwise stops 0.3 s after it, exiting 0. Says
    when its handler is in place (a file named after its pid), for `ready_spawner`."""
    return f"""
        import os, signal, sys, time
        def on_term(*_):
            if os.path.exists({str(hold)!r}):
                return
            time.sleep(0.3)  # finishing its work
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open(os.path.join({str(tmp_path)!r}, f"ready-{{os.getpid()}}"), "w").close()
        while True:
            time.sleep(1)
    """


def ready_spawner(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The real spawn, returning once the child can take its stop signal: the stop below is
    applied right after the spawn, before a Python interpreter would have started."""
    def spawner(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
        child = spawn(argv, env, cwd)
        assert poll_until(lambda: (tmp_path / f"ready-{child.pid}").exists(), 30, 0.002)
        return child

    return spawner


async def test_an_earlier_stops_kill_timer_never_cuts_a_later_grace_short(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """stop (kill timer armed), start, the process exits, stop again: the first kill timer
    fired while the exit was still queued. It used to SIGKILL the new process at once."""
    caplog.set_level(logging.INFO, logger="supervisor")
    hold = tmp_path / "hold"
    hold.touch()
    path = write_config(tmp_path, service("svc", stopping_service(tmp_path, hold),
                                          stop_timeout=GRACE, start_seconds=0))
    async with running_daemon(path, spawner=ready_spawner(tmp_path)) as daemon:
        runner = daemon.runners["svc"]
        first = (await wait_for(daemon, "svc", lambda s: s.state is State.RUNNING)).pid
        assert first is not None
        runner.stop()
        await wait_for(daemon, "svc", lambda s: s.state is State.STOPPING)
        await runner.wait_applied(runner.start())  # a restart: starts again once stopped
        kill_due = time.monotonic() + GRACE  # the first kill timer (running) fires by then
        # The runner falls behind: starts queue up, then the first process dies (unreaped
        # until the loop runs again) and its exit is queued behind them.
        posted = 0
        for _ in range(BATCH):
            posted = runner.start()
        os.kill(first, signal.SIGKILL)
        assert poll_until(lambda: not pid_alive(first), 10, 0.001)
        hold.unlink()  # the next process stops when asked

        def exit_queued_behind_starts() -> bool:
            nonlocal posted
            if exit_logged(caplog, first):
                return True
            if posted - runner._applied < BACKLOG:  # the runner's own count of events applied
                for _ in range(BATCH):
                    posted = runner.start()
            return False

        await until(exit_queued_behind_starts, 10, "the exit queued", interval=0)
        runner.stop()  # an operator's stop, for the process the exit will start
        # The loop held up past the first kill timer's deadline: it fires, and its event is
        # queued behind that stop.
        time.sleep(max(0.0, kill_due + 0.2 - time.monotonic()))  # noqa: ASYNC251
        assert runner.snapshot.pid == first, "the runner caught up with the queued starts"
        snap = await wait_for(daemon, "svc", lambda s: s.state is State.STOPPED,
                              timeout=GRACE + 30)
        assert snap.starts == 2 and snap.exits["stopped"] == 2
        # The second process had its grace, stopped by itself, and was not SIGKILLed.
        assert snap.last_exit is not None
        assert (snap.last_exit.code, snap.last_exit.signal) == (0, None), snap.last_exit


async def test_the_exit_of_a_process_a_fault_let_go_is_not_counted_against_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error makes the service fatal and kills its process; an operator's start
    comes right after, before that process's exit is seen. The exit used to count against the
    new process, and SIGKILL its group."""
    caplog.set_level(logging.INFO, logger="supervisor")
    path = write_config(tmp_path, service("svc", SLEEPER_CODE, start_seconds=0))
    async with running_daemon(path) as daemon:
        runner = daemon.runners["svc"]
        snap = await wait_for(daemon, "svc", lambda s: s.state is State.RUNNING)
        first, exits = snap.pid, dict(snap.exits)
        assert first is not None
        runner.fault("internal error: injected")
        snap = await runner.wait_applied(runner.start())
        second = snap.pid
        assert snap.state is State.RUNNING and second not in (None, first)
        await until(lambda: exit_logged(caplog, first), 10, "the first process's exit")
        snap = await runner.wait_applied(runner.start())  # its exit, queued before, applied
        assert snap.state is State.RUNNING and snap.pid == second and pid_alive(second)
        assert snap.starts == 2 and snap.exits == exits


async def test_a_late_probe_verdict_on_an_earlier_process_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A probe task cancelled as its process exits may still deliver the verdict it had just
    reached (cancellation lands at its next wait), after the next process started: it must
    not make that one ready, count against its probes, or restart it. The probes here are a
    stand-in that keeps each process's callbacks, so the test can deliver one late."""
    from supervisor.checks import probe_runner
    from supervisor.checks.probes import CheckResult

    verdicts: list[dict[str, Any]] = []  # the callbacks of each process's probes, in order

    async def keep_callbacks(service: str, probes: object, **callbacks: Any) -> None:
        verdicts.append(callbacks)
        await anyio.sleep_forever()

    monkeypatch.setattr(probe_runner, "run_probes", keep_callbacks)
    caplog.set_level(logging.WARNING, logger="supervisor")
    path = write_config(tmp_path, service("svc", SLEEPER_CODE, start_seconds=0)
                        + '[services.svc.readiness]\ntype = "exec"\ncommand = ["true"]\n'
                        + '[services.svc.liveness]\ntype = "exec"\ncommand = ["true"]\n')
    async with running_daemon(path) as daemon:
        runner = daemon.runners["svc"]
        first = (await wait_for(daemon, "svc", lambda s: s.state is State.RUNNING)).pid
        assert first is not None
        await until(lambda: len(verdicts) == 1, 10, "the first process's probes")
        os.kill(first, signal.SIGKILL)  # exits: restarted at once (a stable run before)
        await until(lambda: len(verdicts) == 2, 10, "the second process's probes")
        snap = runner.snapshot
        assert snap.pid not in (None, first) and snap.state is State.RUNNING
        assert snap.ready is False
        late = verdicts[0]
        late["ready"](True, None)
        late["report"]("liveness", CheckResult("svc.liveness", False, 1.0, "refused", 0.0))
        late["failed"]("liveness", "refused")
        # Nor does the log announce a restart that will not happen.
        assert not [r for r in caplog.records if "restarting" in r.getMessage()]
        snap = await runner.wait_applied(runner.start())  # the verdicts were delivered before
        assert snap.ready is False and snap.probes["liveness"].failures == 0
        assert snap.state is State.RUNNING and snap.pid == runner.child_pid()
        assert snap.starts == 2 and snap.exits["liveness"] == 0
        verdicts[1]["ready"](True, None)  # the current process's own verdict counts
        assert runner.snapshot.ready is True
