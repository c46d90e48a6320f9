"""The daemon in-process with real child processes, through its HTTP interface, on both backends."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from supervisor.core.lifecycle import State
from tests.support import (
    base_url,
    get,
    pid_alive,
    promtool_ok,
    running_daemon,
    sample,
    service,
    until,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio

SLEEPER = "import time\nwhile True: time.sleep(1)"


def running(s) -> bool:  # type: ignore[no-untyped-def]
    return s.state is State.RUNNING


async def test_crash_restarts_service_and_counts_the_start(tmp_path: Path) -> None:
    # A backoff of 5 s if the restart were not immediate: the latency bound below can then
    # leave a loaded machine seconds of margin and still tell the two apart.
    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.2, backoff_initial=5.0,
                                          backoff_jitter=0.0))
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "api", running)
        await anyio.sleep(0.6)
        text = (await get(daemon, "/v1/metrics")).text
        labels = {"service": "api", "environment": "development"}
        assert sample(text, "service_starts_total", **labels) == 1.0
        assert (sample(text, "uptime_seconds", **labels) or 0) >= 0.5
        assert first.pid is not None
        killed_at = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        second = await wait_for(daemon, "api", lambda s: s.starts == 2 and s.pid is not None)
        restart_latency = time.monotonic() - killed_at
        assert second.pid != first.pid
        assert restart_latency < 3.0  # first restart after a run is immediate (not 5 s on)
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_starts_total", **labels) == 2.0
        # The new process's uptime, not the old one's (which was over 0.5 s when it died).
        assert (sample(text, "uptime_seconds", **labels) or 99) <= time.monotonic() - killed_at
        assert sample(text, "service_exits_total", reason="signal", **labels) == 1.0
        assert sample(text, "service_last_exit_code", **labels) == 128 + 9
        status = (await get(daemon, "/v1/status")).json()
        api = next(s for s in status["services"] if s["name"] == "api")
        assert api["last_exit"]["signal"] == "SIGKILL" and api["starts"] == 2


async def test_crash_loop_delays_grow_and_spawns_stay_bounded(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[services.crasher]
command = ["sh", "-c", "exit 1"]
start_seconds = 0
backoff_initial = 0.2
backoff_factor = 2.0
backoff_jitter = 0.0
""")
    async with running_daemon(path) as daemon:
        spawn_times: list[float] = []
        with anyio.fail_after(30):  # five spawns: 0, 0, +0.2, +0.4, +0.8
            while len(spawn_times) < 5:
                seen = len(spawn_times)
                snap = await daemon.runners["crasher"].wait_until(
                    lambda s, seen=seen: s.starts > seen)
                spawn_times.extend([time.monotonic()] * (snap.starts - len(spawn_times)))
        gaps = [b - a for a, b in zip(spawn_times, spawn_times[1:], strict=False)]
        # A backoff timer never fires early, so the lower bounds hold whatever the load (less
        # 50 ms for when this task sees each spawn): the spawns stay bounded and the wait grows
        # to 0.8 s. The upper bounds (the first waits were short, so it grew) leave a loaded
        # machine 0.5 s of margin.
        assert 0.15 <= gaps[1] and 0.35 <= gaps[2] and 0.75 <= gaps[3]
        assert gaps[0] < 0.7 and gaps[1] < 0.7
        snap = daemon.snapshots["crasher"]
        assert snap.exits["failure"] >= 4 and snap.last_exit is not None
        assert snap.last_exit.code == 1


async def test_exit_code_is_exact_every_time(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[services.three]
command = ["sh", "-c", "exit 3"]
start_seconds = 0
backoff_initial = 0.001
backoff_max = 0.005
""")
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "three", lambda s: s.exits["failure"] >= 30)
        assert snap.exits["signal"] == 0 and snap.exits["success"] == 0
        assert snap.last_exit is not None and snap.last_exit.code == 3
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_last_exit_code", service="three") == 3.0


async def test_child_ignoring_sigterm_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER
    path = write_config(tmp_path, service("stubborn", code, start_seconds=0.3, stop_timeout=0.7))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "stubborn", running)
        began = time.monotonic()
        daemon.stop_service("stubborn")
        snap = await wait_for(daemon, "stubborn", lambda s: s.state is State.STOPPED)
        took = time.monotonic() - began
        assert snap.last_exit is not None and snap.last_exit.signal == signal.SIGKILL
        assert snap.last_exit.reason == "stopped"
        assert 0.65 <= took < 5.0  # killed after stop_timeout; the rest is a loaded machine's
        await anyio.sleep(0.3)
        assert daemon.snapshots["stubborn"].state is State.STOPPED  # stays stopped


async def test_grandchildren_are_gone_after_a_stop(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[services.family]
command = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
start_seconds = 0.3
stop_timeout = 2
""")
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "family", running)
        assert snap.pid is not None
        with anyio.fail_after(5):
            while len(kids := psutil.Process(snap.pid).children(recursive=True)) < 2:
                await anyio.sleep(0.05)
        grandchildren = [k.pid for k in kids]
        daemon.stop_service("family")
        await wait_for(daemon, "family", lambda s: s.state is State.STOPPED)
        with anyio.fail_after(5):
            while any(pid_alive(pid) for pid in grandchildren):
                await anyio.sleep(0.05)


async def test_floods_of_output_never_block_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "done"
    code = f"""
import sys
line = "x" * 999 + "\\n"
for _ in range(10_000):
    sys.stdout.write(line)
sys.stdout.flush()
sys.stderr.write("y" * 1_000_000)
sys.stderr.flush()
open({str(marker)!r}, "w").close()
import time
while True: time.sleep(1)
"""
    path = write_config(tmp_path, service("loud", code, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        with anyio.fail_after(20):
            while not marker.exists():
                await anyio.sleep(0.05)
        assert (await get(daemon, "/v1/health")).status_code == 200
        assert daemon.snapshots["loud"].starts == 1


async def test_health_liveness_and_router(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("api", SLEEPER))
    async with running_daemon(path) as daemon:
        health = await get(daemon, "/v1/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        assert health.json()["uptime_seconds"] >= 0
        assert (await get(daemon, "/nope")).status_code == 404
        assert (await get(daemon, "/")).status_code == 404
        async with httpx.AsyncClient(base_url=base_url(daemon)) as client:
            post = await client.post("/v1/metrics", content=b"x")
            assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
            assert (await client.delete("/v1/health")).status_code == 405
            head = await client.head("/v1/health")
            assert head.status_code == 200 and head.content == b""


async def test_health_reports_a_wedged_event_loop(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("api", SLEEPER))
    async with running_daemon(path, health_stale_after=1.0) as daemon:
        url = base_url(daemon) + "/v1/health"
        seen: list[int] = []

        def probe() -> None:
            time.sleep(1.8)  # the loop's heartbeat is older than health_stale_after by then
            seen.append(httpx.get(url, timeout=10).status_code)

        thread = threading.Thread(target=probe)
        thread.start()
        # Deliberately block the event loop until the probe has its answer (not for a fixed
        # time the probe might outlast on a loaded machine): the handler thread must notice.
        thread.join(30)
        assert seen == [503]
        with anyio.fail_after(10):  # the heartbeat resumes with the loop: healthy again
            while True:
                if (await get(daemon, "/v1/health")).status_code == 200:
                    break
                await anyio.sleep(0.1)


async def test_metrics_formats_and_promtool(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.1)
                        + service("idle", SLEEPER, autostart=False))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", running)

        async def sampled() -> bool:  # a stats round (every 0.5 s) has measured api
            text = (await get(daemon, "/v1/metrics")).text
            return (sample(text, "service_memory_resident_bytes", service="api") or 0) > 0
        await until(sampled, 20, "a stats round")
        response = await get(daemon, "/v1/metrics")
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.text
        for family in ("uptime_seconds", "service_starts_total", "service_up", "service_state",
                       "service_cpu_seconds_total", "service_memory_resident_bytes",
                       "process_resident_memory_bytes"):
            assert f"\n{family}" in text or text.startswith(family)
        assert sample(text, "service_starts_total", service="idle") == 0.0
        assert sample(text, "uptime_seconds", service="idle") == 0.0
        assert (sample(text, "service_memory_resident_bytes", service="api") or 0) > 1_000_000
        assert sample(text, "process_resident_memory_bytes", service="supervisor") is not None
        assert sample(text, "service_state", service="idle", state="stopped") == 1.0
        for line in text.splitlines():
            if line and not line.startswith("#"):
                assert 'service="' in line and 'environment="development"' in line, line
        om = await get(daemon, "/v1/metrics",
                       headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
    promtool_ok(text)


async def test_depends_on_orders_start_and_reverse_stop(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    code = f"""
import signal, sys, time
name = sys.argv[1]
def stop(*_):
    open({str(log)!r}, "a").write("stop " + name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open({str(log)!r}, "a").write("start " + name + "\\n")
while True: time.sleep(1)
"""
    import json

    from tests.support import PY

    def svc(name: str, deps: list[str]) -> str:
        return (f"[services.{name}]\ncommand = {json.dumps([PY, '-c', code, name])}\n"
                f"start_seconds = 0.3\ndepends_on = {json.dumps(deps)}\n")

    path = write_config(tmp_path, svc("web", ["db"]) + svc("db", []))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "web", running)
    assert log.read_text().split("\n")[:4] == ["start db", "start web", "stop web", "stop db"]


async def test_idle_connections_do_not_starve_scrapers(tmp_path: Path) -> None:
    import socket

    path = write_config(tmp_path, service("api", SLEEPER))
    async with running_daemon(path) as daemon:
        assert daemon.listen_address is not None
        idle = [socket.create_connection(daemon.listen_address, timeout=5) for _ in range(100)]
        try:
            codes: list[int] = []

            async def scrape(client: httpx.AsyncClient) -> None:
                codes.append((await client.get("/v1/metrics")).status_code)

            async with httpx.AsyncClient(base_url=base_url(daemon), timeout=10) as client:
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for _ in range(20):
                            tg.start_soon(scrape, client)
            assert codes == [200] * 20
        finally:
            for sock in idle:
                sock.close()


async def test_concurrent_scrapes_share_one_render_and_stay_fresh(tmp_path: Path) -> None:


    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", running)
        render = daemon.obs.metrics_app.render

        def slow(*args: Any) -> bytes:  # as long as a big merge used to take
            time.sleep(0.3)
            return render(*args)

        daemon.obs.metrics_app.render = slow
        before = daemon.obs.metrics_app.renders
        bodies: list[str] = []

        async def scrape(client: httpx.AsyncClient) -> None:
            response = await client.get("/v1/metrics")
            assert response.status_code == 200
            bodies.append(response.text)

        async with httpx.AsyncClient(base_url=base_url(daemon), timeout=20) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(scrape, client)
            shared = daemon.obs.metrics_app.renders - before
            assert len(bodies) == 20 and shared <= 5  # not one render per scraper
            # A request after a change renders afresh: it never gets an older shared body.
            snap = daemon.snapshots["api"]
            assert snap.pid is not None
            os.kill(snap.pid, signal.SIGKILL)
            await wait_for(daemon, "api", lambda s: s.starts == 2)
            text = (await client.get("/v1/metrics")).text
            assert sample(text, "service_starts_total", service="api") == 2.0
            zipped = await client.get("/v1/metrics", headers={"Accept-Encoding": "gzip"})
            assert zipped.headers["content-encoding"] == "gzip"
            assert "service_starts_total" in zipped.text  # httpx decodes it
            only = (await client.get("/v1/metrics", params={"name[]": "service_up"})).text
            assert "service_up{" in only and "uptime_seconds" not in only



async def test_a_kept_body_is_served_until_something_operators_act_on_changes(
        tmp_path: Path) -> None:
    from supervisor.observe.render import Ticker

    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", running)
        daemon.obs.renderer.clock = Ticker(3600.0)  # no tick boundary during the test
        async with httpx.AsyncClient(base_url=base_url(daemon), timeout=10) as client:
            bodies = [(await client.get("/v1/metrics")).text for _ in range(5)]
            # Kept: one render (two if the stats sampler swapped its figures meanwhile).
            assert len(set(bodies)) <= 2
            # A restart is news at once: the next scrape renders afresh.
            snap = daemon.snapshots["api"]
            assert snap.pid is not None
            os.kill(snap.pid, signal.SIGKILL)
            await wait_for(daemon, "api", lambda s: s.starts == 2 and s.pid is not None)
            text = (await client.get("/v1/metrics")).text
            assert sample(text, "service_starts_total", service="api") == 2.0
            # Filtered requests are never kept.
            before = daemon.obs.metrics_app.renders
            for _ in range(3):
                await client.get("/v1/metrics", params={"name[]": "service_up"})
            assert daemon.obs.metrics_app.renders - before == 3


async def test_a_service_is_scraped_as_soon_as_it_runs(tmp_path: Path) -> None:
    """`web` waits for a gate the test opens, so the scrape at the daemon's start finds nothing
    listening; once `web` runs it is scraped at once, not a scrape_interval (60 s) later.
    The same after a restart: the new process is scraped at once.

    "At once" is judged by a scrape attempt, not by its success: `running` comes start_seconds
    after the spawn, and on a loaded machine the child may not listen yet by then (that is the
    child's start-up, which the daemon cannot know about)."""
    import socket

    from tests.support import free_port, metrics_server, poll_until, until

    port = free_port()
    # The gate's port is held bound (refusing connections) until the test listens on it: a
    # port only found free could be taken by another run on the machine meanwhile.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    gate = listener.getsockname()[1]
    (tmp_path / "metrics.txt").write_text("# TYPE jobs_done_total counter\njobs_done_total 7\n")
    server = metrics_server(port, tmp_path / "metrics.txt")
    path = write_config(
        tmp_path,
        f'[checks.gate]\ntype = "tcp"\naddress = "127.0.0.1:{gate}"\ninterval = 0.1\n\n'
        + service("web", server, start_seconds=0.3, wait_for=["gate"], wait_timeout=60,
                  metrics_url=f"http://127.0.0.1:{port}/metrics"),
        supervisor="scrape_interval = 60.0\n")
    with listener:
        async with running_daemon(path) as daemon:
            first = await until(lambda: daemon.obs.scraper.snapshot().get("web"), 20,
                                "the scrape at the daemon's start")
            assert not first.ok  # web was not even spawned
            assert daemon.snapshots["web"].starts == 0
            listener.listen()
            await wait_for(daemon, "web", running, timeout=30)
            # The next regular scrape is 60 s away: one within 15 s is the poke at `running`.
            at_once = await until(lambda: (r := daemon.obs.scraper.snapshot()["web"]).fetched_at
                                  > first.fetched_at and r, 15, "a scrape once web runs")
            if not at_once.ok:  # not listening yet (a loaded machine): ask again once it listens
                await anyio.to_thread.run_sync(lambda: poll_until(lambda: _accepts(port), 30))
                daemon.obs.scraper.poke("web")
            await until(lambda: daemon.obs.scraper.snapshot()["web"].ok, 15, "a good scrape of web")
            text = (await get(daemon, "/v1/metrics")).text
            assert sample(text, "jobs_done_total", service="web") == 7.0
            before = daemon.obs.scraper.snapshot()["web"]
            snap = daemon.snapshots["web"]
            assert snap.pid is not None
            os.kill(snap.pid, signal.SIGKILL)
            await wait_for(daemon, "web", lambda s: s.starts == 2 and s.state is State.RUNNING,
                           timeout=30)
            await until(lambda: daemon.obs.scraper.snapshot()["web"].fetched_at > before.fetched_at,
                        15, "a scrape once the restarted web runs")


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_time_dependent_metrics_move_between_scrapes(tmp_path: Path) -> None:
    """Uptimes are a clocked source: a later scrape shows a later value, although nothing the
    kept-body or per-source caches are keyed by (snapshots, config) changed meanwhile."""
    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", running)
        labels = {"service": "api", "environment": "development"}
        snapshots = daemon.snapshots
        async with httpx.AsyncClient(base_url=base_url(daemon), timeout=10) as client:
            first = sample((await client.get("/v1/metrics")).text, "uptime_seconds", **labels)
            assert first is not None
            later = first
            with anyio.fail_after(5):
                while later <= first:
                    await anyio.sleep(0.05)
                    text = (await client.get("/v1/metrics")).text
                    later = sample(text, "uptime_seconds", **labels) or 0.0
        assert daemon.snapshots is snapshots  # no lifecycle change made it move
        assert later > first


async def test_running_a_daemon_leaves_interpreter_settings_alone(tmp_path: Path) -> None:
    """Collector thresholds, frozen objects and the switch interval are the CLI's to set
    (cli._tune_collector): a daemon embedded in a process (tests, tools) changes none."""
    import gc
    import sys

    before = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(),
              sys.getswitchinterval())
    path = write_config(tmp_path, service("api", SLEEPER, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", running)
        assert (await get(daemon, "/v1/metrics")).status_code == 200
        during = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(),
                  sys.getswitchinterval())
    after = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(),
             sys.getswitchinterval())
    assert during == before and after == before


async def test_the_cli_tunes_the_collector_once_the_daemon_is_up(tmp_path: Path) -> None:
    import gc

    from supervisor import cli
    from supervisor.config import load_config
    from supervisor.daemon import Daemon

    thresholds = gc.get_threshold()
    daemon = Daemon(load_config(write_config(tmp_path, service("api", SLEEPER))),
                    handle_signals=False)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cli._serve, daemon)
            with anyio.fail_after(10):
                while gc.get_threshold()[0] != cli.GC_YOUNG_THRESHOLD:
                    await anyio.sleep(0.02)
            assert gc.get_freeze_count() > 0
            assert daemon.listen_address is not None  # tuned after the daemon was up
            daemon.request_shutdown()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_every_daemon_attribute_is_first_assigned_in_init() -> None:
    """A reader finds the whole state of a Daemon in __init__ (the observability half is one
    attribute, `_obs`, built in run())."""
    import ast
    import inspect

    from supervisor import daemon as module

    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Daemon")

    def assigned(node: ast.AST) -> set[str]:
        return {t.attr for n in ast.walk(node)
                for t in (n.targets if isinstance(n, ast.Assign) else
                          [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else [])
                for t in ast.walk(t)
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == "self"}

    methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    init = next(m for m in methods if m.name == "__init__")
    elsewhere = set().union(*(assigned(m) for m in methods if m is not init))
    assert elsewhere, "the walk finds assignments"
    assert elsewhere - assigned(init) == set()
