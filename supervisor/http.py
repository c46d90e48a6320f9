"""The read-only HTTP listener: a small WSGI router on a small threaded WSGI server.

Stock `prometheus_client.start_http_server` answers every path with metrics and 200, which
would make a health probe meaningless; here unknown paths get 404 and wrong methods 405. The
server (BoundedWSGIServer) replaced socketserver + wsgiref for latency under load: listen
backlog 128, a kernel timeout (HANDLER_TIMEOUT) on every blocking read and write and on the
whole request head, at most `max_connections` connections at once (the rest are refused with
503 at once), two threads doing the common case and a pool for slow clients and slow apps,
and timeouts are not logged as tracebacks. One request per connection (no keep-alive).
Nothing here mutates the daemon: control lives on a Unix socket, never on this port.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

log = logging.getLogger(__name__)

HANDLER_TIMEOUT = 5.0
SLOW_APP = 0.005  # seconds; see BoundedWSGIServer.slow_path
APP_TIMINGS = 4
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


class _BadRequest(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class _Closed(Exception):
    """The client closed the connection before sending a request."""


_HEAD_LIMIT = 65536
_date_cache: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    global _date_cache
    now = int(time.time())
    second, header = _date_cache
    if second != now:
        header = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        _date_cache = (now, header)
    return header


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def _split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(request line and headers, what follows the blank line), or None if incomplete."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return data[:crlf], data[crlf + 4:]
    if lf >= 0:
        return data[:lf], data[lf + 2:]
    if len(data) >= _HEAD_LIMIT:
        raise _BadRequest("431 Request Header Fields Too Large")
    return None


def _environ(head: bytes, base: dict[str, Any], client_address: Any) -> dict[str, Any]:
    """PEP 3333 environ for one request head (raises _BadRequest)."""
    lines = head.decode("iso-8859-1").split("\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest("400 Bad Request")
    method, target, version = parts
    path, _, query = target.partition("?")
    env = base.copy()
    env["REQUEST_METHOD"] = method
    env["PATH_INFO"] = unquote(path, "iso-8859-1")
    env["QUERY_STRING"] = query
    env["SERVER_PROTOCOL"] = version
    env["REMOTE_ADDR"] = client_address[0] if isinstance(client_address, tuple) else ""
    for line in lines[1:]:
        line = line.rstrip("\r")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():  # no folding, no space before ':'
            raise _BadRequest("400 Bad Request")
        key = name.upper().replace("-", "_")
        value = value.strip()
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        env[key] = f"{env[key]},{value}" if key in env else value
    return env


def _plain(status: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: "
            f"{len(status)}\r\nConnection: close\r\n\r\n{status}").encode()


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
            b"Connection: close\r\nRetry-After: 1\r\n\r\n")


class _Exchange:
    """One connection: read the request head, run the app, send the response, close.

    Resumable: `step(block=False)` never blocks and returns False at the first read or send
    that would, leaving the rest to `step(block=True)` on another thread. The response head
    goes out with the first body block, in one sendmsg; the connection closes after the body.
    """

    def __init__(self, conn: socket.socket, client_address: Any) -> None:
        self.conn = conn
        self.client_address = client_address
        self.data = b""
        self.deadline = time.monotonic() + HANDLER_TIMEOUT  # for the whole request head
        self.environ: dict[str, Any] | None = None  # once the head is parsed
        self.responding = False  # once the app has been called (or an error queued)
        self.method = "GET"
        self.path = ""
        self.result: Iterable[bytes] | None = None
        self.chunks: Iterator[bytes] | None = None
        self.single = False
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_queued = False
        self.out: list[bytes | memoryview] = []

    def step(self, server: BoundedWSGIServer, block: bool) -> bool:
        """Advance; True once finished (or failed), False if it would block."""
        try:
            if self.environ is None and not self.responding:
                try:
                    got = self._read(block)
                    if got is None:
                        return False
                    self.environ = _environ(got[0], server.base_environ, self.client_address)
                except _BadRequest as exc:
                    self.responding = self.head_queued = True
                    self.out = [_plain(exc.status)]
                else:
                    self.environ["wsgi.input"] = io.BytesIO(got[1])
                    self.method = self.environ["REQUEST_METHOD"]
                    self.path = self.environ["PATH_INFO"]
            if not self.responding:
                if not block and server.slow_path(self.path):
                    return False  # let a pool thread wait on it, not an accept worker
                self._call_app(server)
            return self._write(block)
        except _Closed:
            return True
        except OSError:  # includes timeouts
            server.handle_error(self.conn, self.client_address)
            return True
        except Exception:
            log.exception("http %s %s failed", self.method, self.path)
            return True

    def close(self) -> None:
        """Close the app's iterable (PEP 3333; the request metrics are recorded there) and the
        connection."""
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        except Exception:
            log.exception("http %s %s: closing the response failed", self.method, self.path)
        finally:
            self.conn.close()

    # -- request -----------------------------------------------------------------------
    def _read(self, block: bool) -> tuple[bytes, bytes] | None:
        while True:
            got = _split_head(self.data)
            if got is not None:
                return got
            if block:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("request head not received in time")
                self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
                try:
                    chunk = self.conn.recv(_HEAD_LIMIT)
                except BlockingIOError:  # SO_RCVTIMEO expired
                    raise TimeoutError("request head not received in time") from None
            else:
                try:
                    chunk = self.conn.recv(_HEAD_LIMIT, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return None
            if not chunk:
                if self.data.strip():
                    raise _BadRequest("400 Bad Request")
                raise _Closed
            self.data += chunk

    def _call_app(self, server: BoundedWSGIServer) -> None:
        self.responding = True
        environ = self.environ
        assert environ is not None
        began = time.perf_counter()
        try:
            self.result = server.app(environ, self._start_response)
            try:
                self.single = len(self.result) == 1  # type: ignore[arg-type]
            except TypeError:
                pass
            self.chunks = iter(self.result)
        except Exception:
            self._app_failed()
        server.app_timed(self.path, time.perf_counter() - began)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s %s %s", environ["REMOTE_ADDR"], self.method, self.path,
                      self.status)

    def _app_failed(self) -> None:
        log.exception("http %s %s failed", self.method, self.path)
        self.chunks = None
        if not self.head_queued:
            self.head_queued = True
            self.out = [_plain("500 Internal Server Error")]

    def _start_response(self, status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_queued:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        self.status, self.headers = status, list(headers)
        return self._legacy_write

    def _legacy_write(self, data: bytes) -> None:
        """PEP 3333's write(): queued, sent with the body."""
        self._queue(data, None)

    # -- response ----------------------------------------------------------------------
    def _head(self, length: int | None) -> bytes:
        if self.status is None:
            raise AssertionError("the application returned without calling start_response")
        lines = [f"HTTP/1.1 {self.status}\r\n"]
        has_length = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "connection":
                continue
            has_length = has_length or lower == "content-length"
            lines.append(f"{name}: {value}\r\n")
        if not has_length and length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        return "".join(lines).encode("iso-8859-1") + _date_header() + b"Connection: close\r\n\r\n"

    def _queue(self, data: bytes, length: int | None) -> None:
        if not self.head_queued:
            self.out.append(self._head(length))
            self.head_queued = True
        if data:
            self.out.append(data)

    def _write(self, block: bool) -> bool:
        while True:
            if self.out:
                if not self._flush(block):
                    return False
                continue
            if self.chunks is None:
                return True
            try:
                data = next(self.chunks)
            except StopIteration:
                self.chunks = None
                if not self.head_queued:  # an empty body
                    self._queue(b"", None if self.method == "HEAD" else 0)
                continue
            except Exception:
                if self.head_queued:
                    raise  # a truncated body: only closing the connection can tell the client
                self._app_failed()
                continue
            if data or self.head_queued:
                self._queue(data, len(data) if self.single else None)

    def _flush(self, block: bool) -> bool:
        while self.out:
            try:
                sent = self.conn.sendmsg(self.out, (), 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                if block:  # SO_SNDTIMEO expired
                    raise TimeoutError("client not reading the response") from None
                return False
            while sent:
                first = self.out[0]
                if sent >= len(first):
                    sent -= len(first)
                    del self.out[0]
                else:
                    self.out[0] = memoryview(first)[sent:]
                    sent = 0
        return True


class BoundedWSGIServer(socketserver.TCPServer):
    """A WSGI server: one request per connection, at most `max_connections` connections at
    once (the next is answered 503 at once), no thread per connection.

    Every system call releases the GIL, and under the daemon's load getting it back is the
    cost of a request: with a thread per connection, 20 clients meant 20 threads queueing for
    it at every recv, send and close, and the server spent twice the CPU per request it spends
    with two threads. So `accept_workers` (2) threads accept, read, run the app and write,
    never blocking on a client: the request must already be there (TCP_DEFER_ACCEPT wakes
    accept() once data has arrived) and the response must fit the socket buffer. Everything
    else goes to a pool thread that finishes it with blocking calls and kernel timeouts: a
    slow or partial request, a client slow to read a large response, and requests for a path
    whose app is slow (see slow_path: /v1/metrics, so that concurrent scrapes wait on one
    render together rather than queue behind the accept workers). Pool threads start as
    needed and leave after `pool_idle_timeout` seconds idle.
    """

    request_queue_size = 128
    allow_reuse_address = True
    max_connections = 128
    accept_workers = 2
    pool_idle_timeout = 30.0

    def __init__(self, server_address: tuple[str, int], app: WSGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._busy = 0  # connections accepted and not yet closed
        self._idle = 0  # pool threads waiting for work no queued connection is meant for
        self._pool: queue.SimpleQueue[_Exchange | None] = queue.SimpleQueue()
        self._pool_size = 0
        self._stopping = False
        self._stopped = threading.Event()
        # path -> the app's last APP_TIMINGS durations (tuples are swapped whole: no lock)
        self._app_timings: dict[str, tuple[float, ...]] = {}
        super().__init__(server_address, socketserver.BaseRequestHandler)
        host, port = self.server_address[:2]
        self.base_environ: dict[str, Any] = {
            "SERVER_NAME": str(host), "SERVER_PORT": str(port),
            "SCRIPT_NAME": "", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False}

    def server_bind(self) -> None:
        super().server_bind()
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # A connection is accepted once its request has arrived (or after about a second
            # without, and then read by a pool thread), so a client that connects and says
            # nothing costs no thread for that second.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)

    # -- lifecycle (the socketserver API the daemon uses) ----------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Start the accept workers and wait for shutdown(); nothing here polls."""
        with self._lock:
            for _ in range(self.accept_workers if not self._stopping else 0):
                self._start_thread(self._accept_loop, "http-worker")
        self._stopped.wait()

    def shutdown(self) -> None:
        """Stop accepting. Shutting a listening socket down makes every blocked accept() fail
        (Linux), so the accept workers leave at once, after the connection they are serving."""
        with self._lock:
            self._stopping = True
            pool = self._pool_size
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for _ in range(pool):
            self._pool.put(None)
        self._stopped.set()

    def server_close(self) -> None:
        """Close the listening socket once the threads have finished (bounded wait)."""
        self.shutdown()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + 2 * HANDLER_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        super().server_close()

    def slow_path(self, path: str) -> bool:
        """Whether requests for `path` go straight to the pool: its app took over
        SLOW_APP seconds in each of the last APP_TIMINGS calls (the minimum, so that a GIL
        wait inflating one call of a fast app does not count). An accept worker must not
        wait on such an app, and requests waiting concurrently can share its work (one
        /v1/metrics render for all the scrapes arriving during it)."""
        timings = self._app_timings.get(path)
        return timings is not None and len(timings) == APP_TIMINGS and min(timings) > SLOW_APP

    def app_timed(self, path: str, seconds: float) -> None:
        timings = self._app_timings.get(path)
        if timings is None and len(self._app_timings) >= 32:
            return  # unknown paths (404) are not worth tracking
        self._app_timings[path] = (timings or ())[1 - APP_TIMINGS:] + (seconds,)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Idle or slow clients hitting HANDLER_TIMEOUT, and clients that hang up, are routine.
        log.debug("http connection error from %s", client_address, exc_info=True)

    # -- threads ---------------------------------------------------------------------------
    def _start_thread(self, target: Callable[[], None], name: str) -> bool:
        """With self._lock held."""
        thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # can't start new thread: serve with the threads there are
            self._threads.discard(thread)
            log.warning("http: cannot start another thread", exc_info=True)
            return False
        return True

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        listener = self.socket
        while True:
            try:
                conn, client_address = listener.accept()
            except OSError:
                if self._stopping:
                    return
                log.warning("http accept failed", exc_info=True)  # EMFILE and the like
                time.sleep(0.1)
                continue
            with self._lock:
                self._busy += 1
                refuse = self._busy > self.max_connections
            if refuse:
                try:
                    conn.recv(_HEAD_LIMIT, socket.MSG_DONTWAIT)  # so close() sends no reset
                except OSError:
                    pass
                try:
                    conn.send(_REFUSED, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                self._done(_Exchange(conn, client_address))
                continue
            exchange = _Exchange(conn, client_address)
            if exchange.step(self, block=False):
                self._done(exchange)
            else:
                self._hand_off(exchange)

    def _hand_off(self, exchange: _Exchange) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                queued = True
            elif self._stopping:
                queued = False
            else:
                queued = self._start_thread(self._pool_loop, "http-pool")
                self._pool_size += queued
        if queued:
            self._pool.put(exchange)
        else:  # shutting down, or no thread to be had: finish it here
            self._finish_blocking(exchange)

    def _pool_loop(self) -> None:
        while True:
            try:
                exchange = self._pool.get(timeout=self.pool_idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no connection is queued for this thread: leave
                        self._idle -= 1
                        self._pool_size -= 1
                        return
                continue
            if exchange is None:
                return
            self._finish_blocking(exchange)
            with self._lock:
                self._idle += 1

    def _finish_blocking(self, exchange: _Exchange) -> None:
        timeout = _timeval(HANDLER_TIMEOUT)
        try:
            exchange.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            exchange.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        except OSError:
            pass
        exchange.step(self, block=True)
        self._done(exchange)

    def _done(self, exchange: _Exchange) -> None:
        try:
            exchange.close()
        finally:
            with self._lock:
                self._busy -= 1


def serve(host: str, port: int, app: WSGIApp, max_connections: int = 128
          ) -> tuple[BoundedWSGIServer, threading.Thread]:
    """Bind (raises OSError on failure) and serve in a daemon thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (BoundedWSGIServer,),
                        {"max_connections": max_connections, "address_family": family})
    server = server_class((host, port), app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="http", daemon=True)
    thread.start()
    return server, thread
