"""Stopping many services at once: the dependency levels, the batch's signalling pass and its
one kill timer, and a shutdown through them (order, stop_timeout, both containment modes)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import pytest

from supervisor.core.lifecycle import State
from supervisor.process.stopbatch import StopBatch, stop_levels
from tests.support import PY, running_daemon, until, wait_for, write_config
from tests.test_containment import MODES, _cgroups_usable


def test_levels_put_dependents_first() -> None:
    deps = {"web": ["api"], "api": ["db", "cache"], "db": [], "cache": [], "cron": ["db"]}
    assert stop_levels(["db", "cache", "api", "web", "cron"], deps) == [
        ["web", "cron"], ["api"], ["db", "cache"]]


def test_levels_ignore_dependents_not_being_stopped() -> None:
    # A reload stopping db alone: web, which stays, does not hold it back.
    assert stop_levels(["db"], {"db": [], "web": ["db"]}) == [["db"]]
    assert stop_levels(["a", "b"], {"a": ["missing"], "b": []}) == [["a", "b"]]


def test_levels_end_a_cycle_in_one_last_level() -> None:
    assert stop_levels(["x", "a", "b"], {"a": ["b"], "b": ["a"], "x": ["a"]}) == [
        ["x"], ["a", "b"]]


@pytest.mark.anyio
async def test_signals_wait_for_the_flush_and_go_out_in_chunks() -> None:
    """Queued until the flush, then sent in order, a chunk at a time, with the event loop's
    other work (here: a task that notes where the sending stands) run between chunks."""
    batch = StopBatch()
    sent: list[str] = []
    seen_between: list[int] = []

    async def watch() -> None:
        while len(sent) < 5:
            seen_between.append(len(sent))
            await anyio.lowlevel.checkpoint()

    for name in "abcde":
        assert batch.signal(name, lambda name=name: sent.append(name))  # type: ignore[misc]
    assert sent == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.lowlevel.checkpoint()
        await batch.flush(chunk=2)
    assert sent == list("abcde")
    assert any(0 < n < 5 for n in seen_between)  # the loop ran between the chunks
    # Once flushed, the caller sends itself (a SIGKILL after stop_timeout, say).
    assert not batch.signal("f", lambda: sent.append("f"))


@pytest.mark.anyio
async def test_one_timer_task_fires_each_deadline_unless_cancelled() -> None:
    batch = StopBatch()
    fired: list[tuple[str, float]] = []
    began = time.monotonic()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.run_timers)
            batch.start_timer("slow", 0.3, lambda: fired.append(("slow", time.monotonic())))
            batch.start_timer("fast", 0.1, lambda: fired.append(("fast", time.monotonic())))
            batch.start_timer("gone", 0.05, lambda: fired.append(("gone", time.monotonic())))
            batch.cancel_timer("gone")
            while len(fired) < 2:  # noqa: ASYNC110 - the timers under test are the wake-up
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert [name for name, _ in fired] == ["fast", "slow"]
    assert fired[0][1] - began >= 0.1 and fired[1][1] - began >= 0.3


STOPPER = """
import signal, sys, time
name, log, ignore = sys.argv[1], sys.argv[2], sys.argv[3] == "ignore"
def stop(*_):
    open(log, "a").write("stop " + name + "\\n")
    if not ignore:
        sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(log, "a").write("start " + name + "\\n")
while True: time.sleep(1)
"""


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_shutdown_stops_by_level_and_kills_after_stop_timeout(tmp_path: Path,
                                                                    mode: str) -> None:
    """web -> api -> db, and a stubborn service beside web that ignores SIGTERM: at shutdown
    web and stubborn are signalled first, stubborn is SIGKILLed after its stop_timeout (the
    batch's timer), only then api, then db."""
    log = tmp_path / "order.log"

    def svc(name: str, deps: list[str], ignore: bool = False) -> str:
        argv = [PY, "-c", STOPPER, name, str(log), "ignore" if ignore else "exit"]
        return (f"[services.{name}]\ncommand = {json.dumps(argv)}\nstart_seconds = 0.2\n"
                f"stop_timeout = 0.6\ndepends_on = {json.dumps(deps)}\n")

    path = write_config(tmp_path, svc("web", ["api"]) + svc("api", ["db"]) + svc("db", [])
                        + svc("stubborn", ["api"], ignore=True),
                        supervisor=f'cgroups = "{mode}"\n')
    began = 0.0
    with anyio.fail_after(20):
        async with running_daemon(path) as daemon:
            for name in ("web", "stubborn"):
                await wait_for(daemon, name, lambda s: s.state is State.RUNNING)
            while log.read_text().count("start") < 4:  # noqa: ASYNC110 - other processes
                await anyio.sleep(0.01)
            began = time.monotonic()
        took = time.monotonic() - began
    lines = log.read_text().split("\n")
    stops = [line for line in lines if line.startswith("stop")]
    assert set(stops[:2]) == {"stop web", "stop stubborn"}
    assert stops[2:] == ["stop api", "stop db"]
    snap = daemon.snapshots["stubborn"]
    assert snap.state is State.STOPPED
    assert snap.last_exit is not None and snap.last_exit.signal == signal.SIGKILL
    assert daemon.snapshots["web"].last_exit.signal is None  # type: ignore[union-attr]
    assert 0.6 <= took < 10


class _StubRunner:
    """What Services.stop_in_order uses of a runner: its stop queues the signal in the batch
    (as a real runner's does), and it settles at once."""

    def __init__(self, name: str, story: list[tuple[str, str]]) -> None:
        self.spec = type("Spec", (), {"depends_on": ()})()
        self.name, self.story = name, story

    def stop(self, batch: StopBatch) -> int:
        self.story.append(("stop", self.name))
        batch.signal(self.name, lambda: self.story.append(("signal", self.name)))
        return 1

    async def wait_stopped(self, number: int) -> None:
        return None

    def end_batch(self) -> None:
        return None


@pytest.mark.anyio
async def test_the_first_signals_go_out_before_the_last_stops_are_applied() -> None:
    """A large batch is handed over a chunk at a time, each chunk's signals sent before the
    next chunk's stops: the first services exit while the last are still being stopped
    (1,000 services: the first signal went out ~20 ms after shutdown began, not ~0.1 ms)."""
    from supervisor.services import Services

    story: list[tuple[str, str]] = []
    services = Services.__new__(Services)
    names = [f"s{i}" for i in range(120)]
    services.runners = {n: _StubRunner(n, story) for n in names}  # type: ignore[misc]
    await services.stop_in_order(names)
    assert sorted(n for kind, n in story if kind == "signal") == sorted(names)
    first_signal = story.index(("signal", "s0"))
    assert first_signal < story.index(("stop", "s119"))
    # Every service is stopped before it is signalled.
    for name in names:
        assert story.index(("stop", name)) < story.index(("signal", name))


RELEASED = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("up")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
"""


@pytest.mark.anyio
@pytest.mark.skipif(not _cgroups_usable(), reason="no writable cgroup2")
async def test_at_shutdown_a_cgroup_goes_as_soon_as_its_service_stopped(tmp_path: Path
                                                                        ) -> None:
    """Shutdown: the cgroup of a service that has stopped is removed (by the orphan guard,
    in its own process) while another service still stops, not only once all have; the
    daemon still sees the service stopped, and nothing is left at the end."""
    log, up, release = tmp_path / "order.log", tmp_path / "up", tmp_path / "release"
    commands = {"quick": [PY, "-c", STOPPER, "quick", str(log), "exit"],
                "slow": [PY, "-c", RELEASED, str(up), str(release)]}
    services = "".join(f"[services.{name}]\ncommand = {json.dumps(argv)}\nstart_seconds = 0\n"
                       f"stop_timeout = 60\n" for name, argv in commands.items())
    path = write_config(tmp_path, services, supervisor='cgroups = "auto"\n')
    with anyio.fail_after(60):
        async with running_daemon(path) as daemon:
            assert daemon.cgroups is not None
            await until(lambda: up.exists() and log.exists(), 20, "both services up")
            cgroups = {n: Path(daemon.snapshots[n].cgroup or "") for n in commands}
            await until(lambda: all((c / "cgroup.procs").exists() for c in cgroups.values()),
                        20, "both cgroups made")
            daemon.request_shutdown()
            try:
                await until(lambda: not cgroups["quick"].exists(), 20,
                            "quick's cgroup removed")
                # ... while slow still stops, in its cgroup.
                assert daemon.snapshots["slow"].state is State.STOPPING
                assert cgroups["slow"].exists()
                await until(lambda: daemon.snapshots["quick"].state is State.STOPPED, 20,
                            "quick stopped")
            finally:
                release.write_text("go")
    assert daemon.snapshots["slow"].state is State.STOPPED
    assert daemon.snapshots["slow"].last_exit.signal is None  # type: ignore[union-attr]
    assert not cgroups["slow"].parent.exists()
