"""sd_notify through real AF_UNIX datagram sockets (filesystem path and abstract name)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import anyio
import pytest

from supervisor.control.notify import (
    Notifier,
    watchdog_interval,
    watchdog_loop,
)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET address."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    tmpdir = None
    if request.param == "path":
        # Short directory: sun_path holds at most 107 bytes, pytest's tmp_path can exceed it.
        tmpdir = tempfile.mkdtemp(prefix="sdn")
        address = os.path.join(tmpdir, "notify")
        sock.bind(address)
    else:
        name = f"supervisor-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    try:
        yield sock, address
    finally:
        sock.close()
        if tmpdir:
            shutil.rmtree(tmpdir)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def receive(sock: socket.socket) -> str:
    with anyio.fail_after(20):
        await anyio.wait_readable(sock)
    return sock.recv(4096).decode()


def test_from_environ_without_socket_is_none() -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": ""}) is None


def test_from_environ_rejects_unsupported_address(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="supervisor.control.notify"):
        assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert "sd_notify disabled" in caplog.text


@pytest.mark.anyio
async def test_each_call_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier is not None
    notifier.ready()
    assert await receive(sock) == "READY=1\n"
    notifier.status("3/3 services running\nsecond line")
    # Newlines in a value would start a bogus field: they become spaces.
    assert await receive(sock) == "STATUS=3/3 services running second line\n"
    notifier.ready(status="ok")
    assert await receive(sock) == "READY=1\nSTATUS=ok\n"
    notifier.stopping()
    assert await receive(sock) == "STOPPING=1\n"
    notifier.watchdog()
    assert await receive(sock) == "WATCHDOG=1\n"
    assert notifier.send(ERRNO=5, STATUS="x")
    assert await receive(sock) == "ERRNO=5\nSTATUS=x\n"
    assert drain(sock) == []
    assert notifier.sent == 6 and notifier.failures == 0


@pytest.mark.anyio
async def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = Notifier(address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = (await receive(sock)).splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_invalid_field_name_is_a_programming_error() -> None:
    notifier = Notifier("@unused")
    with pytest.raises(ValueError):
        notifier.send(**{"READY=1\nX": 1})
    with pytest.raises(ValueError):
        notifier.send(ready=1)


def test_send_failure_never_raises_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    tmpdir = tempfile.mkdtemp(prefix="sdn")
    try:
        notifier = Notifier(os.path.join(tmpdir, "nobody-listens"))
        with caplog.at_level(logging.INFO, logger="supervisor.control.notify"):
            assert notifier.send(WATCHDOG=1) is False
            assert notifier.send(WATCHDOG=1) is False
            assert notifier.send(READY=1) is False
        failures = [r for r in caplog.records if "sd_notify failed" in r.getMessage()]
        assert len(failures) == 1
        assert notifier.failures == 3 and notifier.sent == 0

        # The listener comes back: one recovery line, and the next failure is logged again.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(notifier.address)
            with caplog.at_level(logging.INFO, logger="supervisor.control.notify"):
                assert notifier.send(READY=1) is True
            assert sock.recv(100) == b"READY=1\n"
        os.unlink(notifier.address)
        with caplog.at_level(logging.INFO, logger="supervisor.control.notify"):
            assert notifier.send(READY=1) is False
        messages = [r.getMessage() for r in caplog.records]
        assert sum("sd_notify recovered" in m for m in messages) == 1
        assert sum("sd_notify failed" in m for m in messages) == 2
    finally:
        shutil.rmtree(tmpdir)


def test_full_receive_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = Notifier(address)
    started = time.monotonic()
    results = [notifier.send(WATCHDOG=1) for _ in range(2000)]
    # Nobody reads: the queue fills and sends fail (EAGAIN) instead of blocking the caller.
    assert time.monotonic() - started < 2.0
    assert results[0] is True
    assert results[-1] is False


def test_watchdog_interval() -> None:
    pid = os.getpid()
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    # Inherited from a parent that systemd was watching: not ours to ping.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "7"}, pid=7) == 0.0005
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "thirty"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "x"}) is None


def test_children_do_not_inherit_notify_variables() -> None:
    # The daemon builds child environments with config.child_environment.
    from supervisor.config import PRIVATE_ENV

    assert {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} <= set(PRIVATE_ENV)


@pytest.mark.anyio
async def test_watchdog_loop_pings_and_stops_when_loop_is_wedged(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = Notifier(address)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog_loop, notifier, 0.01)
        for _ in range(3):
            assert await receive(sock) == "WATCHDOG=1\n"
        # Wedge the event loop: a loop-driven watchdog must send nothing meanwhile.
        drain(sock)
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point of this test
        assert drain(sock) == []
        # Once the loop runs again, pings resume.
        assert await receive(sock) == "WATCHDOG=1\n"
        tg.cancel_scope.cancel()
    sent = notifier.sent
    await anyio.sleep(0.05)
    assert notifier.sent == sent, "the loop kept pinging after cancellation"


@pytest.mark.anyio
async def test_watchdog_loop_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError):
        await watchdog_loop(Notifier("@unused"), 0)
