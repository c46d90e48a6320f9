"""The lifecycle state machine, driven with plain calls: no processes, no event loop."""

from __future__ import annotations

import dataclasses

import pytest

from supervisor.core import lifecycle as lc
from supervisor.core.lifecycle import State
from supervisor.core.policy import Backoff, Policy, RestartPolicy, restart_delay


def make(restart: RestartPolicy = "always", start_seconds: float = 1.0,
         **backoff: float) -> lc.Lifecycle:
    policy = Policy(name="svc", restart=restart, start_seconds=start_seconds, stop_timeout=10.0,
                    backoff=Backoff(**backoff))  # type: ignore[arg-type]
    return lc.Lifecycle(policy, random=lambda: 0.5)  # 0.5: no jitter


def fire(m: lc.Lifecycle, kind: lc.TimerKind, at: float) -> list[lc.Action]:
    """The live timer's TimerFired, as the runner would post it."""
    return m.handle(lc.TimerFired(kind, at, m.timer_generation))


def exited(m: lc.Lifecycle, code: int | None, sig: int | None, at: float, wall: float
           ) -> list[lc.Action]:
    """The current process's exit."""
    assert m.pid is not None
    return m.handle(lc.Exited(m.pid, code, sig, at, wall))


def spawned(m: lc.Lifecycle, at: float, pid: int = 100) -> list[lc.Action]:
    assert m.handle(lc.StartRequested(at)) == [lc.Spawn(m.spawn_attempt)] \
        or m.state is State.STARTING
    return m.handle(lc.Spawned(pid, at, 1000.0 + at))


def test_start_runs_after_start_seconds() -> None:
    m = make()
    assert m.handle(lc.StartRequested(0.0)) == [lc.Spawn(m.spawn_attempt)]
    assert m.state is State.STARTING
    assert m.handle(lc.Spawned(42, 0.0, 1000.0)) == [lc.StartTimer("started", 1.0, 1)]
    assert fire(m, "started", 1.0) == []
    assert m.state is State.RUNNING and m.pid == 42 and m.starts == 1


def test_first_exit_restarts_at_once_then_delays_grow_and_cap() -> None:
    m = make(initial=1.0, factor=2.0, max=5.0, jitter=0.0, reset_after=10.0)
    m.handle(lc.StartRequested(0.0))
    t = 0.0
    delays = []
    for _ in range(6):
        m.handle(lc.Spawned(1, t, t))
        actions = exited(m, 1, None, t + 0.1, t)
        assert actions[0] == lc.SignalGroup(lc.SIGKILL)  # leftovers of the group go too
        timers = [a for a in actions if isinstance(a, lc.StartTimer)]
        if timers:
            assert m.state is State.BACKOFF
            delays.append(timers[0].delay)
            fire(m, "backoff", t + timers[0].delay)
        else:
            assert lc.Spawn(m.spawn_attempt) in actions
            delays.append(0.0)
        assert m.state is State.STARTING
        t += 20
    assert delays == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert m.exits["failure"] == 6 and m.starts == 6


def test_stable_run_resets_backoff() -> None:
    m = make(initial=1.0, jitter=0.0, reset_after=10.0, start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(1, 0.0, 0.0))
    exited(m, 1, None, 0.5, 0.5)  # quick: immediate restart
    m.handle(lc.Spawned(2, 0.5, 0.5))
    actions = exited(m, 1, None, 0.6, 0.6)  # quick again: 1 s
    assert lc.StartTimer("backoff", 1.0, m.timer_generation) in actions
    fire(m, "backoff", 1.6)
    m.handle(lc.Spawned(3, 1.6, 1.6))
    actions = exited(m, None, 9, 30.0, 30.0)  # after a stable run: at once
    assert lc.Spawn(m.spawn_attempt) in actions and m.quick_failures == 1
    assert m.exits["signal"] == 1 and m.last_exit is not None and m.last_exit.signal == 9


def test_jitter_stays_within_bounds() -> None:
    policy = Backoff(initial=1.0, factor=2.0, max=60.0, jitter=0.2)
    assert restart_delay(policy, 0, lambda: 0.9) == 0.0
    assert restart_delay(policy, 3, lambda: 0.0) == pytest.approx(3.2)
    assert restart_delay(policy, 3, lambda: 1.0) == pytest.approx(4.8)
    assert restart_delay(policy, 30, lambda: 1.0) == 60.0  # never beyond the cap


def test_max_retries_gives_fatal() -> None:
    m = make(initial=0.1, jitter=0.0, max_retries=2)
    spawns = 0
    m.handle(lc.StartRequested(0.0))
    t = 0.0
    while m.state is not State.FATAL and spawns < 10:
        spawns += 1
        m.handle(lc.Spawned(spawns, t, t))
        for action in exited(m, 1, None, t, t):
            if isinstance(action, lc.StartTimer):
                fire(m, "backoff", t + action.delay)
        t += 1
    assert m.state is State.FATAL and spawns == 3
    # An operator's start tries again.
    assert m.handle(lc.StartRequested(t)) == [lc.Spawn(m.spawn_attempt)]


@pytest.mark.parametrize(("restart", "code", "expected"), [
    ("never", 1, State.EXITED), ("on-failure", 0, State.EXITED),
    ("on-failure", 2, State.STARTING), ("always", 0, State.STARTING)])
def test_restart_policies(restart: RestartPolicy, code: int, expected: State) -> None:
    m = make(restart=restart)
    spawned(m, 0.0)
    fire(m, "started", 1.0)
    exited(m, code, None, 100.0, 100.0)
    assert m.state is expected


def test_stop_signals_then_kills_after_timeout() -> None:
    m = make()
    [started] = spawned(m, 0.0)
    assert isinstance(started, lc.StartTimer)
    actions = m.handle(lc.StopRequested(2.0))
    assert actions == [lc.SignalGroup(15), lc.StartTimer("kill", 10.0, started.generation + 1)]
    assert m.state is State.STOPPING
    # The replaced timer: ignored.
    assert m.handle(lc.TimerFired("started", 2.1, started.generation)) == []
    assert fire(m, "kill", 12.0) == [lc.SignalGroup(lc.SIGKILL)]
    actions = exited(m, None, 9, 12.1, 12.1)
    assert m.state is State.STOPPED and m.exits["stopped"] == 1
    assert not any(isinstance(a, lc.Spawn) for a in actions)


def test_stop_during_backoff_cancels_restart() -> None:
    m = make(initial=5.0, jitter=0.0)
    spawned(m, 0.0)
    exited(m, 1, None, 0.1, 0.1)
    m.handle(lc.Spawned(2, 0.1, 0.1))
    exited(m, 1, None, 0.2, 0.2)
    assert m.state is State.BACKOFF and m.next_start_at == pytest.approx(5.2)
    assert m.handle(lc.StopRequested(1.0)) == [lc.CancelTimer()]
    assert m.state is State.STOPPED
    assert m.handle(lc.TimerFired("backoff", 5.2, m.timer_generation)) == []  # cancelled


def test_restart_command_starts_after_stop_completes() -> None:
    m = make()
    spawned(m, 0.0)
    m.handle(lc.StopRequested(1.0))
    assert m.handle(lc.StartRequested(1.1)) == []
    actions = exited(m, 0, None, 1.5, 1.5)
    assert lc.Spawn(m.spawn_attempt) in actions and m.state is State.STARTING


def test_spawn_failure_backs_off() -> None:
    m = make(initial=1.0, jitter=0.0)
    m.handle(lc.StartRequested(0.0))
    assert m.handle(lc.SpawnFailed("no such file", 0.0, 0.0, 1)) == [lc.Spawn(2)]
    actions = m.handle(lc.SpawnFailed("no such file", 0.0, 0.0, 2))
    assert actions == [lc.StartTimer("backoff", 1.0, 1)]
    assert m.exits["spawn_error"] == 2 and m.last_error == "no such file"


def test_late_exit_after_stop_is_ignored() -> None:
    m = make()
    assert m.handle(lc.Exited(7, 0, None, 1.0, 1.0)) == []
    assert dataclasses.asdict(m.policy)["name"] == "svc"


# -- backoff arithmetic is total (issue 12, defect 1) --------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

any_float = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None, database=None)
@given(initial=any_float, cap=any_float, factor=any_float, jitter=any_float,
       quick_failures=st.one_of(st.integers(0, 5000), st.integers(0, 10**400)),
       draw=st.floats(0.0, 1.0))
def test_restart_delay_never_overflows_and_stays_within_the_cap(
        initial: float, cap: float, factor: float, jitter: float, quick_failures: int,
        draw: float) -> None:
    policy = Backoff(initial=initial, max=cap, factor=factor, jitter=jitter)
    delay = restart_delay(policy, quick_failures, lambda: draw)
    assert isinstance(delay, float) and delay >= 0.0
    assert delay == 0.0 or delay <= cap  # finite, and never past backoff_max


@settings(max_examples=200, deadline=None, database=None)
@given(initial=st.floats(0.0, 604800.0), cap=st.floats(0.0, 604800.0),
       factor=st.floats(1.0, 100.0), n=st.integers(1, 100_000))
def test_restart_delay_is_the_capped_exponential(initial: float, cap: float, factor: float,
                                                 n: int) -> None:
    """For every value config accepts: min(cap, initial * factor**(n-1)), without jitter."""
    policy = Backoff(initial=initial, max=cap, factor=factor, jitter=0.0)
    delay = restart_delay(policy, n, lambda: 0.5)
    try:
        exact = min(cap, initial * factor ** (n - 1))
    except OverflowError:
        exact = cap if initial > 0 else 0.0
    assert delay == pytest.approx(min(exact, cap), rel=1e-9, abs=1e-12)


def test_long_crash_loop_and_huge_factor_stay_at_the_cap() -> None:
    assert restart_delay(Backoff(jitter=0.0), 1025, lambda: 0.5) == 60.0
    assert restart_delay(Backoff(factor=1e300, jitter=0.0), 3, lambda: 0.5) == 60.0
    m = make(initial=0.001, max=0.002, factor=2.0, jitter=0.0)
    m.handle(lc.StartRequested(0.0))
    for i in range(1200):  # a real lifecycle through 1,200 quick failures
        m.handle(lc.Spawned(1, float(i), float(i)))
        for action in exited(m, 1, None, i + 0.1, float(i)):
            if isinstance(action, lc.StartTimer):
                assert action.delay == 0.002 or i < 2
                fire(m, "backoff", i + 0.5)
    assert m.quick_failures == 1200 and m.state is State.STARTING


# -- waiting and faults --------------------------------------------------------------------
def test_held_service_waits_with_its_reason_then_starts_when_released() -> None:
    m = make()
    assert m.handle(lc.Held("dependency db is fatal", 0.0)) == []
    assert m.state is State.WAITING and m.waiting_for == "dependency db is fatal"
    m.handle(lc.Held("dependency db is stopped", 1.0, refresh=True))
    assert m.waiting_for == "dependency db is stopped"
    assert m.handle(lc.Released(2.0)) == [lc.Spawn(m.spawn_attempt)]
    assert m.state is State.STARTING and m.waiting_for is None


def test_operator_stop_of_a_waiting_service_is_not_undone() -> None:
    m = make()
    m.handle(lc.Held("dependency db is fatal", 0.0))
    m.handle(lc.StopRequested(1.0))
    assert m.state is State.STOPPED and m.waiting_for is None
    assert m.handle(lc.Held("dependency db is stopped", 2.0, refresh=True)) == []
    assert m.handle(lc.Released(3.0)) == []
    assert m.state is State.STOPPED


def test_fault_makes_the_service_fatal_and_kills_its_group() -> None:
    m = make()
    spawned(m, 0.0)
    actions = m.handle(lc.Faulted("internal error: RuntimeError: boom", 1.0, 1001.0))
    assert lc.SignalGroup(lc.SIGKILL) in actions and lc.CancelTimer() in actions
    assert m.state is State.FATAL and m.pid is None
    assert m.last_error == "internal error: RuntimeError: boom"
    assert m.handle(lc.Exited(100, None, 9, 1.1, 1001.1)) == []  # the killed child's exit
    # An operator's start retries.
    assert m.handle(lc.StartRequested(2.0)) == [lc.Spawn(m.spawn_attempt)]
