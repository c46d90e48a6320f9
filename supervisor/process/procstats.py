"""Resource figures per service, summed over its whole process group (or, in cgroup mode,
over its cgroup's processes, with CPU from the cgroup's cpu.stat), sampled with psutil.

psutil reads /proc and blocks, so `ProcStatsSampler.sample` is meant for a worker thread
(`anyio.to_thread.run_sync`); the HTTP threads only ever read the frozen result.

The CPU figure is a true counter across the group's churn: when a member (or the leader, on
restart) disappears, its last seen CPU time is carried forward, so the series never goes down
while the daemon runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from supervisor.process import cgroup


@dataclass(frozen=True)
class TreeStats:
    cpu_seconds: float
    rss_bytes: int
    threads: int
    open_fds: int
    processes: int


@dataclass
class _ServiceCpu:
    carried: float = 0.0
    last: dict[int, float] = field(default_factory=dict)
    cgroup: float = 0.0  # the service cgroup's usage at the last sample


# Thread and fd counts move slowly but cost about half of a round to read (/proc/<pid>/status
# and the fd directory, against /proc/<pid>/stat and statm for CPU and RSS): they are read for
# a new process and then on every SLOW_EVERY-th round. At 200 services a round went from
# 19 ms to about 13 ms on average.
SLOW_EVERY = 3


class ProcStatsSampler:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[str, _ServiceCpu] = {}
        self._slow: dict[int, tuple[int, int]] = {}  # pid -> (threads, open fds)
        self._round = 0

    def sample(self, leaders: Mapping[str, int],
               cgroups: Mapping[str, str] | None = None) -> dict[str, TreeStats]:
        """`leaders` maps service -> pid of its live process (which leads its group);
        `cgroups` service -> its cgroup, where it has one: its members are then the cgroup's
        processes and its CPU the cgroup's cpu.stat (no walk over every pid)."""
        cgroups = cgroups or {}
        wanted = {pid: name for name, pid in leaders.items() if name not in cgroups}
        members: dict[str, list[int]] = {name: [] for name in leaders}
        for name in leaders:
            if name in cgroups:
                members[name] = cgroup.read_procs(cgroups[name])
        for pid in psutil.pids() if wanted else ():
            try:
                group = os.getpgid(pid)
            except OSError:
                continue
            owner = wanted.get(group)
            if owner is not None:
                members[owner].append(pid)
        result: dict[str, TreeStats] = {}
        seen: set[int] = set()
        refresh_slow = self._round % SLOW_EVERY == 0
        self._round += 1
        slow_seen: dict[int, tuple[int, int]] = {}
        for name, pids in members.items():
            cpu_state = self._cpu.setdefault(name, _ServiceCpu())
            cpu_now: dict[int, float] = {}
            rss = threads = fds = count = 0
            for pid in pids:
                proc = self._process(pid)
                if proc is None:
                    continue
                slow = None if refresh_slow else self._slow.get(pid)
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss += proc.memory_info().rss
                        if slow is None:
                            slow = (proc.num_threads(), proc.num_fds())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                threads += slow[0]
                fds += slow[1]
                slow_seen[pid] = slow
                cpu_now[pid] = times.user + times.system
                count += 1
                seen.add(pid)
            usage = cgroup.cpu_seconds(cgroups[name]) if name in cgroups else None
            if usage is not None:
                if usage < cpu_state.cgroup:  # a new cgroup (a reload): keep the counter
                    cpu_state.carried += cpu_state.cgroup
                cpu_state.cgroup = usage
                result[name] = TreeStats(cpu_state.carried + usage, rss, threads, fds, count)
                continue
            for pid, last in cpu_state.last.items():
                if pid not in cpu_now:
                    cpu_state.carried += last
            cpu_state.last = cpu_now
            result[name] = TreeStats(cpu_state.carried + sum(cpu_now.values()), rss, threads,
                                     fds, count)
        for name in list(self._cpu):
            if name not in leaders:  # not running now: keep the carried total, drop live pids
                state = self._cpu[name]
                state.carried += sum(state.last.values())
                state.last = {}
        self._procs = {pid: proc for pid, proc in self._procs.items() if pid in seen}
        self._slow = slow_seen
        return result

    def cpu_carried(self, name: str) -> float:
        state = self._cpu.get(name)
        return state.carried + state.cgroup if state else 0.0

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return None
            self._procs[pid] = proc
        return proc
