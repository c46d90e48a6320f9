"""The read-only HTTP listener: a small WSGI router on prometheus_client's ThreadingWSGIServer.

Stock `start_http_server` answers every path with metrics and 200, which would make a health
probe meaningless; here unknown paths get 404 and wrong methods 405. socketserver's defaults
are hardened: listen backlog 5 -> 128, no socket timeout -> HANDLER_TIMEOUT, one unbounded
thread per connection -> at most `max_connections` handled at once (the rest are refused with
503 at once instead of piling up threads), and timeouts are not printed as tracebacks.
Nothing here mutates the daemon: control lives on a Unix socket, never on this port.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

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


class _BadRequest(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


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


def _read_head(sock: socket.socket, timeout: float) -> tuple[bytes, bytes] | None:
    """The request line and headers (up to the blank line), and what followed; None if the
    client closed first. Usually one recv: a GET fits one segment. The whole head must arrive
    within `timeout` (raises TimeoutError), so a client trickling bytes cannot keep a thread.
    The socket is blocking with kernel timeouts (SO_RCVTIMEO), so a recv is one system call
    and one GIL release, where a Python socket timeout adds a poll() and a second release."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        if data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
        try:
            chunk = sock.recv(_HEAD_LIMIT)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("request head not received in time") from None
        if not chunk:
            if data.strip():
                raise _BadRequest("400 Bad Request")
            return None
        data += chunk
        crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return data[:crlf], data[crlf + 4:]
        if lf >= 0:
            return data[:lf], data[lf + 2:]
        if len(data) >= _HEAD_LIMIT:
            raise _BadRequest("431 Request Header Fields Too Large")


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
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():  # no folding, no space before ':'
            raise _BadRequest("400 Bad Request")
        key = name.upper().replace("-", "_")
        value = value.strip()
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        env[key] = f"{env[key]},{value}" if key in env else value
    return env


class _Response:
    """start_response and sending for one connection: the head goes out with the first
    non-empty body block, in one send, and the connection is closed after the body."""

    def __init__(self, sock: socket.socket, method: str) -> None:
        self.sock = sock
        self.method = method
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        self.status, self.headers = status, list(headers)
        return self.write

    def head(self, length: int | None) -> bytes:
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

    def write(self, data: bytes, length: int | None = None) -> None:
        if self.sent:
            if data:
                self.sock.sendall(data)
            return
        head = self.head(length)
        self.sent = True
        sent = self.sock.sendmsg([head, data])  # one system call, no copy of the body
        if sent < len(head):
            self.sock.sendall(head[sent:])
            self.sock.sendall(data)
        elif sent < len(head) + len(data):
            self.sock.sendall(memoryview(data)[sent - len(head):])

    def run(self, app: WSGIApp, environ: dict[str, Any]) -> None:
        result = app(environ, self.start_response)
        try:
            try:
                single = len(result) == 1  # type: ignore[arg-type]
            except TypeError:
                single = False
            for data in result:
                if data or self.sent:
                    self.write(data, len(data) if single else None)
            if not self.sent:
                self.write(b"", None if self.method == "HEAD" else 0)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


def _plain(status: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: "
            f"{len(status)}\r\nConnection: close\r\n\r\n{status}").encode()


class BoundedWSGIServer(socketserver.TCPServer):
    """A WSGI server: one request per connection, at most `max_connections` at once, each
    served start to end by one thread; the rest are answered 503 at once.

    Worker threads accept connections themselves (leader/follower): each idle worker blocks
    in accept() on the listening socket and the kernel wakes exactly one per connection, which
    then reads the request, runs the app, writes and closes. No accept thread and no hand-off
    queue: every GIL round trip per request matters when the daemon's scrapes and rendering
    hold the GIL, and a thread waiting for it may wait a whole switch interval. The worker
    that accepts the last idle slot starts another, so a slow client never holds up the
    others (up to `max_connections`); one extra thread beyond that only answers 503. Surplus
    workers leave when `spare_workers` others are idle and none was added for
    `retire_after` seconds.
    """

    request_queue_size = 128
    allow_reuse_address = True
    max_connections = 128
    spare_workers = 8
    retire_after = 30.0

    def __init__(self, server_address: tuple[str, int], app: WSGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._workers: set[threading.Thread] = set()
        self._idle = 0  # workers in accept()
        self._busy = 0  # connections accepted and not yet closed
        self._grown_at = 0.0
        self._stopping = False
        self._stopped = threading.Event()
        self._timeout = _timeval(HANDLER_TIMEOUT)
        super().__init__(server_address, socketserver.BaseRequestHandler)
        host, port = self.server_address[:2]
        self.base_environ: dict[str, Any] = {
            "SERVER_NAME": str(host), "SERVER_PORT": str(port),
            "SCRIPT_NAME": "", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False}

    # -- lifecycle (the socketserver API the daemon uses) ----------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Start the first worker and wait for shutdown(); nothing here polls."""
        with self._lock:
            if not self._stopping:
                self._start_worker()
        self._stopped.wait()

    def shutdown(self) -> None:
        """Stop accepting. Shutting a listening socket down makes every blocked accept() fail
        (Linux), so idle workers leave at once; busy ones finish their connection first."""
        with self._lock:
            self._stopping = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._stopped.set()

    def server_close(self) -> None:
        """Close the listening socket once the workers have finished (bounded wait)."""
        self.shutdown()
        with self._lock:
            workers = list(self._workers)
        deadline = time.monotonic() + 2 * HANDLER_TIMEOUT
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Idle or slow clients hitting HANDLER_TIMEOUT, and clients that hang up, are routine.
        log.debug("http connection error from %s", client_address, exc_info=True)

    # -- workers ---------------------------------------------------------------------------
    def _start_worker(self) -> None:
        """With self._lock held."""
        worker = threading.Thread(target=self._work, name="http-worker", daemon=True)
        self._workers.add(worker)
        self._grown_at = time.monotonic()
        try:
            worker.start()
        except RuntimeError:  # can't start new thread: serve with the workers there are
            self._workers.discard(worker)
            log.warning("http: cannot start another worker thread", exc_info=True)

    def _work(self) -> None:
        listener = self.socket
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._idle += 1
                try:
                    conn, client_address = listener.accept()
                except OSError:
                    with self._lock:
                        self._idle -= 1
                        if self._stopping:
                            return
                    log.warning("http accept failed", exc_info=True)  # EMFILE and the like
                    time.sleep(0.1)
                    continue
                with self._lock:
                    self._idle -= 1
                    self._busy += 1
                    refuse = self._busy > self.max_connections
                    if not refuse and self._idle == 0 and not self._stopping:
                        self._start_worker()  # keep one thread in accept()
                try:
                    if refuse:
                        _refuse(conn)
                    else:
                        self._serve_connection(conn, client_address)
                except Exception:
                    self.handle_error(conn, client_address)
                finally:
                    conn.close()
                    with self._lock:
                        self._busy -= 1
                        surplus = (self._idle >= self.spare_workers
                                   and time.monotonic() - self._grown_at > self.retire_after)
                if surplus:
                    return
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _serve_connection(self, conn: socket.socket, client_address: Any) -> None:
        """Serve the one request on this connection (no keep-alive)."""
        # Kernel timeouts on a blocking socket: slow or idle clients give up the thread.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeout)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeout)
        try:
            got = _read_head(conn, HANDLER_TIMEOUT)
            if got is None:
                return
            head, rest = got
            environ = _environ(head, self.base_environ, client_address)
        except _BadRequest as exc:
            conn.sendall(_plain(exc.status))
            return
        environ["wsgi.input"] = io.BytesIO(rest)
        response = _Response(conn, environ["REQUEST_METHOD"])
        try:
            response.run(self.app, environ)
        except OSError:
            raise  # the client went away or timed out: handle_error
        except Exception:
            log.exception("http %s %s failed", environ["REQUEST_METHOD"], environ["PATH_INFO"])
            if not response.sent:
                conn.sendall(_plain("500 Internal Server Error"))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s %s %s", environ.get("REMOTE_ADDR"), environ["REQUEST_METHOD"],
                      environ["PATH_INFO"], response.status)


def _refuse(conn: socket.socket) -> None:
    try:
        # Read what already arrived, so closing with unread data does not reset the connection
        # before the client has read the 503.
        conn.recv(_HEAD_LIMIT, socket.MSG_DONTWAIT)
    except OSError:
        pass
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(1.0))
    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\nRetry-After: 1\r\n\r\n")


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
