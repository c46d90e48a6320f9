"""The listener's handler threads are reused across connections and stay bounded; small
probe answers are given by the accepting thread without a handoff, and a client that stalls
mid-request never holds that thread."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable

from supervisor.web.http import Router, serve
from tests.support import poll_until


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "http-worker"]


def test_sequential_requests_reuse_worker_threads() -> None:
    router = Router()
    router.add_json("/v1/status", lambda: (200, {"status": "ok"}))
    server, thread = serve("127.0.0.1", 0, router, max_connections=16)
    port = server.server_address[1]
    try:
        statuses = [_get(port, "/v1/status") for _ in range(200)]
        assert statuses == [200] * 200
        # A thread per connection would have made 200; the pool keeps a handful.
        assert 1 <= len(_workers()) <= 16
        assert _get(port, "/nope") == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert not thread.is_alive()


def test_probe_paths_are_answered_by_the_accepting_thread() -> None:
    seen: list[str] = []

    def handler() -> tuple[int, dict[str, str]]:
        seen.append(threading.current_thread().name)
        return 200, {"status": "ready"}

    router = Router()
    router.add_json("/v1/ready", handler)
    router.add_json("/v1/status", handler)
    server, thread = serve("127.0.0.1", 0, router, max_connections=16,
                           inline_paths=("/v1/ready",))
    port = server.server_address[1]
    try:
        for _ in range(50):
            assert _get(port, "/v1/ready") == 200
        assert set(seen) == {"http"}  # the serving thread itself, no worker handoff
        seen.clear()
        assert _get(port, "/v1/status") == 200  # not inline: a pool worker
        assert set(seen) == {"http-worker"}
        seen.clear()
        assert _get(port, "/v1/ready?verbose=1") == 200  # the path decides, not the query
        assert _get(port, "http://example.test/v1/ready") == 200  # absolute form: the same
        assert seen == ["http", "http"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_stalled_partial_request_does_not_hold_up_probes() -> None:
    router = Router()
    router.add_json("/v1/ready", lambda: (200, {"status": "ready"}))
    server, thread = serve("127.0.0.1", 0, router, max_connections=16,
                           inline_paths=("/v1/ready",))
    port = server.server_address[1]
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        for sock in stalled:  # a head that never ends: reading it would block
            sock.sendall(b"GET /v1/ready HTTP/1.1\r\nHost: x\r\n")
        assert poll_until(lambda: server.pending_count() == 4, 20)  # the server holds them
        started = time.monotonic()
        assert [_get(port, "/v1/ready") for _ in range(20)] == [200] * 20
        assert time.monotonic() - started < 4.0
        # Their heads wait in the acceptor, not in a thread each.
        assert server.pending_count() == 4
        assert _workers() == []
    finally:
        for sock in stalled:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_client_reading_its_answer_slowly_frees_its_slot_at_the_deadline() -> None:
    big = b"x" * (64 * 1024 * 1024)  # far more than the socket buffers hold

    stop = threading.Event()
    trickler = threading.Thread()

    def huge(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", str(len(big)))])
        return [big]

    router = Router()
    router.add_app("/huge", huge)
    router.add_json("/v1/status", lambda: (200, {"status": "ok"}))
    server, thread = serve("127.0.0.1", 0, router, max_connections=1)
    server.response_timeout = 1.0
    port = server.server_address[1]
    reader = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        reader.sendall(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
        reader.recv(1)  # the answer started; from now on it reads 64 KiB every 0.1 s: each
        stop = threading.Event()  # send() progresses (no per-send timeout), 64 MiB take 100 s

        def trickle() -> None:
            while not stop.wait(0.1):
                try:
                    if not reader.recv(65536):
                        return
                except OSError:
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        assert _get(port, "/v1/status") == 503  # the only slot is held ...
        started = time.monotonic()
        while _get(port, "/v1/status") != 200:  # ... until the response deadline frees it
            assert time.monotonic() - started < 8.0, "the slot was never freed"
            time.sleep(0.1)
        assert 0.5 < time.monotonic() - started
    finally:
        stop.set()
        trickler.join(5)
        reader.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_beyond_max_pending_the_oldest_waiting_connection_goes() -> None:
    router = Router()
    router.add_json("/v1/ready", lambda: (200, {"status": "ready"}))
    server, thread = serve("127.0.0.1", 0, router, max_connections=4,
                           inline_paths=("/v1/ready",))
    server.max_pending = 8
    port = server.server_address[1]
    # Partial heads (so TCP_DEFER_ACCEPT hands them over at once), never finished.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for sock in idle:
            sock.sendall(b"GET /v1/ready HTTP/1.1\r\n")
        deadline = time.monotonic() + 20
        closed: list[socket.socket] = []
        while time.monotonic() < deadline and len(closed) < 12:
            for sock in idle:
                if sock not in closed:
                    sock.setblocking(False)
                    try:
                        if sock.recv(1) == b"":
                            closed.append(sock)
                    except BlockingIOError:
                        pass
            time.sleep(0.05)
        assert server.pending_count() <= 8
        assert set(closed) == set(idle[:12])  # the oldest were dropped, the newest wait
        assert _get(port, "/v1/ready") == 200
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(10)
