"""A real Prometheus server (Debian's 2.42, loopback, storage in tmp) scrapes the daemon running
the shipped services.toml every second, and answers the seed's questions through its HTTP API:
api's p99 latency from `histogram_quantile`, and `increase(service_starts_total)` after api was
killed and restarted by the daemon.

A rogue service runs next to the stand-ins, exposing every disguise of the FR52 metrics in
tests/hostile.py and impersonations of the daemon's and Prometheus' series (`up 0`,
`dependency_up{check="database"} 0`): Prometheus, with the shipped alert rules loaded, must
store none of the denied names and see no alert fired by the rogue's series.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.hostile import CONTENT_TYPES, leaks, payload
from tests.support import free_port, service
from tests.test_e2e import ROOT, shipped_stack, wait_all_running

PROMETHEUS = "/usr/bin/prometheus"
P99 = ('histogram_quantile(0.99, sum by (le) '
       '(rate(http_request_duration_seconds_bucket{service="api"}[1m])))')
STARTS = 'increase(service_starts_total{service="api"}[1m])'


class PrometheusServer:
    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ROOT / 'docs' / 'prometheus' / 'alerts.yml'}\n"
            "scrape_configs:\n  - job_name: supervisor\n    metrics_path: /v1/metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={directory / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def rogue_service(directory: Path) -> str:
    """A [services.rogue] table: serves the hostile corpus as OpenMetrics, allowed everything
    (so the guard and the reserved names, not the allow list, must stop it)."""
    port = free_port()
    body = directory / "rogue.txt"
    body.write_text(payload("openmetrics"))
    code = (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        body = open({str(body)!r}, 'rb').read()\n"
        "        self.send_response(200)\n"
        f"        self.send_header('Content-Type', {CONTENT_TYPES['openmetrics']!r})\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    return "\n" + service("rogue", code, start_seconds=0.1, allow_metrics=["*"],
                          metrics_url=f"http://127.0.0.1:{port}/metrics")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("prom")
    with shipped_stack(directory, extra=rogue_service(directory)) as stack:
        prometheus = PrometheusServer(directory, stack["url"].removeprefix("http://"))
        try:
            yield {**stack, "prometheus": prometheus}
        finally:
            prometheus.stop()


async def query(client: httpx.AsyncClient, world: dict[str, Any], promql: str
                ) -> list[dict[str, Any]]:
    prometheus: PrometheusServer = world["prometheus"]
    assert prometheus.proc.poll() is None, prometheus.log.read_text()[-3000:]
    response = await client.get(f"{prometheus.url}/api/v1/query", params={"query": promql})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def until_value(client: httpx.AsyncClient, world: dict[str, Any], promql: str,
                      accept: Any, within: float) -> float:
    """Poll a query until its single value satisfies `accept`; that value."""
    last: Any = None
    try:
        with anyio.fail_after(within):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    result = await query(client, world, promql)
                    if result:
                        last = float(result[0]["value"][1])
                        if accept(last):
                            return last
                await anyio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{promql}: last value {last}") from None


@pytest.mark.anyio
async def test_prometheus_answers_p99_and_starts_after_a_kill(world: dict[str, Any]) -> None:
    api = world["services"]["api"]
    async with httpx.AsyncClient(timeout=10) as client:
        status = await wait_all_running(client, world)
        # A first slow request makes the series exist in Prometheus before the measured burst,
        # so rate() sees the burst as an increase rather than as the series' first value.
        assert (await client.get(f"{api}/v1/fail", params={"status": 503, "delay": 0.3})
                ).status_code == 503
        await until_value(client, world, 'http_request_duration_seconds_count{service="api",'
                          'endpoint="/v1/fail",status="503"}', lambda v: v >= 1, 15)
        slow = f"{api}/v1/fail?status=503&delay=0.3"
        async with anyio.create_task_group() as tg:  # 0.3 s each: the 0.25-0.5 s bucket
            for _ in range(12):
                tg.start_soon(client.get, slow)
        for _ in range(20):
            assert (await client.get(f"{api}/v1/health")).status_code == 200
        # Slow requests are far more than 1% of api's traffic in the window: p99 is theirs.
        p99 = await until_value(client, world, P99, lambda v: 0.25 < v <= 0.5, 20)
        assert not math.isnan(p99)

        before = next(s for s in status["services"] if s["name"] == "api")
        starts_query = 'service_starts_total{service="api"}'
        await until_value(client, world, starts_query, lambda v: v == before["starts"], 10)
        os.kill(before["pid"], signal.SIGKILL)  # the daemon's child, alive: it restarts it
        await until_value(client, world, starts_query, lambda v: v == before["starts"] + 1, 20)
        increase = await until_value(client, world, STARTS, lambda v: v > 0, 10)
        assert increase > 0
        up = await query(client, world, 'up{job="supervisor"}')
        assert up and up[0]["value"][1] == "1"


async def api_get(client: httpx.AsyncClient, world: dict[str, Any], path: str) -> Any:
    prometheus: PrometheusServer = world["prometheus"]
    response = await client.get(f"{prometheus.url}{path}")
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.mark.anyio
async def test_prometheus_stores_no_disguise_and_no_rogue_alert(world: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        await wait_all_running(client, world)
        # The rogue's honest family arrives, and its drops are counted ...
        await until_value(client, world, 'rogue_jobs{service="rogue"}', lambda v: v == 3, 30)
        await until_value(client, world,
                          'sum(service_scrape_dropped_families_total{service="rogue"})',
                          lambda v: v > 0, 15)
        # ... then a few more scrapes and rule evaluations go by.
        first = await until_value(client, world, 'timestamp(rogue_jobs{service="rogue"})',
                                  lambda v: v > 0, 5)
        await until_value(client, world, 'timestamp(rogue_jobs{service="rogue"})',
                          lambda v: v >= first + 4, 20)
        names = await api_get(client, world, "/api/v1/label/__name__/values")
        assert "rogue_jobs" in names
        stored: list[str] = list(names)
        for label in await api_get(client, world, "/api/v1/labels"):
            stored.append(label)
            stored += await api_get(client, world, f"/api/v1/label/{label}/values")
        series = await query(client, world, '{service="rogue"}')
        for entry in series:
            metric = entry["metric"]
            name = metric.get("__name__", "")
            for key, value in metric.items():
                stored += [name + key, key + value, name + value]
        assert leaks(stored) == [], leaks(stored)
        # No impersonation: one `up` (Prometheus' own), dependency_up only from the daemon.
        ups = await query(client, world, "up")
        assert len(ups) == 1 and ups[0]["value"][1] == "1", ups
        assert await query(client, world, 'dependency_up{service!="supervisor"}') == []
        assert await query(client, world, '{__name__=~"scrape_.+", service!=""}') == []
        assert await query(client, world, '{__name__=~"(service|config|dependency)_.+", '
                           'check="database", service="rogue"}') == []
        alerts = await query(client, world, "ALERTS")
        assert [a for a in alerts if a["metric"].get("service") == "rogue"
                or a["metric"]["alertname"] == "SupervisorDown"] == [], alerts
