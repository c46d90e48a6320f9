"""What the listener answers to odd requests: garbage gets a real `HTTP/1.1 400` status line,
absolute-form targets are routed like origin-form, oversized and slow heads are cut off."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.web.heads import Head, head_state, origin_form
from supervisor.web.http import BoundedWSGIServer, Router, serve
from tests.support import SLEEPER_CODE, running_daemon, service, write_config


@pytest.fixture(scope="module")
def server() -> Iterator[BoundedWSGIServer]:
    router = Router()
    router.add_json("/v1/ready", lambda: (200, {"status": "ready"}))
    router.add_json("/v1/status", lambda: (200, {"status": "ok"}))
    srv, thread = serve("127.0.0.1", 0, router, max_connections=16,
                        inline_paths=("/v1/ready",), head_timeout=1.0)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def exchange(server: BoundedWSGIServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read the whole answer (the server closes every connection)."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("garbage", [
    b"garbage\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to the plain port
    b"GET /v1/status\r\n\r\n",  # HTTP/0.9
    b"GET  /v1/status HTTP/1.1\r\n\r\n",
    b"GET /v1/status HTTP/1.1 extra\r\n\r\n",
    b"G\x00T /v1/status HTTP/1.1\r\n\r\n",
    b"GET /v1/status HTTP/x.y\r\n\r\n",
])
def test_garbage_gets_a_400_status_line(server: BoundedWSGIServer, garbage: bytes) -> None:
    answer = exchange(server, garbage)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:80]


@pytest.mark.parametrize("partial", [b"garbage", b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"])
def test_a_partial_head_then_eof_gets_a_400(server: BoundedWSGIServer, partial: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as s:
        s.sendall(partial)
        s.shutdown(socket.SHUT_WR)  # as `printf garbage | nc` does
        assert s.recv(4096).startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("request_line,status", [
    (b"GET /v1/status HTTP/2.0", b"505"),  # wsgiref's own refusals keep their status line
    (b"GET /v1/status HTTP/1.1" + b"\r\nX: y" * 101, b"431"),  # too many headers
])
def test_wsgiref_errors_have_a_status_line(server: BoundedWSGIServer, request_line: bytes,
                                           status: bytes) -> None:
    answer = exchange(server, request_line + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 " + status) or answer.startswith(b"HTTP/1.1 " + status), \
        answer[:80]


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_get_a_status_line_or_nothing(server: BoundedWSGIServer, data: bytes) -> None:
    answer = exchange(server, data.replace(b"\r\n\r\n", b"") + b"\r\n\r\n")
    assert answer == b"" or answer[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), answer[:80]
    if answer:
        assert answer[9:12].isdigit()


@pytest.mark.parametrize("target", [b"http://127.0.0.1/v1/status", b"HTTP://example.test/v1/status",
                                    b"http://user@host:99/v1/status?x=1"])
def test_absolute_form_targets_are_routed(server: BoundedWSGIServer, target: bytes) -> None:
    for path in (target, target.replace(b"/v1/status", b"/v1/ready")):
        answer = exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer
    missing = exchange(server, b"GET http://h/nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 404 " in missing.split(b"\r\n", 1)[0]


def test_a_head_too_large_gets_431(server: BoundedWSGIServer) -> None:
    answer = exchange(server, b"GET /v1/status HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]


def test_a_slow_head_is_cut_at_the_total_deadline(server: BoundedWSGIServer) -> None:
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-A: bcdefghijklmnopqrstuvwxyz":
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)  # a byte every 0.1 s: each recv succeeds, the head never ends
            if time.monotonic() - started > 3:
                break
        answer = s.recv(4096)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert took < 2.5  # head_timeout is 1 s here


def test_head_state_and_origin_form() -> None:
    assert head_state(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == (Head.COMPLETE, 27)
    assert head_state(b"GET / HTTP/1.1\nHost: x\n\n") == (Head.COMPLETE, 24)
    assert head_state(b"GET / HTTP/1.1\r\nHost: x\r\n")[0] is Head.INCOMPLETE
    assert head_state(b"GET / HTTP/1.1")[0] is Head.INCOMPLETE
    assert head_state(b"hello there\r\n")[0] is Head.BAD
    assert origin_form("http://h:1/a/b?c=d") == "/a/b?c=d"
    assert origin_form("http://h") == "/"
    assert origin_form("/v1/x?y") == "/v1/x?y"


@pytest.mark.anyio
async def test_metrics_vary_on_negotiation_and_ipv6_start_log_is_bracketed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = write_config(tmp_path, service("api", SLEEPER_CODE))
    path.write_text(path.read_text().replace('listen = "127.0.0.1:', 'listen = "[::1]:'))
    async with running_daemon(path) as daemon:
        assert daemon.listen_address is not None
        port = daemon.listen_address[1]
        async with httpx.AsyncClient(timeout=10) as client:
            for accept in ("", "application/openmetrics-text; version=1.0.0"):
                response = await client.get(f"http://[::1]:{port}/v1/metrics",
                                            headers={"Accept": accept})
                assert response.status_code == 200
                assert response.headers["vary"] == "Accept, Accept-Encoding"
    logged = [r.getMessage() for r in caplog.records if "listening" in r.getMessage()]
    assert logged == [f"listening address=http://[::1]:{port}/v1/metrics"]
    assert urlsplit(logged[0].split("=", 1)[1]).port == port


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)


@given(method=st.sampled_from(["GET", "HEAD", "POST", "BREW"]),
       target=st.text("abc/?=&%.-_~", min_size=1, max_size=30).map(lambda t: "/" + t),
       headers=st.lists(st.tuples(_TOKEN, st.text("abc 123;=,/", max_size=40)), max_size=8),
       newline=st.sampled_from(["\r\n", "\n"]), body=st.binary(max_size=20),
       cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
@settings(max_examples=200, deadline=None)
def test_a_head_arriving_in_any_pieces_ends_where_it_ends(
        method: str, target: str, headers: list[tuple[str, str]], newline: str, body: bytes,
        cuts: list[int]) -> None:
    head = (f"{method} {target} HTTP/1.1{newline}"
            + "".join(f"{k}: {v}{newline}" for k, v in headers) + newline).encode()
    data = head + body
    buf = bytearray()
    searched = 0
    state, length = Head.INCOMPLETE, 0
    for start, end in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True):
        buf += data[start:end]
        state, length = head_state(buf, searched)
        searched = len(buf)
        if state is not Head.INCOMPLETE:
            break
    if state is Head.INCOMPLETE:  # the last pieces were cut off by `cuts` beyond the data
        state, length = head_state(buf, searched)
    assert (state, length) == (Head.COMPLETE, len(head))
