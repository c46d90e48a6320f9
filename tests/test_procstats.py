"""Resource figures per service: summed over the process group, CPU carried across member
churn, and the slow-moving counts read on every SLOW_EVERY-th round."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.process.procstats import SLOW_EVERY, ProcStatsSampler
from tests.support import poll_until

# A leader that forks one worker into its own group, and starts 3 more threads once `go` exists.
LEADER = """\
import os, sys, threading, time
go = sys.argv[1]
worker = os.fork()
if worker == 0:
    while True: time.sleep(1)
started = False
end = time.monotonic() + 60
while time.monotonic() < end:
    if not started and os.path.exists(go):
        for _ in range(3):
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        started = True
        open(go + ".done", "w").close()
    sum(range(20000))  # burn a little CPU
    time.sleep(0.01)
"""


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", LEADER, str(go)], process_group=0)
    try:
        yield proc, go
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_group_is_summed_and_slow_counts_refresh_on_their_round(
        leader: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, go = leader
    sampler = ProcStatsSampler()
    assert poll_until(lambda: sampler.sample({"svc": proc.pid})["svc"].processes == 2, 10)
    while sampler._round % SLOW_EVERY != 0:  # up to the next round that reads the counts
        sampler.sample({"svc": proc.pid})
    stats = sampler.sample({"svc": proc.pid})["svc"]
    assert stats.processes == 2 and stats.threads == 2 and stats.rss_bytes > 0
    assert stats.open_fds >= 6  # stdin, stdout, stderr of each member
    go.touch()
    assert poll_until(lambda: (go.parent / "go.done").exists(), 10)
    for _ in range(SLOW_EVERY - 1):  # not re-read on these rounds
        assert sampler.sample({"svc": proc.pid})["svc"].threads == 2
    assert sampler._round % SLOW_EVERY == 0
    assert sampler.sample({"svc": proc.pid})["svc"].threads == 5  # read again on this one


def test_cpu_never_goes_down_when_members_exit(
        leader: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, _ = leader
    sampler = ProcStatsSampler()
    assert poll_until(lambda: sampler.sample({"svc": proc.pid})["svc"].processes == 2, 10)
    assert poll_until(lambda: sampler.sample({"svc": proc.pid})["svc"].cpu_seconds > 0.05, 20)
    before = sampler.sample({"svc": proc.pid})["svc"]
    os.kill(proc.pid, 9)  # the leader goes; its worker stays in the group
    proc.wait(10)
    after = sampler.sample({"svc": proc.pid})["svc"]
    assert after.processes == 1
    assert after.cpu_seconds >= before.cpu_seconds
