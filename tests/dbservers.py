"""Throwaway PostgreSQL and Redis servers, and a black-hole listener, for fault tests.

Each server runs in its own session (process group) on a free loopback port and is killed by
its pid/pgid, never by name, so the machine's own PostgreSQL and Redis are never touched.
Test modules import the fixtures they need (`from dbservers import pg_server`); they are
module-scoped so each server starts once per module: initdb takes a couple of seconds.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_OS_USER = "postgres"  # initdb and postgres refuse to run as root
CANARY = "canary-Pw-7c1e9b"  # the checker role's password; must never surface anywhere
START_TIMEOUT = 20.0




def _wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll a cheap predicate with a hard deadline (sync: used from fixtures and threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class PostgresServer:
    """A private cluster: `postgres` trusted on TCP, `checker` needs a scram password."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sv-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        account = pwd.getpwnam(PG_OS_USER)
        self._uid, self._gid = account.pw_uid, account.pw_gid

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def checker_dsn(self, password: str = CANARY) -> str:
        return f"postgresql://checker:{password}@127.0.0.1:{self.port}/test"

    def init(self) -> None:
        os.chmod(self.root, 0o755)
        os.chown(self.root, self._uid, self._gid)
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       user=self._uid, group=self._gid, check=True, capture_output=True,
                       timeout=60)
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root}'\n"
                       # fsync off is safe for a SIGKILL (the OS keeps the pages), but commits
                       # must reach the WAL synchronously or setup is lost in the crash.
                       "fsync = off\n"
                       "max_connections = 40\nshared_buffers = 16MB\n"
                       "password_encryption = 'scram-sha-256'\n"
                       # One log line per incoming connection: lets tests count them exactly.
                       "log_connections = on\n")
        self.start()
        self.psql("CREATE DATABASE test", db="postgres")
        # The password is SQL text here only; it is the canary the tests hunt for later.
        self.psql(f"CREATE ROLE checker LOGIN PASSWORD '{CANARY}'", db="postgres")
        self.psql("CHECKPOINT", db="postgres")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log.open("ab")
        self.proc = subprocess.Popen([str(PG_BIN / "postgres"), "-D", str(self.data)],
                                     user=self._uid, group=self._gid, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        _wait_until(self.accepting, START_TIMEOUT, "postgres")

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
        done = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port), "-t", "1"], timeout=5, check=False)
        return done.returncode == 0

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (one process group): a crash, not a stop."""
        if not _kill_group(self.proc):
            return
        # Backends share the group; wait until the port is really closed.
        _wait_until(lambda: not _port_open(self.port), 10, "postgres shutdown")

    def psql(self, sql: str, db: str = "test") -> str:
        done = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1",
                               "-p", str(self.port), "-U", "postgres", "-d", db, "-v",
                               "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, timeout=15, check=True)
        return done.stdout.strip()

    def connections(self) -> int:
        """Client backends other than this query's own."""
        return int(self.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                             "'client backend' AND pid <> pg_backend_pid()"))

    def connections_received(self) -> int:
        """Connections ever made to this server (from its log; no connection of our own)."""
        return self.log.read_text(errors="replace").count("connection received:")

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """redis-server without persistence, optionally with `requirepass`."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="sv-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None, db: int = 1) -> str:
        secret = self.password if password is None else password
        auth = f":{secret}@" if secret else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.root),
                "--logfile", str(self.root / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self.accepting, START_TIMEOUT, "redis")

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def kill(self) -> None:
        _kill_group(self.proc)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class BlackHole:
    """Accepts TCP connections and never sends a byte: what a hung dependency looks like."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)  # so the accept loop notices stop() promptly
        self.port = int(self._listener.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="black-hole", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._held:
            conn.close()


def _kill_group(proc: subprocess.Popen[bytes] | None) -> bool:
    """SIGKILL a server we started and its whole process group; False if it was not running."""
    if proc is None or proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(password=CANARY)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    with BlackHole() as hole:
        yield hole


class StatusServer:
    """A real HTTP server on loopback: GET /status/<code> answers with that status."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                code = int(self.path.rsplit("/", 1)[-1]) if "/status/" in self.path else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", "/status/200")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, code: int) -> str:
        return f"http://127.0.0.1:{self.port}/status/{code}"

    def __enter__(self) -> StatusServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def status_server() -> Iterator[StatusServer]:
    with StatusServer() as server:
        yield server
