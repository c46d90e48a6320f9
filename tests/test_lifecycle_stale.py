"""Late events about an earlier process or timer (notes [8], [10], [14] of the lifecycle's
table): each is ignored, never applied to the process or timer that replaced it.

Events wait in the runner's queue behind others: a timer that fired just as it was cancelled,
the exit of a process a fault let go, a probe's verdict on a process that has exited since.
A crash loop that lasts a week meets every one of these orderings. Plain calls, no processes.
"""

from __future__ import annotations

import itertools
import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core import lifecycle as lc
from supervisor.core.lifecycle import State
from supervisor.core.policy import Backoff, Policy, RestartPolicy

STOP_TIMEOUT = 10.0


def make(restart: RestartPolicy = "always", start_seconds: float = 1.0,
         max_retries: int | None = None) -> lc.Lifecycle:
    policy = Policy("svc", restart=restart, start_seconds=start_seconds,
                    stop_timeout=STOP_TIMEOUT,
                    backoff=Backoff(initial=1.0, jitter=0.0, max_retries=max_retries))
    return lc.Lifecycle(policy, random=lambda: 0.5)


def timer(actions: list[lc.Action], kind: lc.TimerKind) -> lc.StartTimer:
    [started] = [a for a in actions if isinstance(a, lc.StartTimer) and a.kind == kind]
    return started


def test_an_earlier_stops_kill_timer_never_cuts_a_later_grace_short() -> None:
    """stop, kill timer armed, the process exits, start, stop again: the first kill timer,
    which fired just before the exit was applied, arrives during the second grace."""
    m = make(start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    first = timer(m.handle(lc.StopRequested(1.0)), "kill")
    m.handle(lc.StartRequested(1.5))  # a restart: spawns again once stopped
    assert m.handle(lc.Exited(10, 0, None, 11.0, 11.0))[-1] == lc.Spawn(m.spawn_attempt)
    m.handle(lc.Spawned(11, 11.0, 11.0))
    second = timer(m.handle(lc.StopRequested(11.1)), "kill")
    assert m.handle(lc.TimerFired("kill", 11.2, first.generation)) == []
    assert m.state is State.STOPPING and m.pid == 11
    assert m.handle(lc.TimerFired("kill", 21.1, second.generation)) == [
        lc.SignalGroup(lc.SIGKILL)]


def test_an_earlier_processs_started_timer_never_makes_the_next_one_running() -> None:
    m = make(start_seconds=5.0)
    m.handle(lc.StartRequested(0.0))
    first = timer(m.handle(lc.Spawned(10, 0.0, 0.0)), "started")
    m.handle(lc.Exited(10, 1, None, 4.9, 4.9))  # quick: restarted at once
    m.handle(lc.Spawned(11, 4.9, 4.9))
    assert m.handle(lc.TimerFired("started", 5.0, first.generation)) == []
    assert m.state is State.STARTING  # 0.1 s into its 5 s


def test_a_cancelled_backoff_timer_never_ends_a_later_backoff_early() -> None:
    m = make(start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.Exited(10, 1, None, 0.1, 0.1))  # the first restart is immediate
    m.handle(lc.Spawned(11, 0.1, 0.1))
    first = timer(m.handle(lc.Exited(11, 1, None, 0.2, 0.2)), "backoff")
    m.handle(lc.StartRequested(0.3))  # an operator's start cancels the backoff
    m.handle(lc.Spawned(12, 0.3, 0.3))
    second = timer(m.handle(lc.Exited(12, 1, None, 0.4, 0.4)), "backoff")
    assert m.handle(lc.TimerFired("backoff", 1.2, first.generation)) == []
    assert m.state is State.BACKOFF
    assert m.handle(lc.TimerFired("backoff", 2.4, second.generation)) == [
        lc.Spawn(m.spawn_attempt)]


def test_the_exit_of_a_process_a_fault_let_go_is_not_counted_against_the_next() -> None:
    m = make(start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.Faulted("internal error: boom", 1.0, 1.0))
    m.handle(lc.StartRequested(1.1))
    m.handle(lc.Spawned(11, 1.1, 1.1))
    exits = dict(m.exits)
    # Killed by the fault, its exit queued behind the start: no SIGKILL for the new group.
    assert m.handle(lc.Exited(10, None, 9, 1.2, 1.2)) == []
    assert m.state is State.RUNNING and m.pid == 11 and m.exits == exits
    assert m.handle(lc.Exited(11, 1, None, 30.0, 30.0))[0] == lc.SignalGroup(lc.SIGKILL)
    assert m.exits["failure"] == exits["failure"] + 1  # the real one counts


def test_an_exit_counts_once() -> None:
    m = make(start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.Exited(10, 1, None, 0.1, 0.1))
    m.handle(lc.Spawned(11, 0.1, 0.1))
    assert m.handle(lc.Exited(10, 1, None, 0.2, 0.2)) == []
    assert m.exits["failure"] == 1 and m.pid == 11


def test_a_probe_verdict_on_an_earlier_process_never_stops_the_next() -> None:
    m = make(start_seconds=0.0)
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.Exited(10, 1, None, 0.1, 0.1))  # the probe failed as it exited
    m.handle(lc.Spawned(11, 0.1, 0.1))
    assert m.handle(lc.ProbeFailed("liveness", "refused", 0.2, 10)) == []
    assert m.state is State.RUNNING and m.probe_kill is None and m.last_error is None
    assert m.handle(lc.ProbeFailed("liveness", "refused", 0.3, 11)) == [
        lc.SignalGroup(15), lc.StartTimer("kill", STOP_TIMEOUT, m.timer_generation)]


def test_a_failed_spawn_a_fault_overtook_never_counts_for_the_next_attempt() -> None:
    m = make()
    [first] = m.handle(lc.StartRequested(0.0))  # the spawn fails: its SpawnFailed is queued
    m.handle(lc.Faulted("internal error: boom", 0.1, 0.1))
    [second] = m.handle(lc.StartRequested(0.2))  # fails too
    assert isinstance(first, lc.Spawn) and isinstance(second, lc.Spawn)
    assert m.handle(lc.SpawnFailed("no such file", 0.3, 0.3, first.attempt)) == []
    assert m.state is State.STARTING and m.exits["spawn_error"] == 0
    assert m.handle(lc.SpawnFailed("no such file", 0.4, 0.4, second.attempt)) == [
        lc.Spawn(m.spawn_attempt)]  # the first restart is immediate
    assert m.exits["spawn_error"] == 1


# -- any interleaving ------------------------------------------------------------------------
POLICIES = [make(restart, start_seconds, retries).policy for restart, start_seconds, retries
            in itertools.product(("always", "on-failure", "never"), (0.0, 1.0), (None, 2))]
STEPS = ["apply"] * 6 + ["fire", "exit", "late"] * 2 + [
    "start", "stop", "fault", "probe", "wait"]


class Shell:
    """A model of runner.py with a clock, checking what the lifecycle asks of it: one FIFO
    queue; Spawned applied at once after Spawn (or SpawnFailed queued); the live timer fires
    at its deadline; any timer replaced or cancelled, any process's exit and any probe verdict
    may also arrive again, late, at any time."""

    def __init__(self, policy: Policy, rnd: random.Random) -> None:
        self.m = lc.Lifecycle(policy, random=lambda: 0.5)
        self.rnd = rnd
        self.now = 0.0
        self.queue: deque[lc.Event] = deque()
        self.pids = itertools.count(100)
        self.alive: list[int] = []  # spawned, not exited yet
        self.spawned: list[int] = []
        self.spawns = 0  # Spawned applied
        self.timer: tuple[lc.TimerKind, int, float] | None = None  # kind, generation, deadline
        self.dead_timers: list[tuple[lc.TimerKind, int]] = []  # replaced or cancelled
        self.stop_sent: dict[int, float] = {}  # pid -> when its last stop signal went out
        self.counted: set[int] = set()  # processes whose exit was counted
        self.failed: list[int] = []  # spawn attempts that failed

    def step(self, step: str) -> None:
        m, rnd = self.m, self.rnd
        self.now += 0.01
        if step == "apply" and self.queue:
            self.apply(self.queue.popleft())
        elif step == "fire" and self.timer is not None:
            kind, generation, deadline = self.timer
            self.now = max(self.now, deadline)
            self.timer = None
            self.queue.append(lc.TimerFired(kind, self.now, generation))
        elif step == "exit" and self.alive:
            pid = rnd.choice(self.alive)  # the current one, or one a fault let go
            self.alive.remove(pid)
            self.queue.append(lc.Exited(pid, rnd.choice([0, 1, None]), None, self.now,
                                        self.now))
        elif step == "late":
            late: list[lc.Event] = [lc.TimerFired(kind, self.now, generation)
                                    for kind, generation in self.dead_timers]
            late += [lc.Exited(pid, 1, None, self.now, self.now)
                     for pid in self.spawned if pid not in self.alive]
            late += [lc.ProbeFailed("liveness", "late", self.now, pid)
                     for pid in self.spawned if pid != m.pid]
            late += [lc.SpawnFailed("no such file", self.now, self.now, attempt)
                     for attempt in self.failed if attempt != m.spawn_attempt]
            if late:
                self.queue.append(rnd.choice(late))
        elif step == "probe" and m.pid is not None:
            self.queue.append(lc.ProbeFailed("liveness", "HTTP 500", self.now, m.pid))
        elif step == "wait":
            self.now += rnd.choice([0.5, STOP_TIMEOUT / 2, 20.0])
        elif step in ("start", "stop", "fault"):
            self.queue.append({"start": lc.StartRequested(self.now),
                               "stop": lc.StopRequested(self.now),
                               "fault": lc.Faulted("boom", self.now, self.now)}[step])

    def apply(self, event: lc.Event) -> None:
        m = self.m
        current = m.pid
        counted = sum(n for reason, n in m.exits.items() if reason != "spawn_error")
        stale = (isinstance(event, (lc.Exited, lc.ProbeFailed)) and event.pid != current) or (
            isinstance(event, lc.TimerFired) and (event.kind, event.generation) in
            self.dead_timers) or (
            isinstance(event, lc.SpawnFailed) and event.attempt != m.spawn_attempt)
        before = {**vars(m), "exits": dict(m.exits)}
        actions = m.handle(event)
        if stale:  # about an earlier process or timer: changes nothing
            assert actions == [] and {**vars(m), "exits": dict(m.exits)} == before, event
        now_counted = sum(n for reason, n in m.exits.items() if reason != "spawn_error")
        # Exits counted once per process: the current one's, each the first time.
        if isinstance(event, lc.Exited) and event.pid == current:
            assert now_counted == counted + 1 and event.pid not in self.counted, event
            self.counted.add(event.pid)
        else:
            assert now_counted == counted, (event, m)
        self.perform(event, current, actions)
        assert m.starts == self.spawns

    def perform(self, event: lc.Event, current: int | None, actions: list[lc.Action]) -> None:
        m = self.m
        for action in actions:
            match action:
                case lc.SignalGroup(signal=lc.SIGKILL):
                    # Never without a full grace since the current process's last stop signal
                    # (stopping/no-pid: a spawn failing, there is no process to kill).
                    if isinstance(event, lc.TimerFired) and current is not None:
                        assert current in self.stop_sent, event
                        assert self.now - self.stop_sent[current] >= STOP_TIMEOUT, event
                    else:  # the exit's leftovers, or a fault's kill
                        assert isinstance(event, (lc.Exited, lc.Faulted)), event
                case lc.SignalGroup():
                    if m.pid is not None:
                        self.stop_sent[m.pid] = self.now
                case lc.StartTimer(kind=kind, delay=delay, generation=generation):
                    self.end_timer()
                    self.timer = (kind, generation, self.now + delay)
                case lc.CancelTimer():
                    self.end_timer()
                case lc.Spawn():
                    if self.rnd.random() < 0.85:
                        pid = next(self.pids)
                        self.alive.append(pid)
                        self.spawned.append(pid)
                        self.spawns += 1
                        self.perform(event, current, m.handle(lc.Spawned(pid, self.now,
                                                                         self.now)))
                    else:
                        self.queue.append(lc.SpawnFailed("no such file", self.now, self.now,
                                                         action.attempt))
                        self.failed.append(action.attempt)

    def end_timer(self) -> None:
        if self.timer is not None:
            kind, generation, _ = self.timer
            self.dead_timers.append((kind, generation))  # it may have fired: its event late
            self.timer = None


@settings(max_examples=300, deadline=None, database=None)
@given(policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**32))
def test_late_events_never_cut_a_grace_short_or_miscount(policy: Policy, seed: int) -> None:
    shell = Shell(policy, random.Random(seed))
    for _ in range(300):
        shell.step(shell.rnd.choice(STEPS))
    while shell.queue:
        shell.apply(shell.queue.popleft())


@pytest.mark.parametrize("seed", range(3))
def test_the_model_reaches_the_orderings_it_is_for(seed: int) -> None:
    """The shell above meets stale kill timers during a later stop, and late exits while a
    newer process runs (else the property test would check nothing)."""
    seen = {"stale kill while stopping": 0, "late exit while another runs": 0}
    for n in range(200):
        shell = Shell(POLICIES[0], random.Random(seed * 1000 + n))
        for _ in range(300):
            step = shell.rnd.choice(STEPS)
            if step == "apply" and shell.queue:
                event, m = shell.queue[0], shell.m
                if isinstance(event, lc.TimerFired) and event.kind == "kill" and \
                        m.state is State.STOPPING and event.generation != m.timer_generation:
                    seen["stale kill while stopping"] += 1
                if isinstance(event, lc.Exited) and m.pid is not None and event.pid != m.pid:
                    seen["late exit while another runs"] += 1
            shell.step(step)
    assert all(seen.values()), seen
