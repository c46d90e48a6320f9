"""sd_notify from the real daemon process through a real datagram socket, as systemd sees it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support import SLEEPER_CODE, free_port, receive_notify, service, write_config


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_notify_sequence_and_children_never_see_the_socket(tmp_path: Path, backend: str) -> None:
    env_dump = tmp_path / "env.json"
    dump = f"import json, os\njson.dump(dict(os.environ), open({str(env_dump)!r}, 'w'))\n"
    port = free_port()
    path = write_config(tmp_path, service("api", dump + SLEEPER_CODE, start_seconds=0.1),
                        port=port)
    sock_path = Path(tempfile.mkdtemp(prefix="sv-n-")) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(path),
                               "--backend", backend], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    seen: list[str] = []
    try:
        receive_notify(sock, "READY=1", 20, seen)
        # READY means listening and spawned: both are true the moment it arrives.
        status = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=5).json()
        assert status["services"][0]["pid"] is not None
        # Pinged every WATCHDOG_USEC/2 (0.2 s). The deadline is a loaded machine's margin;
        # without the watchdog pings none would come at all.
        receive_notify(sock, "WATCHDOG=1", 5.0, seen)
        receive_notify(sock, "WATCHDOG=1", 5.0, seen)
        statuses = [m for m in seen if m.startswith("STATUS=")]
        assert statuses and ("running" in statuses[-1] or "starting" in statuses[-1]), seen
        daemon.send_signal(signal.SIGHUP)
        seen.clear()
        receive_notify(sock, "RELOADING=1", 5, seen)
        reloading = next(m for m in seen if "RELOADING=1" in m.split("\n"))
        assert "MONOTONIC_USEC=" in reloading
        receive_notify(sock, "READY=1", 5, seen)
        daemon.send_signal(signal.SIGTERM)
        receive_notify(sock, "STOPPING=1", 5, seen)
        assert daemon.wait(timeout=20) == 0
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        sock.close()
    child_env = json.loads(env_dump.read_text())
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert key not in child_env


STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER_CODE


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_during_a_reload_stops_at_once_and_no_ready_follows(tmp_path: Path,
                                                                    backend: str) -> None:
    """A reload is stopping a changed service that ignores SIGTERM (stop_timeout 8 s) when
    SIGTERM arrives, then SIGHUP and `supervisor reload`: STOPPING=1 goes out at once (SIGTERM
    does not wait behind the reload), the later reloads are refused, READY=1 never follows
    STOPPING=1, and the daemon exits 0 without a traceback."""
    port = free_port()
    # stop_timeout 8 s: far enough from "at once" that the bound below can leave a loaded
    # machine seconds of margin and still tell the two apart.
    slow = service("slow", STUBBORN, start_seconds=0.1, stop_timeout=8.0)
    path = write_config(tmp_path, slow + service("api", SLEEPER_CODE, start_seconds=0.1),
                        port=port)
    sock_path = Path(tempfile.mkdtemp(prefix="sv-n-")) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    stderr = (tmp_path / "stderr").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(path),
                               "--backend", backend], env=env, stdout=subprocess.DEVNULL,
                              stderr=stderr)
    seen: list[str] = []

    def state(name: str) -> str:
        services = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=5).json()["services"]
        return str(next(s["state"] for s in services if s["name"] == name))

    try:
        receive_notify(sock, "READY=1", 20, seen)
        deadline = time.monotonic() + 10
        while state("slow") != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        path.write_text(path.read_text().replace(slow, slow + 'env = { V = "2" }\n'))
        daemon.send_signal(signal.SIGHUP)
        receive_notify(sock, "RELOADING=1", 5, seen)
        deadline = time.monotonic() + 10
        while state("slow") != "stopping" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state("slow") == "stopping"
        seen.clear()
        sent = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        receive_notify(sock, "STOPPING=1", 5, seen)
        assert time.monotonic() - sent < 5.0  # not after the reload's 8 s stop_timeout
        daemon.send_signal(signal.SIGHUP)
        refused = subprocess.run([sys.executable, "-m", "supervisor", "reload", "--config",
                                  str(path)], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1
        assert "shutting down" in refused.stderr
        assert daemon.wait(timeout=20) == 0
        sock.settimeout(0.2)
        while True:  # everything sent until the daemon exited
            try:
                seen.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        sock.close()
        stderr.close()
    after_stopping = [m for m in seen[seen.index("STOPPING=1\n"):]]
    assert not [m for m in after_stopping if "READY=1" in m.split("\n")], seen
    assert not [m for m in after_stopping if "RELOADING=1" in m.split("\n")], seen
    log = (tmp_path / "stderr").read_text()
    assert "Traceback" not in log and "KeyError" not in log, log
    assert "SIGHUP during shutdown: reload ignored" in log
