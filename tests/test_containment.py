"""Containment: no process a service starts outlives the service, however it forks (setsid,
double fork, forking on), in cgroup mode and in the fallback (`cgroups = "off"`).

Judged by scanning /proc, never by the daemon's bookkeeping: every test service carries a
unique CONTAIN_TAG in its environment, which /proc/<pid>/environ shows for all its
descendants. The daemon runs as operators run it (`python -m supervisor run`) under the
subreaper shim, so that nothing it leaves becomes a zombie of PID 1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from supervisor.control.server import request
from supervisor.process.cgroup import unified_mount
from tests.support import free_port, write_config

SHIM = Path(__file__).with_name("subreaper_shim.py")


def _cgroups_usable() -> bool:
    mount = unified_mount(Path("/proc/self/mountinfo").read_text())
    return mount is not None and os.geteuid() == 0 and os.access(mount, os.W_OK)


MODES = [pytest.param("auto", marks=pytest.mark.skipif(not _cgroups_usable(),
                                                        reason="no writable cgroup2")),
         "off"]

# The leader forks a child that setsid()s and double-forks a keeper; the keeper goes on
# forking setsid()ed sleepers. Nothing of it stays in the leader's process group.
FORKER = """
import os, time
def keeper():
    for _ in range(12):
        if os.fork() == 0:
            os.setsid()
            time.sleep(1000)
            os._exit(0)
        time.sleep(0.02)
    time.sleep(1000)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        keeper()
    os._exit(0)
time.sleep(1000)
"""


def tagged(tag: str) -> dict[int, str]:
    """Live (not zombie) processes whose environment holds CONTAIN_TAG=tag -> the
    SUPERVISOR_INVOCATION_ID they were started with (for the failure message)."""
    found: dict[int, str] = {}
    needle = f"CONTAIN_TAG={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in env and state != b"Z":
            invocation = next((e.split(b"=", 1)[1].decode() for e in env
                               if e.startswith(b"SUPERVISOR_INVOCATION_ID=")), "")
            found[int(entry)] = invocation
    return found


def wait_tagged(tag: str, ok: object, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = tagged(tag)
        if ok(found) or time.monotonic() > deadline:  # type: ignore[operator]
            return found
        time.sleep(0.02)


class Shimmed:
    def __init__(self, path: Path, backend: str) -> None:
        self.shim = subprocess.Popen(
            [sys.executable, str(SHIM), "10", sys.executable, "-m", "supervisor", "run",
             "--config", str(path), "--backend", backend],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.shim.stdout is not None
        line = self.shim.stdout.readline()
        assert line.startswith("pid "), line
        self.pid = int(line.split()[1])

    def finish(self) -> tuple[int, list[int]]:
        out, _ = self.shim.communicate(timeout=60)
        lines = dict(ln.split(" ", 1) if " " in ln else (ln, "") for ln in out.splitlines())
        return int(lines["exit"]), [int(p) for p in lines.get("leftover", "").split()]


def config(tmp_path: Path, mode: str, tag: str, command: list[str],
           names: tuple[str, ...] = ("forky",)) -> tuple[Path, str]:
    services = "".join(
        f"[services.{n}]\ncommand = {json.dumps(command)}\nstart_seconds = 0\n"
        f'stop_timeout = 0.5\nenv = {{CONTAIN_TAG = "{tag}"}}\n' for n in names)
    path = write_config(tmp_path, services, supervisor=f'cgroups = "{mode}"\n',
                        port=free_port())
    text = path.read_text()
    sock = text.split('control_socket = "', 1)[1].split('"', 1)[0]
    return path, sock


def status(path: Path) -> dict[str, dict[str, Any]]:
    """`supervisor status --json`, by service."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "--config",
                          str(path)], capture_output=True, text=True, timeout=30)
    return {s["name"]: s for s in json.loads(out.stdout)["services"]}


def control(sock: str, command: str, name: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request(sock, command, [name], timeout=timeout)
        except OSError:  # the control socket is not there yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_escapees_die_at_stop_restart_and_shutdown(tmp_path: Path, backend: str, mode: str
                                                   ) -> None:
    tag = uuid.uuid4().hex
    path, sock = config(tmp_path, mode, tag, [sys.executable, "-c", FORKER])
    daemon = Shimmed(path, backend)
    # cgroup mode: stopped means the cgroup is empty, so nothing may be seen at all; the
    # fallback SIGKILLs what it finds and does not wait for the deaths: a moment's grace (a
    # deadline, ended by the deaths; a loaded machine can take seconds to run them).
    grace = 0.0 if mode == "auto" else 10.0
    try:
        control(sock, "start", "forky")
        assert len(wait_tagged(tag, lambda f: len(f) >= 5, 20)) >= 5
        cgroup = status(path)["forky"]["cgroup"]
        if mode == "auto":  # where its processes are, as `supervisor status` shows
            assert cgroup.endswith("/forky.service")
            assert set(tagged(tag)) <= set(map(int, Path(cgroup, "cgroup.procs").read_text()
                                               .split()))
        else:
            assert cgroup is None
        assert control(sock, "stop", "forky")["services"] == {"forky": "stopped"}
        assert wait_tagged(tag, lambda f: not f, grace) == {}
        control(sock, "start", "forky")
        for _ in range(20):
            wait_tagged(tag, lambda f: len(f) >= 3, 20)
            before = set(tagged(tag))
            assert control(sock, "restart", "forky")["services"] == {"forky": "running"}
            left = wait_tagged(tag, lambda f, before=before: not set(f) & before, grace)
            assert not set(left) & before, f"previous start survived: {left}"
        wait_tagged(tag, lambda f: len(f) >= 5, 20)
    finally:
        os.kill(daemon.pid, signal.SIGTERM)
        code, leftover = daemon.finish()
    assert code == 0
    assert tagged(tag) == {}
    assert leftover == []
    if cgroup is not None:  # the daemon removed its cgroups
        assert not Path(cgroup).parent.exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_fork_right_after_exec_never_escapes(tmp_path: Path, backend: str, mode: str) -> None:
    """The child forks before the daemon could have moved it anywhere: it must be born in
    its cgroup (or, without one, be found as the leader's child)."""
    tag = uuid.uuid4().hex
    path, sock = config(tmp_path, mode, tag, ["sh", "-c", "setsid sleep 1000 & exec sleep 1000"])
    daemon = Shimmed(path, backend)
    grace = 0.0 if mode == "auto" else 10.0  # as above
    try:
        control(sock, "start", "forky")
        for _ in range(200):
            before = set(tagged(tag))
            assert control(sock, "restart", "forky")["services"] == {"forky": "running"}
            left = wait_tagged(tag, lambda f, before=before: not set(f) & before, grace)
            assert not set(left) & before, f"previous start survived: {left}"
    finally:
        os.kill(daemon.pid, signal.SIGTERM)
        code, leftover = daemon.finish()
    assert code == 0
    assert tagged(tag) == {}
    assert leftover == []


@pytest.mark.slow
@pytest.mark.skipif(not _cgroups_usable(), reason="no writable cgroup2")
def test_sigkill_of_the_daemon_during_startup_leaves_nothing(tmp_path: Path) -> None:
    """50 daemons SIGKILLed at random moments of their startup (both backends): no process
    of any service survives, whatever the moment (cgroup mode: the guard kills the
    instance's cgroups, and a service is in its cgroup before its first instruction)."""
    rng = random.Random(1414)
    survivors: dict[int, dict[int, str]] = {}
    for attempt in range(50):
        tag = uuid.uuid4().hex
        path, _ = config(tmp_path, "auto", tag, [sys.executable, "-c", FORKER],
                         names=("a", "b", "c"))
        daemon = Shimmed(path, ("asyncio", "trio")[attempt % 2])
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(daemon.pid, signal.SIGKILL)
        _, leftover = daemon.finish()
        found = tagged(tag)
        if found or leftover:
            survivors[attempt] = found
            for pid in found:
                os.kill(pid, signal.SIGKILL)
    assert survivors == {}


@pytest.mark.parametrize("mode", MODES)
def test_a_stop_signals_each_process_once(tmp_path: Path, mode: str) -> None:
    """stop_signal reaches the service's processes once each (a second SIGTERM means "hurry"
    to many programs), whether the service has been placed in its cgroup yet or not."""
    tag = uuid.uuid4().hex
    log = tmp_path / "terms"
    code = ("import os, signal, sys, time\n"
            "def term(*_):\n"
            "    with open(sys.argv[1], 'a') as f: f.write(f'{os.getpid()}\\n')\n"
            "    time.sleep(0.3); os._exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "if os.fork() == 0: os.setsid()\n"
            "time.sleep(1000)\n")
    path, sock = config(tmp_path, mode, tag, [sys.executable, "-c", code, str(log)])
    daemon = Shimmed(path, "asyncio")
    try:
        for _ in range(3):
            assert len(wait_tagged(tag, lambda f: len(f) >= 2, 20)) >= 2
            log.write_text("")
            assert control(sock, "stop", "forky")["services"] == {"forky": "stopped"}
            terms = log.read_text().split()
            assert len(terms) == len(set(terms)) >= 1, terms
            control(sock, "start", "forky")
    finally:
        os.kill(daemon.pid, signal.SIGTERM)
        code_, _ = daemon.finish()
    assert code_ == 0
