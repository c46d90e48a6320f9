"""The lifecycle's table (the docstring of supervisor/core/lifecycle.py) against its code.

The table is parsed, then every (state, event) pair is driven from every configuration the
machine can reach: each pair either gives one of the table's next states with only the table's
actions, or raises LifecycleError where the table says `!`, changing nothing. Every next state
and action the table promises is seen at least once, so the table says no more than the code
does; a pair marked `-` is never formed. Events about a process or a timer come about the
current one and about an earlier one (`:stale`). Random event sequences never leave the table,
and sequences the runner can really produce (a FIFO queue, timers that fire before their
cancel, processes dying late, spawns that fail) never raise."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core import lifecycle as lc
from supervisor.core.lifecycle import TIMER_STATE, State
from supervisor.core.policy import Backoff, Policy, RestartPolicy

VARIANTS = ("stopped", "starting", "starting/no-pid", "running", "backoff", "stopping",
            "stopping/no-pid", "exited", "fatal", "waiting")
LABELS = ("StartRequested", "StopRequested", "Spawned", "SpawnFailed", "SpawnFailed:stale",
          "Exited", "Exited:stale",
          "TimerFired:started", "TimerFired:backoff", "TimerFired:kill", "TimerFired:stale",
          "Held", "Held:refresh", "Released", "Faulted", "ProbeFailed", "ProbeFailed:stale")
ACTIONS = ("Spawn", "Cancel", "Stop", "Kill", "Timer:started", "Timer:backoff", "Timer:kill")


@dataclass(frozen=True)
class Row:
    next: frozenset[str] | None  # None: `=`, the state is kept
    actions: frozenset[str]
    raises: bool = False
    never: bool = False  # `-`: the pair cannot be formed


def parse_table(doc: str) -> dict[tuple[str, str], Row]:
    body = doc.split("The table\n---------\n", 1)[1].split("\n[1]", 1)[0]
    rows: list[tuple[str, str, str]] = []  # (event, states, rest)
    event = None
    for line in body.splitlines():
        if re.match(r"^    \S", line):
            event = line.strip()
            assert event in LABELS, event
        elif re.match(r"^      \S", line):
            states, rest = line.split("->", 1)
            assert event is not None
            rows.append((event, states.strip(), rest.strip()))
        elif line.startswith("       ") and line.strip():
            rows[-1] = (rows[-1][0], rows[-1][1], rows[-1][2] + " " + line.strip())
    table: dict[tuple[str, str], Row] = {}
    for event in LABELS:
        mine = [(states.split(), rest) for ev, states, rest in rows if ev == event]
        named = [v for group, _ in mine for v in group if v != "other"]
        assert len(named) == len(set(named)), f"{event}: a state in two rows"
        assert set(named) <= set(VARIANTS), f"{event}: {set(named) - set(VARIANTS)}"
        for group, rest in mine:
            words = re.sub(r"\[\d+\]", "", rest).split()
            nxt, actions = words[0], frozenset(words[1:])
            assert actions <= set(ACTIONS), f"{event}: {actions - set(ACTIONS)}"
            row = Row(None if nxt in ("=", "!", "-") else frozenset(nxt.split("|")), actions,
                      raises=nxt == "!", never=nxt == "-")
            assert row.next is None or row.next <= set(VARIANTS), rest
            covered = [v for v in VARIANTS if v not in named] if group == ["other"] else group
            for v in covered:
                table[event, v] = row
        assert {v for e, v in table if e == event} == set(VARIANTS), f"{event}: not covered"
    return table


TABLE = parse_table(lc.__doc__ or "")


def variant(m: lc.Lifecycle) -> str:
    if m.state in (State.STARTING, State.STOPPING) and m.pid is None:
        return f"{m.state}/no-pid"
    return str(m.state)


def live(event: lc.TimerFired, m: lc.Lifecycle) -> bool:
    return event.kind == m.timer and event.generation == m.timer_generation


def label(event: lc.Event, m: lc.Lifecycle) -> str:
    if isinstance(event, lc.TimerFired):
        return f"TimerFired:{event.kind}" if live(event, m) else "TimerFired:stale"
    if isinstance(event, (lc.Exited, lc.ProbeFailed)) and event.pid != m.pid:
        return f"{type(event).__name__}:stale"
    if isinstance(event, lc.SpawnFailed) and event.attempt != m.spawn_attempt:
        return "SpawnFailed:stale"
    if isinstance(event, lc.Held) and event.refresh:
        return "Held:refresh"
    return type(event).__name__


def action_name(action: lc.Action, policy: Policy) -> str:
    match action:
        case lc.Spawn():
            return "Spawn"
        case lc.CancelTimer():
            return "Cancel"
        case lc.SignalGroup(signal=lc.SIGKILL):
            return "Kill"
        case lc.SignalGroup(signal=signal):
            assert signal == policy.stop_signal
            return "Stop"
        case lc.StartTimer(kind=kind):
            return f"Timer:{kind}"
    raise AssertionError(action)


def check_invariants(m: lc.Lifecycle) -> None:
    """What the table's notes rely on; also `no undocumented state`: the variant exists."""
    assert variant(m) in VARIANTS
    if m.pid is not None:
        assert m.state in lc.ACTIVE_STATES, m
    if m.state is State.RUNNING:
        assert m.pid is not None, m
    if m.timer is not None:  # note [9]
        assert TIMER_STATE[m.timer] is m.state, m
        assert m.timer != "started" or m.pid is not None, m
    assert (m.state is State.BACKOFF) == (m.timer == "backoff") == (m.next_start_at is not None)
    assert (m.waiting_for is not None) == (m.state is State.WAITING), m
    assert not m.start_after_stop or m.state is State.STOPPING, m
    assert m.probe_kill is None or m.state is State.STOPPING, m


def clone(m: lc.Lifecycle) -> lc.Lifecycle:
    return dataclasses.replace(m, exits=dict(m.exits))  # the one mutable field


def fields(m: lc.Lifecycle) -> dict[str, object]:
    return {**vars(m), "exits": dict(m.exits)}


def apply(m: lc.Lifecycle, event: lc.Event) -> tuple[Row, list[lc.Action] | None]:
    """Apply `event` and check the outcome against the table; returns the row and actions
    (None when the pair raised, as the table said)."""
    row = TABLE[label(event, m), variant(m)]
    assert not row.never, (label(event, m), variant(m), "a pair the table says cannot arise")
    before_state, before = m.state, fields(m)
    if row.raises:
        with pytest.raises(lc.LifecycleError):
            m.handle(event)
        assert fields(m) == before, "a refused event changed the machine"
        return row, None
    actions = m.handle(event)
    expected = {str(before_state)} if row.next is None else row.next
    assert str(m.state) in expected, (label(event, m), before_state, m.state, row)
    names = {action_name(a, m.policy) for a in actions}
    assert names <= row.actions, (label(event, m), before_state, names, row)
    check_invariants(m)
    return row, actions


# -- every pair, from every reachable configuration ------------------------------------------
RESTARTS: tuple[RestartPolicy, ...] = ("always", "on-failure", "never")
POLICIES = [
    Policy("svc", restart=restart, start_seconds=start_seconds, stop_signal=15,
           backoff=Backoff(initial=1.0, jitter=0.0, reset_after=10.0, max_retries=retries))
    for restart, start_seconds, retries in itertools.product(
        RESTARTS, (1.0, 0.0), (None, 1))
]


def events_for(m: lc.Lifecycle, now: float) -> Iterator[lc.Event]:
    """One of every kind of event, in the variants that can change the outcome."""
    yield lc.StartRequested(now)
    yield lc.StopRequested(now)
    yield lc.Spawned(4242, now, now)
    yield lc.SpawnFailed("no such file", now, now, m.spawn_attempt)
    yield lc.SpawnFailed("no such file", now, now, m.spawn_attempt - 1)
    started = m.started_at if m.started_at is not None else now
    for pid in (m.pid, STALE_PID):  # the current process's (if any), an earlier one's
        if pid is None:
            continue
        for ran, code, sig in ((0.1, 0, None), (0.1, 1, None), (100.0, 1, None),
                               (100.0, None, 9)):
            yield lc.Exited(pid, code, sig, started + ran, started + ran)
        yield lc.ProbeFailed("liveness", "HTTP 500", now, pid)
    for kind in TIMER_STATE:  # the live generation and an earlier one, of every kind
        yield lc.TimerFired(kind, now, m.timer_generation)
        yield lc.TimerFired(kind, now, m.timer_generation - 1)
    yield lc.Held("dependency db is fatal", now)
    yield lc.Held("dependency db is stopped", now, refresh=True)
    yield lc.Released(now)
    yield lc.Faulted("internal error: boom", now, now)


STALE_PID = 4241  # a process before the current one (4242)


def key(m: lc.Lifecycle) -> tuple[object, ...]:
    return (m.policy, m.state, m.pid is None, m.timer, m.start_after_stop, m.probe_kill,
            m.probe_kill_running, min(m.quick_failures, 2), m.started_at is None)


@functools.cache
def reachable() -> list[tuple[lc.Lifecycle, float]]:
    """Every configuration (up to `key`) reachable from a fresh machine by accepted events."""
    seen: dict[tuple[object, ...], tuple[lc.Lifecycle, float]] = {}
    frontier = [(lc.Lifecycle(p, random=lambda: 0.5), 0.0) for p in POLICIES]
    for m, now in frontier:
        seen[key(m)] = (m, now)
    while frontier:
        nxt = []
        for m, now in frontier:
            for event in events_for(m, now + 1.0):
                child = clone(m)
                try:
                    child.handle(event)
                except lc.LifecycleError:
                    continue
                at = max(now + 1.0, getattr(event, "at", now))
                if key(child) not in seen:
                    seen[key(child)] = (child, at)
                    nxt.append((child, at))
        frontier = nxt
    return list(seen.values())


def test_the_table_covers_every_state_and_event() -> None:
    assert len(TABLE) == len(VARIANTS) * len(LABELS)
    assert {variant(m) for m, _ in reachable()} == set(VARIANTS), "a row for nothing reachable"


def test_every_pair_from_every_reachable_configuration_follows_the_table() -> None:
    # By row of the table (one row covers several states): what the walk saw.
    seen_next: dict[tuple[str, int], set[str]] = {}
    seen_actions: dict[tuple[str, int], set[str]] = {}
    refused: set[tuple[str, str]] = set()
    for m, now in reachable():
        check_invariants(m)
        trials = [(clone(m), event) for event in events_for(m, now + 1.0)]
        for kind in TIMER_STATE:  # a timer live where it cannot be (note [9]): forced
            forced = clone(m)
            forced.timer = kind
            if kind != m.timer and TABLE[f"TimerFired:{kind}", variant(forced)].raises:
                trials.append((forced, lc.TimerFired(kind, now + 1.0, m.timer_generation)))
        for machine, event in trials:
            pair = (label(event, machine), variant(machine))
            row, actions = apply(machine, event)
            if actions is None:
                refused.add(pair)
                continue
            by_row = (pair[0], id(row))
            seen_next.setdefault(by_row, set()).add(str(machine.state))
            seen_actions.setdefault(by_row, set()).update(
                action_name(a, machine.policy) for a in actions)
    for (name, state), row in TABLE.items():
        if row.never:
            continue  # apply() checked that it never arises
        if row.raises:
            assert (name, state) in refused, f"{name} in {state}: `!`, never refused"
            continue
        by_row = (name, id(row))
        assert by_row in seen_next, f"{name} in {state}: never walked"
        if row.next is not None:
            assert seen_next[by_row] == row.next, (name, state, seen_next[by_row], row)
        assert seen_actions[by_row] == row.actions, (name, state, seen_actions[by_row], row)


def test_an_impossible_pair_raises_and_changes_nothing() -> None:
    m = lc.Lifecycle(POLICIES[0], random=lambda: 0.5)
    with pytest.raises(lc.LifecycleError, match="Spawned in state stopped"):
        m.handle(lc.Spawned(1, 0.0, 0.0))
    assert m.state is State.STOPPED and m.starts == 0 and m.pid is None
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(1, 0.0, 0.0))
    with pytest.raises(lc.LifecycleError):  # a second process while one is current
        m.handle(lc.Spawned(2, 0.0, 0.0))
    assert m.pid == 1 and m.starts == 1


# -- random sequences ------------------------------------------------------------------------
def any_event() -> st.SearchStrategy[lc.Event]:
    at = st.floats(0.0, 1000.0)
    return st.one_of(
        st.builds(lc.StartRequested, at), st.builds(lc.StopRequested, at),
        st.builds(lc.Spawned, st.integers(2, 99), at, at),
        st.builds(lc.SpawnFailed, st.just("no such file"), at, at, st.integers(0, 40)),
        st.builds(lc.Exited, st.integers(2, 99), st.one_of(st.none(), st.integers(0, 3)),
                  st.one_of(st.none(), st.sampled_from([9, 15])), at, at),
        st.builds(lc.TimerFired, st.sampled_from(["started", "backoff", "kill"]), at,
                  st.integers(0, 40)),
        st.builds(lc.Held, st.just("dependency db"), at, st.booleans()),
        st.builds(lc.Released, at), st.builds(lc.Faulted, st.just("boom"), at, at),
        st.builds(lc.ProbeFailed, st.sampled_from(["liveness", "startup"]), st.just("x"), at,
                  st.integers(2, 99)),
    )


def about_current(event: lc.Event, m: lc.Lifecycle) -> lc.Event:
    """`event` about the current process or timer, if it names one."""
    if isinstance(event, lc.TimerFired):
        return dataclasses.replace(event, generation=m.timer_generation)
    if isinstance(event, lc.SpawnFailed):
        return dataclasses.replace(event, attempt=m.spawn_attempt)
    if isinstance(event, (lc.Exited, lc.ProbeFailed)) and m.pid is not None:
        return dataclasses.replace(event, pid=m.pid)
    return event


@settings(max_examples=300, deadline=None, database=None)
@given(policy=st.sampled_from(POLICIES),
       events=st.lists(st.tuples(any_event(), st.booleans()), max_size=40))
def test_random_events_never_leave_the_table(policy: Policy,
                                             events: list[tuple[lc.Event, bool]]) -> None:
    m = lc.Lifecycle(policy, random=lambda: 0.5)
    for event, current in events:
        # A documented outcome, or the documented refusal.
        apply(m, about_current(event, m) if current else event)


STEPS = ["apply"] * 4 + ["exit", "fire"] * 2 + [
    "start", "stop", "hold", "refresh", "release", "fault", "probe"]


@settings(max_examples=200, deadline=None, database=None)
@given(policy=st.sampled_from(POLICIES), rnd=st.randoms(use_true_random=True))
def test_what_the_runner_can_produce_is_never_refused(policy: Policy, rnd: random.Random
                                                      ) -> None:
    """A model of runner.py: one FIFO queue; Spawned applied synchronously after Spawn (or a
    SpawnFailed queued); a timer may fire just before its cancel (its event stays queued);
    any process, current or let go, may exit later; probes may report after their process."""
    m = lc.Lifecycle(policy, random=lambda: 0.5)
    queue: deque[lc.Event] = deque()
    alive: list[int] = []
    spawned: list[int] = []
    timer: list[tuple[lc.TimerKind, int]] = []  # the shell's live timer: kind, generation
    pids = itertools.count(100)
    now = 0.0

    def timer_ends() -> None:
        if timer and rnd.random() < 0.3:  # it fired just before the cancel
            kind, generation = timer[0]
            queue.append(lc.TimerFired(kind, now, generation))
        timer.clear()

    def perform(actions: list[lc.Action]) -> None:
        for action in actions:
            if isinstance(action, lc.Spawn):
                if rnd.random() < 0.8:
                    pid = next(pids)
                    alive.append(pid)
                    spawned.append(pid)
                    perform(m.handle(lc.Spawned(pid, now, now)))
                else:
                    queue.append(lc.SpawnFailed("no such file", now, now, action.attempt))
            elif isinstance(action, lc.StartTimer):
                timer_ends()
                timer.append((action.kind, action.generation))
            elif isinstance(action, lc.CancelTimer):
                timer_ends()

    for _ in range(150):
        now += 20.0 if rnd.random() < 0.05 else 0.01
        step = rnd.choice(STEPS)
        if step == "apply" and queue:
            perform(m.handle(queue.popleft()))
            check_invariants(m)
        elif step == "exit" and alive:
            pid = rnd.choice(alive)  # this one, or one a fault let go
            alive.remove(pid)
            queue.append(lc.Exited(pid, rnd.choice([0, 1]), None, now, now))
        elif step == "fire" and timer:
            kind, generation = timer.pop()
            queue.append(lc.TimerFired(kind, now, generation))
        elif step == "probe" and spawned:  # about the current process, or a late verdict
            pid = spawned[-1] if rnd.random() < 0.7 else rnd.choice(spawned)
            queue.append(lc.ProbeFailed("liveness", "HTTP 500", now, pid))
        elif step in ("start", "stop", "hold", "refresh", "release", "fault"):
            external: dict[str, lc.Event] = {
                "start": lc.StartRequested(now), "stop": lc.StopRequested(now),
                "hold": lc.Held("dependency db", now),
                "refresh": lc.Held("dependency db", now, refresh=True),
                "release": lc.Released(now), "fault": lc.Faulted("boom", now, now),
            }
            queue.append(external[step])
    while queue:  # drain: every event queued is applied, none refused
        perform(m.handle(queue.popleft()))
        check_invariants(m)
