"""The lifecycle state machine, driven with plain calls: no processes, no event loop."""

from __future__ import annotations

import dataclasses

import pytest

from supervisor import lifecycle as lc
from supervisor.config import Backoff, ServiceSpec
from supervisor.lifecycle import State


def make(restart: str = "always", start_seconds: float = 1.0, **backoff: float) -> lc.Lifecycle:
    spec = ServiceSpec(name="svc", command=("true",), env={}, cwd="/", restart=restart,
                       start_seconds=start_seconds, stop_timeout=10.0,
                       backoff=Backoff(**backoff))  # type: ignore[arg-type]
    return lc.Lifecycle(spec, random=lambda: 0.5)  # 0.5: no jitter


def spawned(m: lc.Lifecycle, at: float, pid: int = 100) -> list[lc.Action]:
    assert m.handle(lc.StartRequested(at)) == [lc.Spawn()] or m.state is State.STARTING
    return m.handle(lc.Spawned(pid, at, 1000.0 + at))


def test_start_runs_after_start_seconds() -> None:
    m = make()
    assert m.handle(lc.StartRequested(0.0)) == [lc.Spawn()]
    assert m.state is State.STARTING
    assert m.handle(lc.Spawned(42, 0.0, 1000.0)) == [lc.StartTimer("started", 1.0)]
    assert m.handle(lc.TimerFired("started", 1.0)) == []
    assert m.state is State.RUNNING and m.pid == 42 and m.starts == 1


def test_first_exit_restarts_at_once_then_delays_grow_and_cap() -> None:
    m = make(initial=1.0, factor=2.0, max=5.0, jitter=0.0, reset_after=10.0)
    m.handle(lc.StartRequested(0.0))
    t = 0.0
    delays = []
    for _ in range(6):
        m.handle(lc.Spawned(1, t, t))
        actions = m.handle(lc.Exited(1, None, t + 0.1, t))
        assert actions[0] == lc.SignalGroup(lc.SIGKILL)  # leftovers of the group go too
        timers = [a for a in actions if isinstance(a, lc.StartTimer)]
        if timers:
            assert m.state is State.BACKOFF
            delays.append(timers[0].delay)
            m.handle(lc.TimerFired("backoff", t + timers[0].delay))
        else:
            assert lc.Spawn() in actions
            delays.append(0.0)
        assert m.state is State.STARTING
        t += 20
    assert delays == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert m.exits["failure"] == 6 and m.starts == 6


def test_stable_run_resets_backoff() -> None:
    m = make(initial=1.0, jitter=0.0, reset_after=10.0, start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(1, 0.0, 0.0))
    m.handle(lc.Exited(1, None, 0.5, 0.5))  # quick: immediate restart
    m.handle(lc.Spawned(2, 0.5, 0.5))
    actions = m.handle(lc.Exited(1, None, 0.6, 0.6))  # quick again: 1 s
    assert lc.StartTimer("backoff", 1.0) in actions
    m.handle(lc.TimerFired("backoff", 1.6))
    m.handle(lc.Spawned(3, 1.6, 1.6))
    actions = m.handle(lc.Exited(None, 9, 30.0, 30.0))  # after a stable run: at once
    assert lc.Spawn() in actions and m.quick_failures == 1
    assert m.exits["signal"] == 1 and m.last_exit is not None and m.last_exit.signal == 9


def test_jitter_stays_within_bounds() -> None:
    policy = Backoff(initial=1.0, factor=2.0, max=60.0, jitter=0.2)
    assert lc.restart_delay(policy, 0, lambda: 0.9) == 0.0
    assert lc.restart_delay(policy, 3, lambda: 0.0) == pytest.approx(3.2)
    assert lc.restart_delay(policy, 3, lambda: 1.0) == pytest.approx(4.8)
    assert lc.restart_delay(policy, 30, lambda: 1.0) == 60.0  # never beyond the cap


def test_max_retries_gives_fatal() -> None:
    m = make(initial=0.1, jitter=0.0, max_retries=2)
    spawns = 0
    m.handle(lc.StartRequested(0.0))
    t = 0.0
    while m.state is not State.FATAL and spawns < 10:
        spawns += 1
        m.handle(lc.Spawned(spawns, t, t))
        for action in m.handle(lc.Exited(1, None, t, t)):
            if isinstance(action, lc.StartTimer):
                m.handle(lc.TimerFired("backoff", t + action.delay))
        t += 1
    assert m.state is State.FATAL and spawns == 3
    assert m.handle(lc.StartRequested(t)) == [lc.Spawn()]  # an operator's start tries again


@pytest.mark.parametrize(("restart", "code", "expected"), [
    ("never", 1, State.EXITED), ("on-failure", 0, State.EXITED),
    ("on-failure", 2, State.STARTING), ("always", 0, State.STARTING)])
def test_restart_policies(restart: str, code: int, expected: State) -> None:
    m = make(restart=restart)
    spawned(m, 0.0)
    m.handle(lc.TimerFired("started", 1.0))
    m.handle(lc.Exited(code, None, 100.0, 100.0))
    assert m.state is expected


def test_stop_signals_then_kills_after_timeout() -> None:
    m = make()
    spawned(m, 0.0)
    actions = m.handle(lc.StopRequested(2.0))
    assert actions == [lc.SignalGroup(15), lc.StartTimer("kill", 10.0)]
    assert m.state is State.STOPPING
    assert m.handle(lc.TimerFired("started", 2.1)) == []  # replaced timer: ignored
    assert m.handle(lc.TimerFired("kill", 12.0)) == [lc.SignalGroup(lc.SIGKILL)]
    actions = m.handle(lc.Exited(None, 9, 12.1, 12.1))
    assert m.state is State.STOPPED and m.exits["stopped"] == 1
    assert lc.Spawn() not in actions


def test_stop_during_backoff_cancels_restart() -> None:
    m = make(initial=5.0, jitter=0.0)
    spawned(m, 0.0)
    m.handle(lc.Exited(1, None, 0.1, 0.1))
    m.handle(lc.Spawned(2, 0.1, 0.1))
    m.handle(lc.Exited(1, None, 0.2, 0.2))
    assert m.state is State.BACKOFF and m.next_start_at == pytest.approx(5.2)
    assert m.handle(lc.StopRequested(1.0)) == [lc.CancelTimer()]
    assert m.state is State.STOPPED
    assert m.handle(lc.TimerFired("backoff", 5.2)) == []


def test_restart_command_starts_after_stop_completes() -> None:
    m = make()
    spawned(m, 0.0)
    m.handle(lc.StopRequested(1.0))
    assert m.handle(lc.StartRequested(1.1)) == []
    actions = m.handle(lc.Exited(0, None, 1.5, 1.5))
    assert lc.Spawn() in actions and m.state is State.STARTING


def test_spawn_failure_backs_off() -> None:
    m = make(initial=1.0, jitter=0.0)
    m.handle(lc.StartRequested(0.0))
    assert m.handle(lc.SpawnFailed("no such file", 0.0, 0.0)) == [lc.Spawn()]
    actions = m.handle(lc.SpawnFailed("no such file", 0.0, 0.0))
    assert actions == [lc.StartTimer("backoff", 1.0)]
    assert m.exits["spawn_error"] == 2 and m.last_error == "no such file"


def test_late_exit_after_stop_is_ignored() -> None:
    m = make()
    assert m.handle(lc.Exited(0, None, 1.0, 1.0)) == []
    assert dataclasses.asdict(m.spec)["name"] == "svc"
