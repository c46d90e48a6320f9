"""supervisor.http's server on real loopback sockets: routing, malformed requests, slow clients
handed to the pool (more than the accept workers, up to max_connections, then 503), slow apps
kept off the accept workers, large responses to slow readers, and a clean stop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from supervisor import http
from supervisor.http import Router, serve

Server = tuple[http.BoundedWSGIServer, int]


def request(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send `raw`, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    raw = request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a test's app blocked


@pytest.fixture
def server(release: threading.Event) -> Iterator[Server]:
    router = Router()
    seen: list[dict[str, Any]] = []
    router.add_json("/fast", lambda: (200, {"ok": True}))

    def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])  # no Content-Length
        return [f"{environ['PATH_INFO']}?{environ['QUERY_STRING']}".encode()]

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("QUERY_STRING") == "warm":
            time.sleep(0.02)
        else:
            release.wait(20)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    def big(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = bytes(range(256)) * (16 << 10)  # 4 MiB: more than a socket buffer
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("bug")

    router.add_app("/echo", echo)
    router.add_app("/a b", echo)
    router.add_app("/slow", slow)
    router.add_app("/big", big)
    router.add_app("/broken", broken)
    srv, thread = serve("127.0.0.1", 0, router, max_connections=8)
    srv.seen = seen  # type: ignore[attr-defined]
    try:
        yield srv, srv.server_address[1]
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def test_routes_methods_and_headers(server: Server) -> None:
    _, port = server
    status, headers, body = get(port, "/fast")
    assert (status, body) == (200, b'{"ok":true}')
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close" and "date" in headers
    status, headers, body = get(port, "/fast", "HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "11")
    status, headers, _ = get(port, "/fast", "POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert get(port, "/nope")[0] == 404
    status, headers, body = get(port, "/echo?x=1&y=%20")
    assert (status, body) == (200, b"/echo?x=1&y=%20")
    assert headers["content-length"] == str(len(body))  # added for a one-block body
    assert get(port, "/a%20b")[0] == 200  # PATH_INFO is percent-decoded


def test_request_parsing(server: Server) -> None:
    srv, port = server
    raw = request(port, b"GET /echo HTTP/1.0\nX-Thing: a\nx-thing: b\nContent-Type: t\n\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    environ = srv.seen[-1]  # type: ignore[attr-defined]
    assert environ["HTTP_X_THING"] == "a,b" and environ["CONTENT_TYPE"] == "t"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0" and environ["REMOTE_ADDR"] == "127.0.0.1"
    for bad in (b"garbage\r\n\r\n", b"GET /echo HTTP/1.1\r\n folded: x\r\n\r\n",
                b"GET /echo HTTP/1.1\r\nno colon\r\n\r\n", b"GET /echo\r\n\r\n"):
        assert request(port, bad).startswith(b"HTTP/1.1 400 "), bad
    # A request split over several segments, the rest of it after a pause.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /fast HT")
        time.sleep(0.2)
        sock.sendall(b"TP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_app_exception_is_a_500_and_the_server_goes_on(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    _, port = server
    status, _, body = get(port, "/broken")
    assert status == 500 and body == b"500 Internal Server Error"
    assert "RuntimeError: bug" in caplog.text
    assert get(port, "/fast")[0] == 200


def test_slow_clients_get_pool_threads_up_to_max_connections_then_503(server: Server) -> None:
    srv, port = server
    assert srv.max_connections == 8 > srv.accept_workers
    slow = []
    try:
        for _ in range(srv.max_connections):  # each holds a connection: head never finished
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /fast HTTP/1.1\r\n")
            slow.append(sock)
        wait_until(lambda: srv._busy == srv.max_connections)  # all 8 accepted
        refused = request(port, b"GET /fast HTTP/1.1\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused
        # Every slow client was being held on its own thread: each now gets its answer.
        for sock in slow:
            sock.sendall(b"Host: x\r\n\r\n")
        for sock in slow:
            assert read_all(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: get(port, "/fast")[0] == 200)  # slots are given back


def test_request_head_must_arrive_within_the_handler_timeout(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _, port = server
    monkeypatch.setattr(http, "HANDLER_TIMEOUT", 0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        deadline = time.monotonic() + 10
        closed = False
        while not closed:  # a byte every 0.1 s would keep a per-recv timeout happy forever
            assert time.monotonic() < deadline, "trickling client never cut off"
            try:
                trickle.sendall(b"X")
                time.sleep(0.1)
            except OSError:
                closed = True
            else:
                trickle.settimeout(0.001)
                try:
                    closed = trickle.recv(100) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
                trickle.settimeout(10)
        assert get(port, "/fast")[0] == 200
        # A client that connects and never sends is closed too (accepted once the kernel's
        # TCP_DEFER_ACCEPT period is over, then cut off by the head timeout).
        assert silent.recv(100) == b""


def test_a_slow_app_is_kept_off_the_accept_workers(
        server: Server, release: threading.Event) -> None:
    srv, port = server
    for _ in range(http.APP_TIMINGS):  # each call over SLOW_APP: /slow is now a slow path
        assert get(port, "/slow?warm")[0] == 200
    assert srv.slow_path("/slow") and not srv.slow_path("/fast")
    blocked = [socket.create_connection(("127.0.0.1", port), timeout=10)
               for _ in range(srv.accept_workers + 2)]
    try:
        for sock in blocked:
            sock.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        for _ in range(5):  # served while more /slow requests than accept workers wait
            assert get(port, "/fast")[0] == 200
        release.set()
        for sock in blocked:
            assert read_all(sock).endswith(b"\r\n\r\ndone")
    finally:
        for sock in blocked:
            sock.close()


def test_large_response_to_a_slow_reader(server: Server) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        time.sleep(0.3)  # not reading: the response does not fit the socket buffers
        for _ in range(5):
            assert get(port, "/fast")[0] == 200
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == bytes(range(256)) * (16 << 10)


def test_close_stops_every_thread(release: threading.Event) -> None:
    router = Router()
    router.add_json("/fast", lambda: (200, {}))
    before = set(threading.enumerate())
    srv, thread = serve("127.0.0.1", 0, router, max_connections=4)
    port = srv.server_address[1]
    partial = socket.create_connection(("127.0.0.1", port), timeout=10)
    partial.sendall(b"GET /fast HTTP/1.1\r\n")  # keeps a pool thread
    try:
        assert get(port, "/fast")[0] == 200
        wait_until(lambda: any(t.name == "http-pool" for t in threading.enumerate()))
        srv.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).recv(1)
        partial.sendall(b"\r\n")  # the connection in hand is still finished
        assert read_all(partial).startswith(b"HTTP/1.1 200 ")
        srv.server_close()
        wait_until(lambda: set(threading.enumerate()) <= before)
    finally:
        partial.close()
