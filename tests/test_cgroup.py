"""The cgroup tree itself: finding the v2 hierarchy, a child born in its service's cgroup,
signal/kill/wait for `populated 0` (woken by inotify), figures from cpu.stat and
cgroup.procs, and nothing left of the tree at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.process import cgroup
from supervisor.process.procstats import ProcStatsSampler
from supervisor.process.spawn import Child, spawn

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_the_hierarchy_is_found_in_mountinfo() -> None:
    assert cgroup.unified_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroup.unified_mount(PURE) == "/sys/fs/cgroup"
    assert cgroup.unified_mount(HYBRID.splitlines()[1]) is None  # v1 only
    assert cgroup.own_cgroup("9:name=systemd:/\n0::/system.slice/x.service\n") == \
        "/system.slice/x.service"
    assert cgroup.own_cgroup("1:cpu:/\n") is None


def reap(child: Child) -> None:
    if child.status is None:
        anyio.run(child.wait)


def _usable() -> bool:
    mount = cgroup.unified_mount(Path("/proc/self/mountinfo").read_text())
    return mount is not None and os.geteuid() == 0 and os.access(mount, os.W_OK)


pytestmark_cg = pytest.mark.skipif(not _usable(), reason="no writable cgroup2")


@pytest.fixture
def tree() -> Iterator[cgroup.CgroupTree]:
    origin = Path("/proc/self/cgroup").read_text()
    t = cgroup.CgroupTree.create()
    try:
        yield t
    finally:
        t.kill_services()
        deadline = time.monotonic() + 5
        while any(cgroup.populated(c) for c in t.services()) and time.monotonic() < deadline:
            time.sleep(0.01)
        t.remove_all()
    assert Path("/proc/self/cgroup").read_text() == origin  # moved back
    assert not os.path.exists(t.instance)


@pytestmark_cg
def test_a_service_is_placed_with_what_it_forked_before(tree: cgroup.CgroupTree) -> None:
    """It forks the moment it runs, before it is placed: a child, and an escapee whose parent
    is already gone (double fork + setsid). Both end up in the service's cgroup, and our leaf
    keeps only us."""
    assert os.getpid() in cgroup.read_procs(tree.leaf)
    path = tree.service("api")
    env = {**os.environ, "SUPERVISOR_INVOCATION_ID": "inv-1"}
    child = spawn(["sh", "-c", "sleep 60 & (setsid sleep 60 &); exec sleep 60"], env, "/")
    try:
        deadline = time.monotonic() + 5
        while len(cgroup.read_procs(tree.leaf)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        moved = tree.place(child.pid, path, "inv-1")
        assert len(moved) == 2
        assert sorted(cgroup.read_procs(path)) == sorted([child.pid, *moved])
        assert cgroup.read_procs(tree.leaf) == [os.getpid()]
    finally:
        cgroup.kill(path)
        reap(child)


@pytestmark_cg
@pytest.mark.anyio
async def test_wait_empty_is_woken_by_the_kill(tree: cgroup.CgroupTree, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The safety re-check 30 s apart rather than 1 s: being woken by the event must then show
    # as seconds against thirty, which a loaded machine cannot blur.
    monkeypatch.setattr(cgroup, "RECHECK_SECONDS", 30.0)
    path = tree.service("worker")
    ready = tmp_path / "ready"
    child = spawn([sys.executable, "-c", "import signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "open(sys.argv[1], 'w').close()\ntime.sleep(60)", str(ready)],
                  dict(os.environ), "/")
    tree.place(child.pid, path, "-")
    watcher = cgroup.EmptyWatcher()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            service = cgroup.ServiceCgroup(tree, watcher, "worker")
            assert service.populated()
            with anyio.fail_after(10):  # its SIGTERM handler is installed
                while not ready.exists():  # noqa: ASYNC110 (another process's file)
                    await anyio.sleep(0.01)
            service.signal(signal.SIGTERM)  # ignored
            assert not await service.wait_empty(0.3)
            started = time.monotonic()
            service.signal(signal.SIGKILL)
            assert await service.wait_empty(20)
            # Woken by the event, not the safety re-check.
            assert time.monotonic() - started < 10
            tg.cancel_scope.cancel()
    finally:
        cgroup.kill(path)
        await child.wait()
        watcher.close()


@pytestmark_cg
def test_cpu_and_process_count_come_from_the_cgroup(tree: cgroup.CgroupTree) -> None:
    path = tree.service("busy")
    # Each of the two spins for 0.2 s of its own CPU time (not wall time: the machine is shared).
    code = "import os, time\nos.fork()\nwhile time.process_time() < 0.2: pass\ntime.sleep(60)"
    child = spawn([sys.executable, "-c", code], dict(os.environ), "/")
    tree.place(child.pid, path, "-")
    try:
        sampler = ProcStatsSampler()
        deadline = time.monotonic() + 10
        stats = sampler.sample({"busy": child.pid}, {"busy": path})["busy"]
        while (stats.cpu_seconds < 0.3 or stats.processes < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = sampler.sample({"busy": child.pid}, {"busy": path})["busy"]
        assert stats.processes == 2
        assert stats.cpu_seconds >= 0.3  # two processes, 0.2 s each (the forked one's too)
        assert stats.rss_bytes > 0
        cgroup.kill(path)
        reap(child)
        # Stopped: the counter does not go down.
        assert sampler.cpu_carried("busy") >= stats.cpu_seconds - 1e-9
    finally:
        cgroup.kill(path)
        reap(child)


@pytestmark_cg
def test_what_an_embedding_program_started_is_moved_back_not_killed() -> None:
    """A test (or any program embedding the daemon) may start processes of its own while the
    daemon runs: they are born in the daemon's leaf, and must leave with the daemon rather
    than be killed with the leaf by the guard."""
    origin = cgroup.own_cgroup(Path("/proc/self/cgroup").read_text())
    tree = cgroup.CgroupTree.create()
    helper = subprocess.Popen(["sleep", "60"])
    try:
        assert helper.pid in cgroup.read_procs(tree.leaf)
        tree.remove_all()
        assert not os.path.exists(tree.instance)
        assert cgroup.own_cgroup(Path(f"/proc/{helper.pid}/cgroup").read_text()) == origin
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()
