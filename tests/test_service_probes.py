"""Service probes (issue 17): liveness restarts, readiness gates dependents, startup holds
liveness off, exec probes leave nothing behind. Real child processes and real HTTP on
loopback, through the daemon's interfaces (status, metrics, log), on both backends."""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import anyio
import pytest
from tests.dbservers import BlackHole, black_hole  # noqa: F401 (fixture)
from tests.support import (
    PY,
    free_port,
    get,
    running_daemon,
    sample,
    service,
    wait_for,
    write_config,
)

from supervisor.config import ProbeSpec
from supervisor.lifecycle import State
from supervisor.probes import probe_service
from supervisor.spawn import spawn
from supervisor.statuscli import render

pytestmark = pytest.mark.anyio

# A service with /v1/health (500 while `<dir>/sick` exists, hangs while `<dir>/hang` exists)
# and /v1/ready (503 until `<dir>/ready` exists). SIGTERM is recorded in `<dir>/terms`, so a
# test can see the normal stop path was taken.
APP = """
import http.server, os, signal, sys, time
port, state = int(sys.argv[1]), sys.argv[2]
def term(*_):
    with open(os.path.join(state, "terms"), "a") as f:
        f.write("TERM\\n")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/v1/health":
            while os.path.exists(os.path.join(state, "hang")):
                time.sleep(0.05)
            code = 500 if os.path.exists(os.path.join(state, "sick")) else 200
        elif self.path == "/v1/ready":
            code = 200 if os.path.exists(os.path.join(state, "ready")) else 503
        else:
            code = 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def app(name: str, port: int, state: Path, extra: str = "", **keys: object) -> str:
    table = service(name, APP, **keys).replace(
        '"]\n', f'", "{port}", "{state}"]\n', 1)
    return table + extra


def probe_table(service_name: str, kind: str, **keys: object) -> str:
    import json

    lines = [f"[services.{service_name}.{kind}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def snapshot_of(daemon, name: str):  # type: ignore[no-untyped-def]
    return daemon.runners[name].snapshot


# -- liveness ---------------------------------------------------------------------------------

async def test_failing_health_restarts_the_service_within_the_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    period, threshold, timeout = 0.3, 2, 0.5
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.2,
                                      backoff_jitter=0.0) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=period, timeout=timeout, failure_threshold=threshold))
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "api", lambda s: s.state is State.RUNNING
                               and (s.probes["liveness"].passing is True))
        (tmp_path / "sick").touch()
        sick_at = time.monotonic()
        second = await wait_for(daemon, "api", lambda s: s.starts == 2 and s.pid is not None)
        elapsed = time.monotonic() - sick_at
        (tmp_path / "sick").unlink()
        assert elapsed <= period * threshold + timeout + 1.0, elapsed
        assert second.pid != first.pid
        # The normal stop path: stop_signal (SIGTERM) reached the service.
        assert (tmp_path / "terms").read_text().count("TERM") == 1
        assert second.exits["liveness"] == 1 and second.exits["stopped"] == 0
        assert second.last_exit is not None and second.last_exit.reason == "liveness"
        text = (await get(daemon, "/v1/metrics")).text
        labels = {"service": "api", "environment": "development"}
        assert sample(text, "service_exits_total", reason="liveness", **labels) == 1.0
        failures = sample(text, "service_probe_failures_total", probe="liveness", **labels)
        assert failures is not None and failures >= threshold
        status = (await get(daemon, "/v1/status")).json()
        entry = next(s for s in status["services"] if s["name"] == "api")
        assert entry["last_exit"]["reason"] == "liveness"
        assert entry["probes"]["liveness"]["failures"] >= threshold
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "liveness probe failed" in r.getMessage()]
    assert warnings and "service=api" in warnings[0] and "HTTP 500" in warnings[0]


async def test_black_holed_liveness_probe_is_judged_within_timeout(
        tmp_path: Path, black_hole: BlackHole) -> None:  # noqa: F811
    timeout = 0.4
    spec = ProbeSpec("liveness", "http", target=f"http://{black_hole.address}/v1/health",
                     timeout=timeout)
    started = time.monotonic()
    result = await probe_service("svc", spec)
    assert time.monotonic() - started < timeout + 0.2
    assert not result.healthy and result.error is not None and "timed out" in result.error
    tcp = ProbeSpec("liveness", "exec", command=("sleep", "30"), timeout=timeout)
    started = time.monotonic()
    result = await probe_service("svc", tcp, spawner=spawn)
    assert time.monotonic() - started < timeout + 0.5
    assert not result.healthy and "timed out" in (result.error or "")
    # And through the daemon: a hanging /health restarts the service.
    port = free_port()
    (tmp_path / "hang").touch()
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.1) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=0.2, timeout=timeout, failure_threshold=1, initial_delay=0.2))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.pid is not None)
        started = time.monotonic()
        snap = await wait_for(daemon, "api", lambda s: s.exits["liveness"] >= 1)
        assert time.monotonic() - started <= 0.2 + 0.2 + timeout + 1.0
        assert "timed out" in (snap.last_error or snap.probes["liveness"].last_error or "")
        (tmp_path / "hang").unlink()


# -- startup ----------------------------------------------------------------------------------

async def test_startup_probe_holds_liveness_off_until_it_passes(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "sick").touch()  # liveness would fail at once
    started_flag = tmp_path / "started"
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.1) + probe_table(
        "api", "startup", type="exec", command=["test", "-f", str(started_flag)],
        period=0.1, timeout=1.0, failure_threshold=1000) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=0.1, timeout=0.5, failure_threshold=1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.probes["startup"].failures >= 5)
        snap = snapshot_of(daemon, "api")
        assert snap.starts == 1 and snap.exits["liveness"] == 0
        assert snap.probes["liveness"].failures == 0 and snap.probes["liveness"].passing is None
        started_flag.touch()
        snap = await wait_for(daemon, "api", lambda s: s.exits["liveness"] >= 1)
        assert snap.probes["liveness"].failures >= 1
        (tmp_path / "sick").unlink()


async def test_startup_probe_exhausted_restarts_the_service(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("slow", "import time; time.sleep(300)",
                                          start_seconds=0.1, backoff_jitter=0.0)
                        + probe_table("slow", "startup", type="tcp",
                                      address=f"127.0.0.1:{free_port()}", period=0.1,
                                      timeout=0.2, failure_threshold=3))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "slow", lambda s: s.exits["liveness"] >= 1)
        assert snap.last_exit is not None and snap.last_exit.reason == "liveness"
        assert "connect" in (snap.probes["startup"].last_error or "")
        await wait_for(daemon, "slow", lambda s: s.starts >= 2)


# -- readiness and depends_on -------------------------------------------------------------------

async def test_dependents_start_only_once_the_dependency_is_ready(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    path = write_config(tmp_path, app("db", port, tmp_path, start_seconds=0.1) + probe_table(
        "db", "readiness", type="http", url=f"http://127.0.0.1:{port}/v1/ready", period=0.1,
        timeout=0.5, failure_threshold=2) + service(
        "app", "import time; time.sleep(300)", depends_on=["db"], start_seconds=0.1),
        supervisor="ready_includes_services = true")
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "db", lambda s: s.state is State.RUNNING)
        await wait_for(daemon, "app", lambda s: s.state is State.WAITING)
        await anyio.sleep(0.5)  # several failed readiness probes: still held back
        app_snap = snapshot_of(daemon, "app")
        assert app_snap.state is State.WAITING and app_snap.starts == 0
        assert app_snap.waiting_for == "dependency db is not ready"
        response = await get(daemon, "/v1/ready")
        assert response.status_code == 503 and response.json()["services"] == {"db": False}
        status = (await get(daemon, "/v1/status")).json()
        db = next(s for s in status["services"] if s["name"] == "db")
        assert db["ready"] is False and "HTTP 503" in db["probes"]["readiness"]["last_error"]
        table = render(status).splitlines()
        assert "READY" in table[0]
        assert table[1].split()[:3] in (["db", "running", "no"], ["app", "waiting", "-"])
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_ready", service="db") == 0.0
        (tmp_path / "ready").touch()
        await wait_for(daemon, "app", lambda s: s.state is State.RUNNING)
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_ready", service="db") == 1.0
        assert sample(text, "service_ready", service="app") == 1.0  # no probe: running
        assert (await get(daemon, "/v1/ready")).status_code == 200
        # Unready again: reported, but the dependent keeps running.
        (tmp_path / "ready").unlink()
        await wait_for(daemon, "db", lambda s: s.ready is False)
        assert (await get(daemon, "/v1/ready")).status_code == 503
        await anyio.sleep(0.3)
        assert snapshot_of(daemon, "app").state is State.RUNNING
        assert snapshot_of(daemon, "app").starts == 1
    messages = [r.getMessage() for r in caplog.records]
    ready_at = next(i for i, m in enumerate(messages) if m.startswith("ready service=db"))
    spawned_at = next(i for i, m in enumerate(messages) if m.startswith("spawned service=app"))
    assert ready_at < spawned_at
    assert any(m.startswith("not ready service=db") for m in messages[spawned_at:])


# -- exec probes leave nothing behind ------------------------------------------------------------

def _marked(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(entry))
    return found


async def _none_marked(marker: str, timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while _marked(marker) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return _marked(marker)


FORK_AND_HANG = "import os, time\nos.fork()\nos.fork()\ntime.sleep(300)"


async def test_exec_probe_that_forks_and_hangs_leaves_nothing_behind() -> None:
    marker = f"probe-marker-{uuid.uuid4().hex}"
    spec = ProbeSpec("liveness", "exec", command=(PY, "-c", FORK_AND_HANG, marker),
                     timeout=0.5)
    started = time.monotonic()
    result = await probe_service("svc", spec, spawner=spawn, env=dict(os.environ))
    assert time.monotonic() - started < 0.5 + 0.5
    assert not result.healthy and "timed out" in (result.error or "")
    assert await _none_marked(marker) == []
    # A command that exits 0 at once but leaves a forked child behind passes, and the child
    # goes with its group.
    code = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(300)\nsys.exit(0)"
    spec = ProbeSpec("liveness", "exec", command=(PY, "-c", code, marker), timeout=2.0)
    result = await probe_service("svc", spec, spawner=spawn, env=dict(os.environ))
    assert result.healthy, result.error
    assert await _none_marked(marker) == []


async def test_exec_probes_of_a_running_service_leave_nothing_behind(tmp_path: Path) -> None:
    marker = f"probe-marker-{uuid.uuid4().hex}"
    path = write_config(tmp_path, service("svc", "import time; time.sleep(300)",
                                          start_seconds=0.1) + probe_table(
        "svc", "readiness", type="exec", command=[PY, "-c", FORK_AND_HANG, marker],
        period=0.1, timeout=0.2, failure_threshold=1))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "svc", lambda s: s.probes["readiness"].failures >= 4)
        assert snap.ready is False and snap.state is State.RUNNING  # never restarted
        assert len(_marked(marker)) <= 3  # at most the attempt under way
    assert await _none_marked(marker) == []
