"""Hostile HTTP clients against the daemon's listener, on both backends: slowloris (idle and
byte-a-second connections) cannot fail liveness or readiness, and everything they held is
given back."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

from supervisor.web import http as http_mod
from tests.support import SLEEPER_CODE, free_port, running_daemon, service, write_config

pytestmark = pytest.mark.anyio

ATTACKERS = 1000


def _probe(port: int, path: str) -> tuple[int, float, bytes]:
    """A fresh connection per probe, as kubelet makes: (status, seconds, body)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, time.monotonic() - started, body
    finally:
        conn.close()


def _server_side(port: int) -> int:
    """Established TCP connections this process accepted on `port`."""
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def _threads() -> int:
    """The process's threads, minus the test's own to_thread() workers (trio keeps an idle
    one 10 s, anyio's asyncio pool longer)."""
    return sum(1 for t in threading.enumerate()
               if not t.name.startswith(("Trio thread", "AnyIO worker")))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Dribbler:
    """Sends one byte a second on each slow socket, from one thread."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.stop = threading.Event()
        self.head = b"GET /v1/metrics HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        sent = 0
        while not self.stop.wait(1.0):
            byte = self.head[sent % len(self.head):][:1]
            sent += 1
            for sock in self.socks:
                try:
                    sock.send(byte, socket.MSG_DONTWAIT)
                except OSError:
                    pass


@pytest.mark.slow
async def test_slowloris_cannot_fail_probes_and_its_connections_are_freed(
        tmp_path: Path) -> None:
    # A dependency that is down: /v1/ready must keep saying so (503), not 200 and not a
    # timeout, while the attackers hold their connections.
    path = write_config(tmp_path, f"""
[checks.gate]
type = "tcp"
address = "127.0.0.1:{free_port()}"
interval = 0.2
timeout = 0.2
""" + service("api", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        assert daemon.listen_address is not None
        port = daemon.listen_address[1]
        for _ in range(3):  # warm: workers, imports
            assert (await anyio.to_thread.run_sync(_probe, port, "/v1/health"))[0] == 200
        threads, fds = _threads(), _fds()

        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(ATTACKERS // 2)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(ATTACKERS // 2)]
        dribbler = Dribbler(slow)
        dribbler.thread.start()
        try:
            worst = 0.0
            attack_until = time.monotonic() + 3.0
            while time.monotonic() < attack_until:
                status, took, _ = await anyio.to_thread.run_sync(_probe, port, "/v1/health")
                assert status == 200
                worst = max(worst, took)
                status, took, body = await anyio.to_thread.run_sync(_probe, port, "/v1/ready")
                assert status == 503 and b'"not_ready"' in body  # its true state: gate down
                worst = max(worst, took)
                await anyio.sleep(0.1)
            # A probe held behind an attacker would take the head deadline (5 s). One second is
            # kubelet's default probe timeout, and leaves a loaded machine its margin.
            assert worst < 1.0, f"a probe took {worst * 1000:.0f} ms during the attack"
            # The server hangs up on every attacker after its head deadline (idle ones once
            # the kernel hands them over), while the attackers still hold their ends open.
            with anyio.fail_after(http_mod.HEAD_TIMEOUT + 6):
                while await anyio.to_thread.run_sync(_server_side, port):
                    await anyio.sleep(0.25)
            assert (await anyio.to_thread.run_sync(_probe, port, "/v1/health"))[0] == 200
        finally:
            dribbler.stop.set()
            dribbler.thread.join(5)
            for sock in idle + slow:
                sock.close()
        # What the attack took is given back.
        deadline = time.monotonic() + 5
        while (_fds() > fds or _threads() > threads) and (
                time.monotonic() < deadline):
            await anyio.sleep(0.1)
        assert _fds() <= fds and _threads() <= threads, (
            _fds(), fds, [t.name for t in threading.enumerate()], threads)
