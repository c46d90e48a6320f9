"""A real Prometheus server (Debian's 2.42, loopback, storage in tmp) scrapes the daemon running
the shipped services.toml every second, and answers the seed's questions through its HTTP API:
api's p99 latency from `histogram_quantile`, and `increase(service_starts_total)` after api was
killed and restarted by the daemon.
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

from tests.support import free_port
from tests.test_e2e import shipped_stack, wait_all_running

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
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
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


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("prom")
    with shipped_stack(directory) as stack:
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
