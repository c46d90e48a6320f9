"""Ours only: /v1/metrics and /v1/ready latency with 1 and 20 concurrent clients, with N
children each exposing about 50 series that the daemon scrapes and merges."""

from __future__ import annotations

import http.client
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.scenarios import Launched, free_port
from bench.systems import Child, System, Tools

CHILD = str(Path(__file__).with_name("metrics_child.py"))


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
    """`clients` threads, each its own connection per request, `total` requests in all."""
    per_client = max(1, total // clients)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        mine, codes = [], []
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                code, _ = get(port, path)
            except OSError:
                code = 0
            mine.append(time.perf_counter() - t0)
            codes.append(code)
        with lock:
            latencies.extend(mine)
            for c in codes:
                statuses[c] = statuses.get(c, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
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


def http_run(system: System, n: int, tools: Tools, hp: HttpParams) -> dict[str, float]:
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
            for path, key, total in (("/v1/metrics", "metrics", hp.metrics_requests),
                                     ("/v1/ready", "ready", hp.ready_requests)):
                for clients in hp.concurrency:
                    lat, statuses = load(port, path, clients, total)
                    out[f"{key}_c{clients}_p50_ms"] = 1000 * statistics.median(lat)
                    out[f"{key}_c{clients}_p99_ms"] = 1000 * _quantile(lat, 0.99)
                    out[f"{key}_c{clients}_errors"] = float(
                        sum(v for k, v in statuses.items() if k not in (200, 503)))
            out["http_rss_mib"] = procs.rss_bytes(d.pid) / 2**20
        except Exception:
            print(d.tail(), file=sys.stderr)
            raise
        finally:
            d.close()
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]
