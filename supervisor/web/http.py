"""The read-only HTTP listener: a small WSGI router on prometheus_client's ThreadingWSGIServer.

Stock `start_http_server` answers every path with metrics and 200, which would make a health
probe meaningless; here unknown paths get 404 and wrong methods 405. socketserver's defaults
are hardened: listen backlog 5 -> 128; one unbounded thread per connection, each blocked
reading its request -> one acceptor thread that collects request heads from non-blocking
sockets, then at most `max_connections` requests handled at once by reused threads (the rest
are refused with 503 at once instead of piling up threads); timeouts are not printed as
tracebacks. Nothing here mutates the daemon: control lives on a Unix socket, never on this port.

Slow clients. A socket timeout is per `recv`: a client sending a byte a second never trips it,
so a thread per connection that reads its own head can be held forever by anyone who can open
a TCP connection (slowloris). Here the acceptor holds no thread per connection: it reads every
connection's head (and does its TLS handshake) as bytes arrive, under one total deadline
(`HEAD_TIMEOUT`, then 408 and close); at most `max_pending` connections wait for their head,
and beyond that the oldest is dropped, so a new client (a probe sends its whole head at once)
always gets its turn. Only a connection whose whole head has arrived reaches wsgiref, through
a buffered rfile that never blocks; its answer has a total deadline too (`RESPONSE_TIMEOUT`),
so a client reading a byte a second cannot hold a worker either.

TLS (web_config_file, see webauth.py): prometheus_client's own TLS support wraps the listening
socket, so each handshake runs inside accept() on the accepting thread, where one client that
sends half a ClientHello stalls every other; here each accepted socket is wrapped with the
same kind of ssl.SSLContext, and its handshake is driven by the acceptor, non-blocking, under
the head deadline.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.exposition import ThreadingWSGIServer

from supervisor.process import fdlimit
from supervisor.web import listen
from supervisor.web.heads import Head, head_state, request_path, simple_response, skip_empty_lines
from supervisor.web.httpconn import HANDLER_TIMEOUT, Accepted, Handler

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 5.0  # seconds from accept to a complete request head, TLS handshake included
RESPONSE_TIMEOUT = 30.0  # seconds to send a whole response (1 MiB at 35 KiB/s)
MAX_PENDING = 1024  # connections waiting for their head; the oldest goes beyond that
RECV_BYTES = 16 * 1024  # per read of a head: a head over MAX_HEAD_BYTES is refused at once
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
JSONHandler = Callable[[], tuple[int, dict[str, Any]]]

_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


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


class Gate(Protocol):
    """TLS and authentication for the listener (webauth.WebGate), read per connection so a
    reload applies to the next one."""

    def tls_context(self) -> ssl.SSLContext | None: ...
    def peer_allowed(self, sock: ssl.SSLSocket) -> bool: ...
    def inline_ok(self, head: bytes) -> bool: ...


@dataclass(eq=False)
class _Pending:
    """A connection whose head is still arriving."""

    sock: socket.socket
    address: Any
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    searched: int = 0
    handshaking: bool = False
    events: int = 0  # what the selector watches for; 0: not registered


class BoundedWSGIServer(ThreadingWSGIServer):
    """Heads collected by one acceptor thread; at most `max_connections` requests handled or
    waiting at once, by reused threads.

    Requests for `inline_paths` (small answers such as /v1/ready) are answered by the acceptor
    itself once their head is in: reading cannot block, the response fits in the socket's
    send buffer, and the app is non-blocking, so no thread handoff is needed. Handing a
    connection to another thread costs each side a wakeup and a GIL round-trip, which doubled
    the CPU per request; answered inline, the bare server went from 2,900 to about 6,500
    probes/s with 20 clients. TCP_DEFER_ACCEPT makes accept() return only once the request
    has arrived, so the head is usually read by the first recv. Probes are answered this way
    whatever other clients do: no pool slot, no worker.

    Other requests (/v1/metrics with its megabyte bodies) go to an idle worker thread if there
    is one, else to a new worker: a steady load reuses threads instead of creating one per
    request (starting a thread costs the acceptor a wait for the new thread to take the GIL).
    Workers above `min_workers` exit after `worker_idle_timeout` seconds without a
    connection; server_close() stops them all.
    """

    request_queue_size = listen.BACKLOG  # server_activate() listens again with it
    daemon_threads = True
    min_workers = 8
    worker_idle_timeout = 30.0
    response_timeout = RESPONSE_TIMEOUT

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
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Seconds the kernel holds a connection that has sent nothing; after that it is
            # accepted anyway and waits in the acceptor like any slow client.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 2)

    def __init__(self, server_address: Any, handler_class: Any, bind_and_activate: bool = True,
                 *, sock: socket.socket | None = None, max_connections: int = 128,
                 inline_paths: Iterable[str] = (), gate: Gate | None = None,
                 head_timeout: float = HEAD_TIMEOUT, max_pending: int = MAX_PENDING) -> None:
        self.prebound = sock  # the listening socket to take over (listen.bind)
        if sock is not None:
            self.address_family = sock.family
        self.max_connections = max_connections
        self.inline_paths = frozenset(inline_paths)
        self.gate = gate
        self.head_timeout = head_timeout
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle = 0  # workers waiting on the queue that no queued connection is meant for
        self._workers: set[threading.Thread] = set()
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first = earliest deadline
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._stopped = threading.Event()
        self._stopped.set()
        super().__init__(server_address, handler_class, bind_and_activate)

    # -- the acceptor ---------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        self.socket.setblocking(False)
        self._wake_r.setblocking(False)
        sel = self._selector
        sel.register(self.socket, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        paused_until = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if paused_until and now >= paused_until:
                    paused_until = 0.0
                    sel.register(self.socket, selectors.EVENT_READ, "listen")
                timeout = poll_interval
                if self._pending:
                    oldest = next(iter(self._pending.values()))
                    timeout = min(timeout, max(0.0, oldest.deadline - now))
                if paused_until:
                    timeout = min(timeout, max(0.0, paused_until - now))
                for key, _mask in sel.select(timeout):
                    try:
                        if key.data == "listen":
                            if not self._accept_some():
                                sel.unregister(self.socket)  # out of fds: retry in a moment
                                paused_until = time.monotonic() + 0.05
                        elif key.data == "wake":
                            self._drain_wake()
                        elif key.fileobj in self._pending:
                            self._advance(key.data)
                    except Exception:  # a bug must cost one connection, never the listener
                        log.exception("http: acceptor error")
                        if isinstance(key.data, _Pending):
                            self._drop(key.data)
                self._expire(time.monotonic())
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)
            for fileobj in (self.socket, self._wake_r):
                try:
                    sel.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever() and wait for it (socketserver's contract)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _accept_some(self) -> bool:
        """Accept what is waiting (bounded); False when out of file descriptors."""
        for _ in range(64):
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # make room, else pause
                    if self._pending:
                        self._drop(next(iter(self._pending.values())))
                        continue
                    log.warning("http: out of file descriptors; accepting paused")
                    return False
                return True  # ECONNABORTED and friends: the client already left
            if len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending.values())))
            self._start(sock, address)
        return True

    def _start(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        pending = _Pending(sock, address, time.monotonic() + self.head_timeout)
        context = self.gate.tls_context() if self.gate is not None else None
        if context is not None:
            try:
                pending.sock = context.wrap_socket(sock, server_side=True,
                                                   do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                return
            pending.handshaking = True
        self._pending[pending.sock] = pending
        # With TCP_DEFER_ACCEPT the request is usually here already: read it before asking
        # the selector to watch the socket (two epoll_ctl calls saved per request).
        self._advance(pending)

    def _advance(self, p: _Pending) -> None:
        try:
            if p.handshaking and not self._handshake(p):
                return
            for _ in range(16):
                try:
                    data = p.sock.recv(RECV_BYTES)
                except (BlockingIOError, ssl.SSLWantReadError):
                    self._want(p, selectors.EVENT_READ)
                    return
                except ssl.SSLWantWriteError:
                    self._want(p, selectors.EVENT_WRITE)
                    return
                if not data:  # the client is done sending: a partial head is a bad request
                    if p.buf.strip():
                        self._reject(p, 400)
                    else:
                        self._drop(p)
                    return
                p.buf += data
                if not p.searched:
                    skip_empty_lines(p.buf)
                state, length = head_state(p.buf, p.searched)
                p.searched = len(p.buf)
                if state is Head.COMPLETE:
                    self._dispatch(p, length)
                    return
                if state is Head.BAD:
                    self._reject(p, 400)
                    return
                if state is Head.TOO_LARGE:
                    self._reject(p, 431)
                    return
                if not (isinstance(p.sock, ssl.SSLSocket) and p.sock.pending()):
                    if len(data) < RECV_BYTES:
                        break
            self._want(p, selectors.EVENT_READ)
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            self._drop(p)

    def _handshake(self, p: _Pending) -> bool:
        assert isinstance(p.sock, ssl.SSLSocket)
        try:
            p.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(p, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._want(p, selectors.EVENT_WRITE)
            return False
        p.handshaking = False
        if self.gate is not None and not self.gate.peer_allowed(p.sock):
            self._drop(p)
            return False
        self._want(p, selectors.EVENT_READ)
        return True

    def _want(self, p: _Pending, events: int) -> None:
        if not p.events:
            self._selector.register(p.sock, events, p)
        elif p.events != events:
            self._selector.modify(p.sock, events, p)
        p.events = events

    def _expire(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            if oldest.handshaking:
                self._drop(oldest)
            else:
                self._reject(oldest, 408)

    def _forget(self, p: _Pending) -> None:
        if self._pending.pop(p.sock, None) is not None and p.events:
            p.events = 0
            try:
                self._selector.unregister(p.sock)
            except (KeyError, ValueError):
                pass

    def _drop(self, p: _Pending) -> None:
        self._forget(p)
        try:
            p.sock.close()
        except OSError:
            pass

    def _reject(self, p: _Pending, status: int, extra: bytes = b"") -> None:
        """Answer at once, without a handler, as far as the send buffer takes it, and close."""
        self._forget(p)
        try:
            p.sock.send(simple_response(status, extra))
        except (OSError, ValueError):
            pass
        self.shutdown_request(p.sock)

    def _dispatch(self, p: _Pending, length: int) -> None:
        self._forget(p)
        head = bytes(p.buf)
        if (request_path(head[:length]) in self.inline_paths
                and (self.gate is None or self.gate.inline_ok(head[:length]))):
            self._handle(Accepted(p.sock, head, None), p.address, slot=False)
            return
        if not self._slots.acquire(blocking=False):
            self._reject(p, 503, b"Retry-After: 1\r\n")
            return
        accepted = Accepted(p.sock, head, HANDLER_TIMEOUT,
                             time.monotonic() + self.response_timeout)
        try:
            self._to_worker((accepted, p.address))
        except Exception:  # no thread could be started: refuse this one, keep serving
            log.exception("http: cannot hand a request to a worker")
            self._slots.release()
            self._reject(p, 503, b"Retry-After: 1\r\n")

    # -- the pool -------------------------------------------------------------------------
    def _to_worker(self, item: tuple[Any, Any]) -> None:
        with self._pool_lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        if reuse:
            self._queue.put(item)
            return
        worker = threading.Thread(target=self._work, args=(item,), name="http-worker",
                                  daemon=True)
        with self._pool_lock:
            self._workers.add(worker)
        try:
            worker.start()
        except BaseException:
            with self._pool_lock:
                self._workers.discard(worker)
            raise

    def _handle(self, request: Accepted, client_address: Any, slot: bool = True) -> None:
        """Serve one connection, close it and free its slot."""
        try:
            # _Handler.setup() takes the _Accepted apart.
            self.finish_request(request, client_address)  # type: ignore[arg-type]
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request.sock)
            if slot:
                self._slots.release()

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
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._pool_lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)
        deadline = time.monotonic() + 2 * HANDLER_TIMEOUT
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def pending_count(self) -> int:
        """Connections whose head is still arriving (for tests and status)."""
        return len(self._pending)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or hang up, and TLS alerts, are routine.
        log.debug("http connection error from %s", client_address, exc_info=True)


def serve(host: str, port: int, app: WSGIApp, max_connections: int = 128,
          inline_paths: Iterable[str] = (), sock: socket.socket | None = None,
          gate: Gate | None = None, head_timeout: float = HEAD_TIMEOUT,
          ) -> tuple[BoundedWSGIServer, threading.Thread]:
    """Bind (raises OSError on failure), or take over `sock`, and serve in a daemon thread.

    `inline_paths` must be answered by `app` quickly, without blocking, and with a small body
    (a few KiB): the acceptor answers them itself (see BoundedWSGIServer)."""
    if sock is None:
        sock = listen.bind(host, port)
    # At least the port's share of descriptors (`supervisor run` raised the limit for its
    # services already; an in-process daemon gets this much).
    soft, _hard = fdlimit.raise_soft_limit(fdlimit.BASE)
    # Half the descriptors for waiting heads, the rest for requests being served, services'
    # pipes, checks and scrapes.
    max_pending = MAX_PENDING if soft == resource.RLIM_INFINITY else max(
        16, min(MAX_PENDING, (soft - max_connections) // 2))
    # What wsgiref's make_server does, with this call's settings as arguments.
    server = BoundedWSGIServer((host, port), Handler, sock=sock,
                               max_connections=max_connections, inline_paths=inline_paths,
                               gate=gate, head_timeout=head_timeout, max_pending=max_pending)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="http", daemon=True)
    thread.start()
    return server, thread
