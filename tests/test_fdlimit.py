"""The daemon raises its file descriptor limit to what its services need: with the usual soft
limit of 1,024, 400 services got as far as 335 ("Too many open files" for the rest)."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.process import fdlimit
from tests.support import LOAD_SLACK, SLEEPER_CODE, poll_until, service, write_config

SERVICES = 80  # 80 x 4 descriptors: more than the 256 the daemon is started with


def limited(soft: int, hard: int):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return preexec


def status(path: Path) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "--config",
                             str(path)], capture_output=True, text=True, timeout=30)
    if not result.stdout:
        return {}
    return {s["name"]: s["state"] for s in json.loads(result.stdout)["services"]}


def run_daemon(path: Path, backend: str, soft: int, hard: int, stop_within: float = 60
               ) -> tuple[dict[str, str], str]:
    """States once every service has started or given up, and the daemon's log; the daemon
    must then stop cleanly on SIGTERM within `stop_within` seconds."""
    log = path.with_name("daemon.log")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config",
                                 str(path), "--backend", backend], stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=limited(soft, hard))
    states: dict[str, str] = {}
    try:
        def tried() -> bool:  # every service spawned or failed to (the log says which)
            text = log.read_text()
            return all(f"service=s{i} " in text for i in range(SERVICES))

        assert poll_until(tried, 30 * LOAD_SLACK, 0.1), log.read_text()[-3000:]
        states = status(path)  # empty where the control socket cannot accept
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"no clean stop within {stop_within} s:\n"
                                 f"{log.read_text()[-3000:]}") from None
    err = log.read_text()
    assert proc.returncode == 0, err
    return states, err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_low_soft_limit_is_raised_for_the_services(tmp_path: Path, backend: str) -> None:
    path = write_config(tmp_path, "".join(service(f"s{i}", SLEEPER_CODE, start_seconds=0)
                                          for i in range(SERVICES)))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < fdlimit.wanted(SERVICES):
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is below what the test needs")
    states, err = run_daemon(path, backend, 256, hard)
    assert set(states.values()) == {"running"}, {n: s for n, s in states.items()
                                                 if s != "running"}
    assert "Too many open files" not in err and "file descriptors:" not in err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_running_out_of_descriptors_is_named_and_survived(tmp_path: Path, backend: str) -> None:
    """Where the hard limit is too low the daemon says so, the services it cannot start fail
    with the reason (not a traceback), and the daemon itself goes on: its control socket's
    accept() failing with EMFILE used to end it (and every service with it), and a stop did
    not reach a process whose cgroup placement had failed (so the shutdown waited out every
    stop_timeout, 30 s here)."""
    path = write_config(tmp_path, "".join(
        service(f"s{i}", SLEEPER_CODE, start_seconds=0, stop_timeout=30.0)
        for i in range(SERVICES)))
    states, err = run_daemon(path, backend, 256, 256, stop_within=20)
    assert (f"file descriptors: {SERVICES} services need about {fdlimit.needed(SERVICES)}, "
            "the limit is 256 (hard 256)") in err
    assert "Too many open files" in err  # some did fail to start, and said why
    assert "internal error" not in err and "Traceback" not in err, err[-3000:]
    assert err.count("spawned service=") > 0  # the ones that fit run


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_reload_that_adds_services_sizes_the_limit_again(tmp_path: Path, backend: str
                                                           ) -> None:
    """Start fits the hard limit (300); a reload to 20 services does not: it says so then,
    as a start would, instead of leaving the new services to fail unexplained."""
    few = "".join(service(f"s{i}", SLEEPER_CODE, start_seconds=0) for i in range(5))
    path = write_config(tmp_path, few)
    log = path.with_name("daemon.log")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config",
                                 str(path), "--backend", backend], stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=limited(300, 300))
    try:
        assert poll_until(lambda: len(status(path)) == 5, 30 * LOAD_SLACK, 0.1)
        assert "file descriptors:" not in log.read_text()
        path.write_text(path.read_text() + "".join(
            service(f"s{i}", SLEEPER_CODE, start_seconds=0) for i in range(5, 20)))
        reload = subprocess.run([sys.executable, "-m", "supervisor", "reload", "--config",
                                 str(path)], capture_output=True, text=True, timeout=60)
        assert reload.returncode == 0, reload.stderr
        assert (f"file descriptors: 20 services need about {fdlimit.needed(20)}, the limit "
                "is 300 (hard 300)") in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
