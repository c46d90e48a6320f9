"""One measured run of a supervisor: startup, restarts, idle cost, shutdown, orphans.

All timings are taken from outside, the same way for every system (see procs.py).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.systems import SLEEP, Child, System, Tools, sleepers

log = logging.getLogger("bench")

COMM = os.path.basename(SLEEP[0])


@dataclass(frozen=True)
class Params:
    kills: int = 10
    idle_seconds: float = 20.0
    orphan_linger: float = 2.0
    reset_after: float = 1.0  # our backoff_reset_after; no child younger than this is killed
    timeout: float = 60.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launched:
    """A daemon under test, started with its stdout/stderr in a log file (never a pipe)."""

    def __init__(self, system: System, workdir: Path, children: list[Child], tools: Tools,
                 settings: dict[str, float]) -> None:
        argv = system.launch_argv(workdir, children, tools, settings)
        self.log_path = workdir / f"{system.kind}.out"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=workdir)
        self.pid = self.popen.pid

    def running(self) -> set[int]:
        return procs.running_children(self.pid, COMM)

    def count_running(self, confirmed: set[int], exclude: frozenset[int] = frozenset()) -> int:
        """Like len(running()) but stats only pids not yet `confirmed` (which it updates), so
        polling 200 children every 0.2 ms does not itself load the machine. A confirmed pid
        has exec'd; it stays counted while it is a child, i.e. until it is reaped."""
        now = procs.children(self.pid) - exclude
        confirmed &= now
        for pid in now - confirmed:
            st = procs.stat_of(pid)
            if st is not None and st[1] != "Z" and st[0] == COMM:
                confirmed.add(pid)
        return len(confirmed)

    def wait_running(self, n: int, timeout: float) -> float:
        """Seconds from launch until n children run."""
        confirmed: set[int] = set()
        at = procs.wait_until(lambda: self.count_running(confirmed) >= n, timeout, 0.001)
        if at is None:
            raise TimeoutError(f"{n} children not running after {timeout}s; see {self.log_path}")
        return at - self.started

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        """Leave nothing behind, whatever happened."""
        kids = procs.children(self.pid)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        time.sleep(0.05)
        procs.kill_all({p for p in kids if procs.alive(p)})
        procs.reap(kids)
        self._log.close()


def measure_restarts(d: Launched, n: int, p: Params, rng: random.Random) -> list[float]:
    """SIGKILL one child at a time, at jittered moments, and time until its replacement runs."""
    born = {pid: d.started for pid in d.running()}
    latencies: list[float] = []
    deadline = time.monotonic() + p.timeout + p.kills * (p.reset_after + 2.0)
    while len(latencies) < p.kills and time.monotonic() < deadline:
        # Jitter so the kill never lands at the same phase of any polling loop.
        time.sleep(rng.uniform(0.1, 0.35))
        now = time.monotonic()
        old = [pid for pid, t in born.items() if now - t >= p.reset_after + 0.1]
        if not old:
            continue
        victim = rng.choice(old)
        before = set(born) - {victim}
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        confirmed = set(before)

        def replaced(victim: int = victim, confirmed: set[int] = confirmed,
                     before: set[int] = before) -> bool:
            # A killed child stays a zombie child until the daemon reaps it: exclude it.
            return (d.count_running(confirmed, frozenset((victim,))) >= n
                    and bool(confirmed - before))

        at = procs.wait_until(replaced, p.timeout, 0.0002)
        if at is None:
            raise TimeoutError(f"no replacement for pid {victim}; see {d.log_path}")
        latencies.append(at - t0)
        del born[victim]
        for pid in confirmed - before:
            born[pid] = at
    return latencies


def measure_idle(d: Launched, seconds: float) -> tuple[float, int, int]:
    """(% of one core, RSS bytes, helpers' unique bytes) of the daemon over `seconds`.

    Helpers are the daemon's children that are not services (our orphan guard): their CPU is
    counted with the daemon's, and their unique memory (USS: what they do not share with the
    daemon) is reported so that it can be added to the daemon's RSS."""
    helpers = [pid for pid in procs.children(d.pid)
               if (st := procs.stat_of(pid)) is not None and st[0] != COMM and st[1] != "Z"]
    c0, t0 = _cpu(d.pid, helpers), time.monotonic()
    time.sleep(seconds)
    c1, t1 = _cpu(d.pid, helpers), time.monotonic()
    return (100.0 * (c1 - c0) / (t1 - t0), procs.rss_bytes(d.pid),
            sum(procs.uss_bytes(pid) for pid in helpers))


def _cpu(pid: int, helpers: list[int]) -> float:
    total = procs.cpu_seconds(pid)
    for helper in helpers:
        try:
            total += procs.cpu_seconds(helper)
        except OSError:
            pass
    return total


def measure_shutdown(d: Launched, timeout: float) -> tuple[float, int]:
    """Seconds from SIGTERM until the daemon and all its children are gone; children left."""
    kids = procs.children(d.pid)
    t0 = time.monotonic()
    d.popen.send_signal(signal.SIGTERM)

    def gone() -> bool:
        procs.reap(kids)  # children that outlived the daemon re-parent to us
        return d.popen.poll() is not None and not any(procs.alive(k) for k in kids)

    at = procs.wait_until(gone, timeout, 0.001)
    left = {k for k in kids if procs.alive(k)}
    procs.kill_all(left)
    time.sleep(0.05)
    procs.reap(kids)
    return (at if at is not None else time.monotonic()) - t0, len(left)


def measure_orphans(d: Launched, linger: float) -> int:
    """Children still alive `linger` seconds after SIGKILL of the daemon."""
    kids = procs.children(d.pid)
    d.popen.kill()
    d.popen.wait(10)
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline:
        procs.reap(kids)
        time.sleep(0.05)
    left = {k for k in kids if procs.alive(k)}
    procs.kill_all(left)
    time.sleep(0.05)
    procs.reap(kids)
    return len(left)


def lifecycle_run(system: System, n: int, tools: Tools, p: Params, measure_idle_cost: bool,
                  rng: random.Random) -> dict[str, float]:
    """One full run of `system` with n sleepers; returns metric name -> value."""
    out: dict[str, float] = {}
    settings = {"port": float(free_port()), "reset_after": p.reset_after}
    with tempfile.TemporaryDirectory(prefix=f"bench-{system.kind}-") as tmp:
        workdir = Path(tmp)
        d = Launched(system, workdir, sleepers(n), tools, settings)
        try:
            out["startup_s"] = d.wait_running(n, p.timeout)
            time.sleep(0.3)  # let post-start work (first stats sample, logs) settle
            lat = measure_restarts(d, n, p, rng)
            out["restart_p50_ms"] = 1000 * statistics.median(lat)
            out["restart_p90_ms"] = 1000 * _quantile(lat, 0.9)
            if measure_idle_cost:
                cpu, rss, helpers = measure_idle(d, p.idle_seconds)
                out["idle_cpu_pct"], out["rss_mib"] = cpu, rss / 2**20
                out["helpers_uss_mib"] = helpers / 2**20
                out["rss_total_mib"] = (rss + helpers) / 2**20
            out["shutdown_s"], out["shutdown_left"] = measure_shutdown(d, p.timeout)
        except Exception:
            log.error("%s n=%d failed; daemon output:\n%s", system.name, n, d.tail())
            raise
        finally:
            d.close()
        settings["port"] = float(free_port())
        d = Launched(system, workdir, sleepers(n), tools, settings)
        try:
            d.wait_running(n, p.timeout)
            # Killed in steady state, as for the other measurements: killed within a scheduler
            # slice of the last spawn, our daemon can leave that one service behind (the orphan
            # guard gets its pidfd only once the daemon runs again after the exec; see
            # docs/operator-guide.md), which this bench would otherwise hit often at N=4.
            time.sleep(0.3)
            out["orphans"] = float(measure_orphans(d, p.orphan_linger))
        finally:
            d.close()
    return out


def popen_floor(samples: int = 20) -> float:
    """Median seconds for one bare subprocess.Popen of the child program (fork+exec)."""
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        child = subprocess.Popen(SLEEP, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        child.kill()
        child.wait()
    return statistics.median(times)


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile: with few samples, report an observed value, not an interpolation."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]
