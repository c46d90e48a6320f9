"""End to end: the shipped services.toml, run by the real daemon (`python -m supervisor run`).

The file is copied with free ports in place of the fixed ones and a short control socket path;
everything else (commands, checks, wait_for, metrics_url) is as shipped. PostgreSQL and Redis
are the machine's (the file's defaults). Requests driven at api must come out of the daemon's
/v1/metrics as api's latency histogram with `service="api"`, and that text must pass promtool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, promtool_ok, sample

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("event-writer", "api", "observer", "watchdog")
BUCKETS = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5",
           "5.0", "10.0", "+Inf"]


def render_shipped_config(directory: Path, scrape_interval: float = 0.5, extra: str = ""
                          ) -> dict[str, Any]:
    """services.toml with free ports (and `extra` tables appended); returns the path and each
    service's base URL."""
    text = (ROOT / "services.toml").read_text()
    daemon_port = free_port()
    ports = {f"127.0.0.1:808{i}": f"127.0.0.1:{free_port()}" for i in range(1, 5)}
    assert "127.0.0.1:9464" in text and all(old in text for old in ports)
    text = text.replace("127.0.0.1:9464", f"127.0.0.1:{daemon_port}")
    for old, new in ports.items():
        text = text.replace(old, new)
    text = text.replace('"standins/', f'"{ROOT}/standins/')
    text = re.sub(r"(?m)^scrape_interval = .*$", f"scrape_interval = {scrape_interval}", text)
    # Unix socket paths are limited to 107 bytes: keep it out of pytest's long tmp paths.
    socket_dir = tempfile.mkdtemp(prefix="sv-e2e-")
    text = text.replace("[supervisor]\n",
                        f'[supervisor]\ncontrol_socket = "{socket_dir}/control.sock"\n', 1)
    path = directory / "services.toml"
    path.write_text(text + extra)
    urls = dict(zip(SERVICES, [f"http://{ports[f'127.0.0.1:808{i}']}" for i in (2, 1, 3, 4)],
                    strict=True))
    return {"path": path, "url": f"http://127.0.0.1:{daemon_port}", "services": urls,
            "socket_dir": socket_dir}


class DaemonProcess:
    """`python -m supervisor run` in its own session, stopped by its pid."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "REDIS_URL", "ENVIRONMENT", "NOTIFY_SOCKET")}
        # The shipped commands say "python3": the venv's, as after `. .venv/bin/activate`.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        # A stream of its own: an event-writer of another stack on this machine's shared Redis
        # (a concurrent run, a leftover) would otherwise take entries from the same group.
        env["EVENTS_STREAM"] = f"e2e:{os.getpid()}:{uuid.uuid4().hex}"
        self.log = config.parent / "daemon.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "--config", str(config)],
                cwd=config.parent, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL of its group; the exit code if it stopped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                return None
        return self.proc.returncode


@contextlib.contextmanager
def shipped_stack(directory: Path, scrape_interval: float = 0.5, extra: str = ""
                  ) -> Iterator[dict[str, Any]]:
    stack = render_shipped_config(directory, scrape_interval, extra)
    daemon = DaemonProcess(stack["path"])
    stack["daemon"] = daemon
    try:
        yield stack
        # A test may have killed a stand-in, and the daemon restarted it: stop only once every
        # stand-in serves again. One still importing (seconds on a loaded machine) has not yet
        # installed its SIGTERM handler and would die of the signal instead of exiting 0.
        wait_all_serving(stack)
        offset = daemon.log.stat().st_size
        code = daemon.stop()
        assert code == 0, daemon.output()
        raw = daemon.log.read_bytes()
        log = raw[offset:].decode(errors="replace")  # what the stop logged
        for name in SERVICES:  # each stand-in stopped cleanly on the daemon's SIGTERM
            if not re.search(rf"exited service={re.escape(name)} pid=\d+ exit status 0", log):
                # Its whole story, for a failure seen once under load whose cause is unknown.
                story = "\n".join(line for line in raw.decode(errors="replace").splitlines()
                                   if f"service={name} " in line or f"{name} " in line)
                raise AssertionError(f"no clean exit of {name} in the stop's log:\n{log[-6000:]}"
                                     f"\n--- all the daemon logged about {name}:\n{story[-6000:]}")
    finally:
        daemon.stop()
        shutil.rmtree(stack["socket_dir"], ignore_errors=True)


def wait_all_serving(stack: dict[str, Any], within: float = 60) -> None:
    """Until the daemon reports every service running and each answers 200 on /v1/health."""
    daemon: DaemonProcess = stack["daemon"]

    def not_serving(client: httpx.Client) -> list[str]:
        try:
            status = client.get(f"{stack['url']}/v1/status").json()
        except (httpx.TransportError, ValueError) as exc:
            return [f"the daemon's /v1/status: {type(exc).__name__}"]
        states = {s["name"]: s["state"] for s in status["services"]}
        missing = [f"{name} is {states.get(name)}" for name in SERVICES
                   if states.get(name) != "running"]
        for name in SERVICES:
            try:
                code = client.get(f"{stack['services'][name]}/v1/health").status_code
            except httpx.TransportError as exc:
                missing.append(f"{name}'s /v1/health: {type(exc).__name__}")
            else:
                if code != 200:
                    missing.append(f"{name}'s /v1/health: {code}")
        return missing

    deadline = time.monotonic() + within
    with httpx.Client(timeout=5) as client:
        while True:
            assert daemon.proc.poll() is None, daemon.output()
            missing = not_serving(client)
            if not missing:
                return
            assert time.monotonic() < deadline, \
                f"not every stand-in serves after {within} s: {missing}\n{daemon.output()}"
            time.sleep(0.1)


async def wait_all_running(client: httpx.AsyncClient, stack: dict[str, Any],
                           within: float = 30) -> dict[str, Any]:
    """Until every service runs and api answers ready; the /v1/status document."""
    daemon: DaemonProcess = stack["daemon"]
    with anyio.fail_after(within):
        while True:
            assert daemon.proc.poll() is None, daemon.output()
            with contextlib.suppress(httpx.TransportError):
                status = (await client.get(f"{stack['url']}/v1/status")).json()
                states = {s["name"]: s["state"] for s in status["services"]}
                if all(states.get(name) == "running" for name in SERVICES):
                    api_ready = await client.get(f"{stack['services']['api']}/v1/ready")
                    if api_ready.status_code == 200:
                        return status
            await anyio.sleep(0.1)


async def daemon_metrics(client: httpx.AsyncClient, stack: dict[str, Any]) -> str:
    response = await client.get(f"{stack['url']}/v1/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text




@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with shipped_stack(tmp_path_factory.mktemp("e2e")) as running:
        yield running


@pytest.mark.anyio
async def test_shipped_config_serves_api_latency_through_the_daemon(
        stack: dict[str, Any]) -> None:
    api = stack["services"]["api"]
    async with httpx.AsyncClient(timeout=10) as client:
        await wait_all_running(client, stack)
        before = await daemon_metrics(client, stack)
        for i in range(5):
            assert (await client.post(f"{api}/v1/events", json={"type": "e2e", "payload":
                                                                {"n": i}})).status_code == 202
        for _ in range(10):
            assert (await client.get(f"{api}/v1/events")).status_code == 200
        for _ in range(3):
            assert (await client.get(f"{api}/v1/fail", params={"status": 500})).status_code \
                == 500

        def grew(text: str, name: str, **labels: str) -> float:
            return (sample(text, name, **labels) or 0.0) - (sample(before, name, **labels)
                                                            or 0.0)

        # The daemon scrapes api every 0.5 s: poll its /v1/metrics until the requests show.
        # The deadline is generous for a loaded CI machine; on failure, say what was missing.
        deadline = time.monotonic() + 40
        while True:
            text = await daemon_metrics(client, stack)
            failed = grew(text, "http_request_duration_seconds_count", service="api",
                          endpoint="/v1/fail", status="500")
            # event-writer appends asynchronously and is scraped on its own schedule.
            written = sample(text, "event_writer_events_written_total",
                             service="event-writer") or 0
            if failed >= 3 and written >= 5:
                break
            if time.monotonic() > deadline:
                scrape = {name: sample(text, "service_scrape_up", service=name)
                          for name in SERVICES}
                pytest.fail(f"after 40 s: api /v1/fail 500s seen {failed} (want 3), "
                            f"events written {written} (want 5), scrape_up {scrape}")
            await anyio.sleep(0.1)

    labels = {"service": "api", "environment": "development", "endpoint": "/v1/events",
              "method": "GET", "status": "200"}
    assert grew(text, "http_request_duration_seconds_count", **labels) == 10
    assert grew(text, "http_requests_total", **labels) == 10
    assert grew(text, "http_requests_failed_total", service="api", endpoint="/v1/fail",
                status="500", error_type="server_error") == 3
    families = {f.name: f for f in text_string_to_metric_families(text)}
    histogram = families["http_request_duration_seconds"]
    assert histogram.type == "histogram"
    api_buckets = [s.labels["le"] for s in histogram.samples
                   if s.name.endswith("_bucket") and all(s.labels.get(k) == v
                                                         for k, v in labels.items())]
    assert api_buckets == BUCKETS
    # One family for all sources: a single HELP and TYPE line each.
    assert text.count("# TYPE http_request_duration_seconds histogram") == 1
    services_seen = {s.labels["service"] for s in histogram.samples}
    assert {"api", "supervisor"} <= services_seen
    # The other stand-ins' own metrics arrive too, each with its service label.
    assert (sample(text, "event_writer_events_written_total", service="event-writer") or 0) >= 5
    assert sample(text, "watchdog_target_up", service="watchdog", target="api") == 1
    for name in SERVICES:
        assert sample(text, "service_scrape_up", service=name) == 1
        assert sample(text, "service_up", service=name) == 1
    # The shipped allow lists are strict, yet nothing a stand-in exposes is lost.
    assert not families["service_scrape_dropped_families"].samples
    promtool_ok(text)


@pytest.mark.anyio
async def test_shipped_config_is_ready_with_its_checks(stack: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        status = await wait_all_running(client, stack)
        assert set(status["readiness"]["checks"]) == {"database", "redis", "event_store"}
        with anyio.fail_after(15):  # checks run every 5 s by default
            while True:
                ready = await client.get(f"{stack['url']}/v1/ready")
                if ready.status_code == 200:
                    break
                await anyio.sleep(0.1)
        assert ready.json()["status"] == "ready"
        for name, url in stack["services"].items():
            assert (await client.get(f"{url}/v1/ready")).status_code == 200, name


@pytest.mark.anyio
async def test_shipped_config_probes_every_standin_and_orders_starts_by_readiness(
        stack: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        await wait_all_running(client, stack)
        with anyio.fail_after(20):
            while True:
                status = (await client.get(f"{stack['url']}/v1/status")).json()
                if all(s["ready"] is True for s in status["services"]):
                    break
                await anyio.sleep(0.1)
        for entry in status["services"]:
            assert set(entry["probes"]) == {"liveness", "readiness"}, entry["name"]
        text = await daemon_metrics(client, stack)
        for name in SERVICES:
            assert sample(text, "service_ready", service=name) == 1.0, name
    # api and observer wait for event-writer to be ready; watchdog for api.
    log = stack["daemon"].output()
    for dependency, dependent in (("event-writer", "api"), ("event-writer", "observer"),
                                  ("api", "watchdog")):
        ready = re.search(rf"(?<!not )ready service={re.escape(dependency)}\b", log)
        assert ready is not None, log
        assert ready.start() < log.index(f"spawned service={dependent} "), (dependency, dependent)
