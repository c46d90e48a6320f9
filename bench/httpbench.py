"""Ours only: /v1/metrics and /v1/ready latency with 1 and 20 concurrent clients, with N
children each exposing about 50 series that the daemon scrapes and merges."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
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
    metrics_requests: int = 200  # per concurrency level, spread over the clients
    ready_requests: int = 500
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


def load(port: int, path: str, clients: int, total: int) -> tuple[list[float], dict[int, int]]:
    """`clients` concurrent clients, a new connection per request, `total` requests in all.

    One asyncio loop on raw sockets rather than threads with http.client: 20 Python client
    threads fighting over one GIL on a 2-core machine would measure the bench, not the daemon.
    """
    return asyncio.run(_load(port, path, clients, max(1, total // clients)))


async def _load(port: int, path: str, clients: int, per_client: int
                ) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    go = asyncio.Event()

    async def client() -> None:
        await go.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                writer.write(request)
                head = await reader.readline()
                while await reader.read(1 << 22):
                    pass
                writer.close()
                code = int(head.split()[1])
            except (OSError, ValueError, IndexError):
                code = 0
            latencies.append(time.perf_counter() - t0)
            statuses[code] = statuses.get(code, 0) + 1

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 600)
    return latencies, statuses


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
    """The same load against a bare ThreadingWSGIServer serving `body` precomputed."""
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
