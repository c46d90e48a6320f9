"""The read-only HTTP listener: a small WSGI router on prometheus_client's ThreadingWSGIServer.

Stock `start_http_server` answers every path with metrics and 200, which would make a health
probe meaningless; here unknown paths get 404 and wrong methods 405. socketserver's defaults
are hardened: listen backlog 5 -> 128, no socket timeout -> HANDLER_TIMEOUT, one unbounded
thread per connection -> at most `max_connections` handled at once (the rest are refused with
503 at once instead of piling up threads), and timeouts are not printed as tracebacks.
Nothing here mutates the daemon: control lives on a Unix socket, never on this port.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from supervisor import listen

log = logging.getLogger(__name__)

HANDLER_TIMEOUT = 5.0
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
JSONHandler = Callable[[], tuple[int, dict[str, Any]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def json_response(start_response: Callable[..., Any], status: int, body: dict[str, Any],
                  extra_headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
               ("Cache-Control", "no-store"), *(extra_headers or [])]
    start_response(f"{status} {_REASONS.get(status, '')}".strip(), headers)
    return [data]


class Router:
    """Exact-path routing, GET and HEAD only."""

    def __init__(self) -> None:
        self._routes: dict[str, WSGIApp] = {}

    def add_app(self, path: str, app: WSGIApp) -> None:
        self._routes[path] = app

    def add_json(self, path: str, handler: JSONHandler) -> None:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            status, body = handler()
            return json_response(start_response, status, body)

        self._routes[path] = app

    def paths(self) -> list[str]:
        return list(self._routes)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        app = self._routes.get(path)
        if app is None:
            return json_response(start_response, 404, {"error": "not found", "path": path[:200]})
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return json_response(start_response, 405, {"error": "method not allowed"},
                                 [("Allow", "GET, HEAD")])
        result = app(environ, start_response)
        if method == "HEAD":
            return [b""]
        return result


class _Handler(WSGIRequestHandler):
    timeout = HANDLER_TIMEOUT  # StreamRequestHandler applies it to the socket
    # wsgiref writes the status line, Date, Server, the other headers and the body with one
    # sendall each; unbuffered, that is five syscalls, each dropping and retaking the GIL.
    # Buffered, a small response leaves in one send (finish() flushes). Measured on the bare
    # server with 20 clients: 1,900 -> 2,900 requests/s.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True  # the buffered response is complete when it is sent

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s", self.address_string(), format % args)


class BoundedWSGIServer(ThreadingWSGIServer):
    """At most `max_connections` connections handled or waiting at once, by reused threads.

    Requests for `inline_paths` (small answers such as /v1/ready) whose whole head has already
    arrived are answered by the accepting thread itself: reading cannot block, the response
    fits in the socket's send buffer, and the app is non-blocking, so no thread handoff is
    needed. Handing a connection to another thread costs each side a wakeup and a GIL
    round-trip, which doubled the CPU per request; answered inline, the bare server went from
    2,900 to about 6,500 probes/s with 20 clients. TCP_DEFER_ACCEPT makes accept() return
    only once the request has arrived, so the inline check usually succeeds; anything else
    (slow or partial clients, /v1/metrics with its megabyte bodies) goes to the pool.

    A connection is handed to an idle worker thread if there is one, else to a new worker, so
    slow clients never hold up others (each has its own thread, as with one thread per
    connection) but a steady load reuses threads instead of creating one per request: starting
    a thread costs the accepting thread a wait for the new thread to take the GIL, which under
    load (scrapes, rendering) took most of its time. Workers above `min_workers` exit after
    `worker_idle_timeout` seconds without a connection; server_close() stops them all.
    """

    request_queue_size = listen.BACKLOG  # server_activate() listens again with it
    daemon_threads = True
    max_connections = 128
    min_workers = 8
    worker_idle_timeout = 30.0
    inline_paths: frozenset[bytes] = frozenset()
    inline_peek_bytes = 2048
    prebound: socket.socket | None = None  # the listening socket to take over (listen.bind)

    def server_bind(self) -> None:
        # What TCPServer, HTTPServer and WSGIServer.server_bind do, minus the bind: serve()
        # always hands over a socket bound by listen.bind.
        assert self.prebound is not None, "use serve()"
        self.socket.close()
        self.socket = self.prebound
        self.server_address = self.socket.getsockname()
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(str(host))
        self.server_port = port
        self.setup_environ()
        if self.inline_paths and hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Seconds the kernel holds a connection that has sent nothing; after that it is
            # accepted anyway and handled by the pool like any slow client.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 2)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle = 0  # workers waiting on the queue that no queued connection is meant for
        self._workers: set[threading.Thread] = set()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        if self._answerable_inline(request):
            self._handle(request, client_address)
            return
        try:
            with self._pool_lock:
                reuse = self._idle > 0
                if reuse:
                    self._idle -= 1
            if reuse:
                self._queue.put((request, client_address))
            else:
                worker = threading.Thread(target=self._work, args=((request, client_address),),
                                          name="http-worker", daemon=True)
                with self._pool_lock:
                    self._workers.add(worker)
                try:
                    worker.start()
                except BaseException:
                    with self._pool_lock:
                        self._workers.discard(worker)
                    raise
        except BaseException:
            self._slots.release()
            raise

    def _handle(self, request: Any, client_address: Any) -> None:
        """Serve one connection, close it and free its slot."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def _answerable_inline(self, request: socket.socket) -> bool:
        """The request's head is all here (so wsgiref's reads cannot block) and asks for an
        inline path. Only the end of the head and the request target are looked at, on a
        peeked copy; wsgiref parses the request itself."""
        if not self.inline_paths:
            return False
        try:
            head = request.recv(self.inline_peek_bytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # nothing arrived yet, or the client already went away
            return False
        if b"\r\n\r\n" not in head:
            return False
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        return len(request_line) == 3 and request_line[1] in self.inline_paths

    def _work(self, item: tuple[Any, Any] | None) -> None:
        me = threading.current_thread()
        while item is not None:
            self._handle(*item)
            with self._pool_lock:
                self._idle += 1
            item = self._next(me)

    def _next(self, me: threading.Thread) -> tuple[Any, Any] | None:
        """The next connection for an idle worker, or None when it should exit."""
        while True:
            try:
                item = self._queue.get(timeout=self.worker_idle_timeout)
            except queue.Empty:
                with self._pool_lock:
                    # Only an idle worker no connection was queued for may leave.
                    if self._idle > 0 and len(self._workers) > self.min_workers:
                        self._idle -= 1
                        self._workers.discard(me)
                        return None
                continue
            if item is None:  # server_close() queues one per worker
                with self._pool_lock:
                    self._workers.discard(me)
                return None
            return item

    def server_close(self) -> None:
        """Close the socket, let the workers finish their connections, and stop them."""
        super().server_close()
        with self._pool_lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)
        deadline = time.monotonic() + 2 * HANDLER_TIMEOUT
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Idle or slow clients hitting HANDLER_TIMEOUT, and clients that hang up, are routine.
        log.debug("http connection error from %s", client_address, exc_info=True)


def serve(host: str, port: int, app: WSGIApp, max_connections: int = 128,
          inline_paths: Iterable[str] = (), sock: socket.socket | None = None
          ) -> tuple[BoundedWSGIServer, threading.Thread]:
    """Bind (raises OSError on failure), or take over `sock`, and serve in a daemon thread.

    `inline_paths` must be answered by `app` quickly, without blocking, and with a small body
    (a few KiB): the accepting thread answers them itself (see BoundedWSGIServer)."""
    if sock is None:
        sock = listen.bind(host, port)
    server_class = type("Server", (BoundedWSGIServer,),
                        {"max_connections": max_connections, "address_family": sock.family,
                         "inline_paths": frozenset(p.encode() for p in inline_paths),
                         "prebound": sock})
    server: BoundedWSGIServer = make_server(host, port, app, server_class, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="http", daemon=True)
    thread.start()
    return server, thread
