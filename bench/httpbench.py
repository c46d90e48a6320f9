"""Ours only: /v1/metrics and /v1/ready latency with 1 and 20 concurrent clients, with N
children each exposing about 50 series that the daemon scrapes and merges."""

from __future__ import annotations

import errno
import http.client
import json
import math
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.scenarios import Launched, free_port
from bench.systems import Child, System, Tools

CHILD = str(Path(__file__).with_name("metrics_child.py"))
FLOOR_SERVER = str(Path(__file__).with_name("http_floor_server.py"))


@dataclass(frozen=True)
class HttpParams:
    concurrency: tuple[int, ...] = (1, 20)
    # Per concurrency level, spread over the clients. Enough that p99 is not one or two
    # unlucky requests (it was the 2nd and 5th slowest of 200 and 500): now the 10th and 20th.
    metrics_requests: int = 1000
    ready_requests: int = 2000
    scrape_interval: float = 5.0
    timeout: float = 90.0


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def load(port: int, path: str, clients: int, total: int, timeout: float = 30.0
         ) -> tuple[list[float], dict[int, int]]:
    """`clients` concurrent clients, a new connection per request, `total` requests in all.

    One epoll loop over non-blocking sockets: each client connects, sends its GET, reads to
    EOF and starts its next request at once (closed loop). A latency runs from before
    socket() to EOF. Status 0 counts a refused or reset connection or one over `timeout`.

    Neither client threads (20 Python threads fighting over one GIL on a 2-core machine would
    measure the bench) nor asyncio: its streams cost about 300 us of CPU per request, as much
    as the server, and on 2 cores that CPU is taken from the server. This loop costs ~60 us.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    left = [max(1, total // clients)] * clients
    conns: dict[int, _Conn] = {}
    ep = select.epoll()
    clock = time.perf_counter
    # Bodies are read into one reused buffer: recv(n) allocates n bytes per call, and the
    # page faults of a fresh megabyte per read took CPU from the daemon on 2 cores.
    buffer = bytearray(1 << 20)

    def start(client: int) -> None:
        while left[client] > 0:
            left[client] -= 1
            conn = _Conn(client, clock())
            err = conn.sock.connect_ex(("127.0.0.1", port))
            if err in (0, errno.EINPROGRESS):
                conns[conn.sock.fileno()] = conn
                ep.register(conn.sock.fileno(), select.EPOLLOUT)
                return
            conn.sock.close()
            done(conn, 0)

    def done(conn: _Conn, status: int) -> None:
        latencies.append(clock() - conn.began)
        statuses[status] = statuses.get(status, 0) + 1

    def close(fd: int, status: int) -> None:
        conn = conns.pop(fd)
        ep.unregister(fd)
        conn.sock.close()
        done(conn, status)
        start(conn.client)

    try:
        for client in range(clients):
            start(client)
        while conns:
            now = clock()
            for fd in [fd for fd, conn in conns.items() if now - conn.began > timeout]:
                close(fd, 0)
            for fd, _ in ep.poll(1.0):
                conn = conns[fd]
                try:
                    if not conn.sent:
                        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            raise ConnectionRefusedError
                        conn.sock.sendall(request)  # small: fits the empty send buffer
                        conn.sent = True
                        ep.modify(fd, select.EPOLLIN)
                        continue
                    got = conn.sock.recv_into(buffer)
                except OSError:
                    close(fd, 0)
                    continue
                if got:
                    if len(conn.head) < 16:
                        conn.head += buffer[:min(got, 16)]
                    continue
                parts = conn.head.split(None, 2)
                close(fd, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)
    finally:
        for conn in conns.values():
            conn.sock.close()
        ep.close()
    return latencies, statuses


class _Conn:
    __slots__ = ("began", "client", "head", "sent", "sock")

    def __init__(self, client: int, began: float) -> None:
        self.client, self.began = client, began
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sent = False
        self.head = b""


def _all_running(port: int, n: int) -> bool:
    try:
        code, body = get(port, "/v1/status")
    except OSError:
        return False
    if code != 200:
        return False
    services = json.loads(body)["services"]
    return sum(s["state"] == "running" for s in services) >= n


def _merged(port: int, n: int) -> bool:
    """True once every child's series appear in /v1/metrics."""
    try:
        code, body = get(port, "/v1/metrics")
    except OSError:
        return False
    return code == 200 and body.count(b'bench_queue_depth{') >= 25 * n


def http_run(system: System, n: int, tools: Tools, hp: HttpParams
             ) -> tuple[dict[str, float], bytes]:
    """Latencies of the daemon with n metrics children; also returns one /v1/metrics body."""
    out: dict[str, float] = {}
    port = free_port()
    children = []
    for i in range(n):
        child_port = free_port()
        children.append(Child(f"m{i}", (sys.executable, "-S", CHILD, str(child_port)),
                              f"http://127.0.0.1:{child_port}/metrics"))
    settings = {"port": float(port), "reset_after": 10.0, "scrape_interval": hp.scrape_interval}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        d = Launched(system, Path(tmp), children, tools, settings)
        try:
            if procs.wait_until(lambda: _all_running(port, n), hp.timeout, 0.05) is None:
                raise TimeoutError(f"{n} services not running; see {d.log_path}")
            if procs.wait_until(lambda: _merged(port, n), hp.timeout, 0.2) is None:
                raise TimeoutError(f"children's series not merged; see {d.log_path}")
            code, body = get(port, "/v1/metrics")
            out["metrics_series"] = float(sum(
                1 for line in body.splitlines() if line and not line.startswith(b"#")))
            out["metrics_kib"] = len(body) / 1024
            out.update(_latencies(port, hp))
            out["http_rss_mib"] = procs.rss_bytes(d.pid) / 2**20
        except Exception:
            print(d.tail(), file=sys.stderr)
            raise
        finally:
            d.close()
    return out, body


def _latencies(port: int, hp: HttpParams) -> dict[str, float]:
    out: dict[str, float] = {}
    for path, key, total in (("/v1/metrics", "metrics", hp.metrics_requests),
                             ("/v1/ready", "ready", hp.ready_requests)):
        for clients in hp.concurrency:
            lat, statuses = load(port, path, clients, total)
            out[f"{key}_c{clients}_p50_ms"] = 1000 * statistics.median(lat)
            out[f"{key}_c{clients}_p99_ms"] = 1000 * _quantile(lat, 0.99)
            out[f"{key}_c{clients}_errors"] = float(
                sum(v for k, v in statuses.items() if k not in (200, 503)))
    return out


def http_floor(tools: Tools, body: bytes, hp: HttpParams) -> dict[str, float]:
    """The same load against the daemon's server class alone, serving `body` precomputed."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        server = subprocess.Popen([tools.python, FLOOR_SERVER, str(port), str(body_file)],
                                  stdin=subprocess.DEVNULL)
        try:
            def answers() -> bool:
                try:
                    return get(port, "/v1/ready")[0] == 200
                except OSError:
                    return False

            if procs.wait_until(answers, 30, 0.05) is None:
                raise TimeoutError("floor server did not answer")
            return _latencies(port, hp)
        finally:
            server.kill()
            server.wait(10)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]
