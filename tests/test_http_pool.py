"""The listener's handler threads are reused across connections and stay bounded."""

from __future__ import annotations

import http.client
import threading

from supervisor.http import Router, serve


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
    router.add_json("/v1/ready", lambda: (200, {"status": "ready"}))
    server, thread = serve("127.0.0.1", 0, router, max_connections=16)
    port = server.server_address[1]
    try:
        statuses = [_get(port, "/v1/ready") for _ in range(200)]
        assert statuses == [200] * 200
        # A thread per connection would have made 200; the pool keeps a handful.
        assert 1 <= len(_workers()) <= 16
        assert _get(port, "/nope") == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert not thread.is_alive()
