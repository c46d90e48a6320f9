"""The orphan guard: a SIGKILLed daemon takes every service's process group along, a dead guard
is replaced with every live service handed over again, and stop signals do not end it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import poll_until

ROOT = Path(__file__).resolve().parents[1]

# A stand-in daemon: spawns services through a guard as the real one does, reports their pids
# (and each service's own child), then does whatever stdin asks.
FAKE_DAEMON = """\
import json, os, sys, time
from supervisor.process.guard import OrphanGuard
from supervisor.process.spawn import spawn

guard = OrphanGuard()
children = []

def start(n):
    for _ in range(n):
        # A service with a child in its group, as a shell script with a pipeline has.
        child = spawn(["sh", "-c", "sleep 300 & exec sleep 301"], {"PATH": "/usr/bin:/bin"},
                      "/", guard)
        children.append(child)

start(2)
for line in sys.stdin:
    if line.startswith("start"):
        start(int(line.split()[1]))
    elif line.startswith("burst"):  # spawn while the guard reads nothing, then die at once
        os.kill(guard.pid, 19)  # SIGSTOP
        start(int(line.split()[1]))
        print(json.dumps({"guard": guard.pid, "services": [c.pid for c in children]}),
              flush=True)
        os.kill(os.getpid(), 9)
    elif line.startswith("close"):
        for c in children:
            c.signal_group(9)
        # Stopped first (until each leader is a zombie, not for a fixed time), then closed.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                open(f"/proc/{c.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                for c in children):
            time.sleep(0.01)
        guard.close()
    print(json.dumps({"guard": guard.pid, "starts": guard.starts,
                      "services": [c.pid for c in children]}), flush=True)
"""


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # nobody reaps it here
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and not dead(proc.pid):
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


class Fake:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.state = self.ask("")

    def ask(self, command: str) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def services(self) -> list[int]:
        return list(self.state["services"])  # type: ignore[call-overload]


@pytest.fixture
def fake() -> Iterator[Fake]:
    daemon = Fake()
    try:
        yield daemon
    finally:
        everything = [p for s in daemon.services() for p in group_members(s)]
        daemon.proc.kill()
        daemon.proc.wait(10)
        for pipe in (daemon.proc.stdin, daemon.proc.stdout):
            if pipe is not None:
                pipe.close()
        for pid in everything:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_killed_daemon_takes_every_service_group_along(fake: Fake) -> None:
    services = fake.services()
    assert poll_until(lambda: all(len(group_members(s)) == 2 for s in services), 10)
    members = [p for s in services for p in group_members(s)]
    guard = psutil.Process(int(fake.state["guard"]))  # type: ignore[call-overload]
    fake.proc.kill()  # no chance to stop anything
    fake.proc.wait(10)
    assert poll_until(lambda: all(dead(p) for p in members), 10), \
        [p for p in members if not dead(p)]
    assert poll_until(lambda: dead(guard.pid), 10)  # and the guard is gone too


def test_services_the_guard_has_not_read_yet_are_killed_too(fake: Fake) -> None:
    """The guard reads its socket in batches (at most one wake-up per pause): what the daemon
    sent before it died is still queued, pidfds included, and killed all the same."""
    fake.state = fake.ask("burst 30")
    fake.proc.wait(10)
    services = fake.services()
    assert len(services) == 32
    guard = int(fake.state["guard"])  # type: ignore[call-overload]
    os.kill(guard, signal.SIGCONT)
    assert poll_until(lambda: all(not group_members(s) for s in services), 10), \
        [s for s in services if group_members(s)]
    assert poll_until(lambda: dead(guard), 10)


def test_a_dead_guard_is_replaced_and_given_every_live_service(fake: Fake) -> None:
    first_guard = int(fake.state["guard"])  # type: ignore[call-overload]
    os.kill(first_guard, signal.SIGKILL)
    assert poll_until(lambda: dead(first_guard), 10)
    fake.state = fake.ask("start 1")  # the next spawn notices and starts a new guard
    assert fake.state["starts"] == 2 and fake.state["guard"] != first_guard
    services = fake.services()
    assert len(services) == 3
    assert poll_until(lambda: all(len(group_members(s)) == 2 for s in services), 10)
    members = [p for s in services for p in group_members(s)]
    fake.proc.kill()
    fake.proc.wait(10)
    # The two started under the first guard were handed to the second one.
    assert poll_until(lambda: all(dead(p) for p in members), 10)


def test_stop_signals_do_not_end_the_guard_and_a_clean_close_does(fake: Fake) -> None:
    guard = int(fake.state["guard"])  # type: ignore[call-overload]

    def ignoring(sig: int) -> bool:  # once the guard's interpreter has set itself up
        for line in Path(f"/proc/{guard}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        return False

    # SIGQUIT is the last the guard ignores, and is not ignored already (as SIGHUP is under
    # nohup, for one).
    assert poll_until(lambda: ignoring(signal.SIGQUIT), 10)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(guard, sig)
    time.sleep(0.3)
    assert not dead(guard)
    services = fake.services()
    state = fake.ask("close")  # services stopped first, then our end closed
    assert state["guard"] is None
    assert dead(guard)
    assert all(dead(s) for s in services)


def _voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_the_guard_sleeps_through_registrations_and_wakes_at_the_daemons_end() -> None:
    """Registrations do not wake a pausing guard (woken for each spawn, it preempted the
    daemon); the daemon's end does, at once, and every service is killed, those whose
    registration the guard has not read yet included. A pause of an hour shows both."""
    import socket
    import struct

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'supervisor' / 'process')!r})\n"
            "import guard_process\n"
            "guard_process._PAUSE_MS = 3_600_000\n"
            f"guard_process.serve({theirs.fileno()})\n")
    guard = subprocess.Popen([sys.executable, "-I", "-S", "-c", code],
                             pass_fds=(theirs.fileno(),), start_new_session=True)
    theirs.close()
    services: list[subprocess.Popen[bytes]] = []
    try:
        def register() -> None:
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            services.append(child)
            pidfd = os.pidfd_open(child.pid)
            socket.send_fds(ours, [struct.pack("=i", child.pid)], [pidfd])
            os.close(pidfd)

        # Set up and waiting for the daemon's messages (wchan names its kernel function).
        assert poll_until(lambda: "epoll" in Path(f"/proc/{guard.pid}/wchan").read_text(), 10)
        base = _voluntary_switches(guard.pid)
        register()  # wakes it; once it blocks again it is in its pause
        assert poll_until(lambda: _voluntary_switches(guard.pid) > base, 10)
        pausing = _voluntary_switches(guard.pid)
        for _ in range(20):
            register()
        assert _voluntary_switches(guard.pid) == pausing  # not woken by any of them
        ours.close()
        guard.wait(10)  # an hour's pause is cut short by the daemon's end
        for child in services:
            assert child.wait(10) == -signal.SIGKILL
    finally:
        ours.close()
        if guard.poll() is None:
            guard.kill()
            guard.wait()
        for child in services:
            if child.poll() is None:
                child.kill()
                child.wait()
