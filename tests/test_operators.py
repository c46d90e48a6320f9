"""Operators' commands against a running daemon: status, start/stop/restart, reload."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from supervisor.core.lifecycle import State
from tests.support import (
    SLEEPER_CODE,
    base_url,
    get,
    running_daemon,
    sample,
    service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                              text=True, timeout=60)

    return await anyio.to_thread.run_sync(run)


def two_services() -> str:
    return (service("api", SLEEPER_CODE, start_seconds=0.2)
            + service("worker", SLEEPER_CODE, start_seconds=0.2))


async def test_status_exit_codes_and_json(tmp_path: Path) -> None:
    path = write_config(tmp_path, two_services())
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        await wait_for(daemon, "worker", lambda s: s.state is State.RUNNING)
        result = await cli("status", "--config", str(path))
        assert result.returncode == 0, result.stderr
        header, *rows = result.stdout.splitlines()
        assert header.split()[:3] == ["SERVICE", "STATE", "PID"]
        assert rows[0].split()[:2] == ["api", "running"]
        stopped = await cli("stop", "worker", "--config", str(path))
        assert stopped.returncode == 0 and stopped.stdout.strip() == "worker: stopped"
        result = await cli("status", "--url", base_url(daemon), "--json")
        assert result.returncode == 3
        import json

        document = json.loads(result.stdout)
        assert document["version"] == 1
        worker = next(s for s in document["services"] if s["name"] == "worker")
        assert worker["state"] == "stopped" and worker["pid"] is None
        assert worker["last_exit"]["reason"] == "stopped"
        assert set(worker) >= {"name", "state", "pid", "uptime_seconds", "starts", "last_exit",
                               "next_start_in_seconds"}
        await anyio.sleep(0.5)
        assert daemon.snapshots["worker"].state is State.STOPPED  # stays stopped
        started = await cli("start", "worker", "--config", str(path))
        assert started.returncode == 0 and "worker: running" in started.stdout
    down = await cli("status", "--config", str(path))
    assert down.returncode == 4
    assert "cannot reach the daemon" in down.stderr and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


async def test_control_socket_permissions_and_unknown_service(tmp_path: Path) -> None:
    path = write_config(tmp_path, two_services())
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        mode = os.stat(daemon.control_socket).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        pid = daemon.snapshots["api"].pid
        result = await cli("stop", "api", "ghost", "--socket", daemon.control_socket)
        assert result.returncode == 1
        assert "unknown service(s): ghost" in result.stderr
        assert daemon.snapshots["api"].pid == pid  # nothing was touched
        # The HTTP port is read-only: no way to control services over it.
        async_post = await get(daemon, "/v1/control")
        assert async_post.status_code == 404
    assert not Path(daemon.control_socket).exists()  # removed on shutdown
    gone = await cli("stop", "api", "--socket", daemon.control_socket)
    assert gone.returncode == 4 and "cannot reach the daemon" in gone.stderr


async def test_restart_honours_stop_timeout(tmp_path: Path) -> None:
    code = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER_CODE
    path = write_config(tmp_path, service("stubborn", code, start_seconds=0.2, stop_timeout=0.8))
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "stubborn", lambda s: s.state is State.RUNNING)
        began = time.monotonic()
        result = await cli("restart", "stubborn", "--config", str(path))
        took = time.monotonic() - began
        assert result.returncode == 0, result.stderr
        snap = daemon.snapshots["stubborn"]
        assert snap.pid != first.pid and snap.starts == 2
        assert snap.last_exit is not None and snap.last_exit.signal == 9  # SIGKILLed after 0.8 s
        assert took >= 0.8


async def test_reload_applies_only_what_changed(tmp_path: Path) -> None:
    path = write_config(tmp_path, two_services() + service("old", SLEEPER_CODE, start_seconds=0.2))
    async with running_daemon(path) as daemon:
        for name in ("api", "worker", "old"):
            await wait_for(daemon, name, lambda s: s.state is State.RUNNING)
        pids = {n: s.pid for n, s in daemon.snapshots.items()}
        text = path.read_text()
        text = text.replace(service("old", SLEEPER_CODE, start_seconds=0.2), "")
        text = text.replace(service("worker", SLEEPER_CODE, start_seconds=0.2),
                            service("worker", SLEEPER_CODE, start_seconds=0.2)
                            + 'env = { MODE = "new" }\n')
        text += service("new", SLEEPER_CODE, start_seconds=0.2)
        path.write_text(text)
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 0, result.stderr
        assert "added: new" in result.stdout and "removed: old" in result.stdout
        assert "changed: worker" in result.stdout
        await wait_for(daemon, "new", lambda s: s.state is State.RUNNING)
        await wait_for(daemon, "worker", lambda s: s.state is State.RUNNING)
        assert daemon.snapshots["api"].pid == pids["api"]  # unchanged: untouched
        assert daemon.snapshots["worker"].pid != pids["worker"]
        assert "old" not in daemon.snapshots
        assert pids["old"] is not None and not _alive(pids["old"])
        metrics = (await get(daemon, "/v1/metrics")).text
        assert sample(metrics, "config_reloads_total", result="success") == 1.0
        assert sample(metrics, "config_last_reload_successful") == 1.0
        assert sample(metrics, "service_up", service="old") is None


async def test_invalid_reload_keeps_everything_running(tmp_path: Path) -> None:
    path = write_config(tmp_path, two_services())
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        await wait_for(daemon, "worker", lambda s: s.state is State.RUNNING)
        pids = {n: s.pid for n, s in daemon.snapshots.items()}
        good = path.read_text()
        path.write_text(good + '\n[services.broken]\nrestart = "sometimes"\n')
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 1
        assert "services.broken.restart: expected one of always, on-failure, never" in result.stderr
        assert "services.broken.command: required" in result.stderr
        metrics = (await get(daemon, "/v1/metrics")).text
        assert sample(metrics, "config_last_reload_successful") == 0.0
        assert sample(metrics, "config_reloads_total", result="failure") == 1.0
        assert {n: s.pid for n, s in daemon.snapshots.items()} == pids
        assert all(s.state is State.RUNNING for s in daemon.snapshots.values())
        path.write_text(good)
        assert (await cli("reload", "--config", str(path))).returncode == 0
        metrics = (await get(daemon, "/v1/metrics")).text
        assert sample(metrics, "config_last_reload_successful") == 1.0
        assert {n: s.pid for n, s in daemon.snapshots.items()} == pids


def _alive(pid: int) -> bool:
    from tests.support import pid_alive

    return pid_alive(pid)


STUBBORN_CODE = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True: time.sleep(0.1)
"""


async def test_overlapping_reloads_run_one_at_a_time(tmp_path: Path) -> None:
    """A reload from the control socket arrives while another is still stopping a changed
    service that ignores SIGTERM: it waits its turn and applies on top, with no KeyError."""
    stubborn = service("slow", STUBBORN_CODE, start_seconds=0.1, stop_timeout=1.0)
    path = write_config(tmp_path, stubborn + service("api", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "slow", lambda s: s.state is State.RUNNING)
        api_pid = daemon.snapshots["api"].pid
        base = path.read_text()
        path.write_text(base.replace(stubborn, stubborn + 'env = { V = "2" }\n'))
        results: list[object] = []

        async def first_reload() -> None:
            results.append(await daemon.reload())

        async with anyio.create_task_group() as tg:
            tg.start_soon(first_reload)
            await wait_for(daemon, "slow", lambda s: s.state is State.STOPPING)
            path.write_text(base.replace(stubborn, stubborn + 'env = { V = "3" }\n'))
            second = await cli("reload", "--config", str(path))
        assert second.returncode == 0, second.stderr
        assert "changed: slow" in second.stdout
        first = results[0]
        assert getattr(first, "ok", False) and getattr(first, "changed", ()) == ("slow",)
        await wait_for(daemon, "slow", lambda s: s.state is State.RUNNING)
        assert dict(daemon.runners["slow"].spec.env) == {"V": "3"}
        assert daemon.snapshots["api"].pid == api_pid
        # The first process and the last, and the second reload may have replaced the first
        # one's runner before it spawned: counted across both reloads either way.
        snap = daemon.snapshots["slow"]
        assert snap.starts == snap.exits["stopped"] + 1 and snap.exits["stopped"] in (1, 2)


async def test_counters_survive_reloads_that_change_or_remove_a_service(tmp_path: Path) -> None:
    """service_starts_total, service_exits_total and `starts` in status count per service name
    for the daemon's lifetime: a reload that changes the command, or removes the service and
    a later one that adds it back, never makes them go back."""
    import json

    api = service("api", SLEEPER_CODE, start_seconds=0.1)
    path = write_config(tmp_path, api + service("other", SLEEPER_CODE, start_seconds=0.1))
    base = path.read_text()

    async def counters() -> tuple[float | None, float | None, int]:
        metrics = (await get(daemon, "/v1/metrics")).text
        status = await cli("status", "--url", base_url(daemon), "--json")
        starts = {s["name"]: s["starts"] for s in json.loads(status.stdout)["services"]}
        return (sample(metrics, "service_starts_total", service="api"),
                sample(metrics, "service_exits_total", service="api", reason="stopped"),
                starts["api"])

    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        assert (await cli("restart", "api", "--config", str(path))).returncode == 0
        assert await counters() == (2.0, 1.0, 2)
        changed = service("api", SLEEPER_CODE + "\n# v2", start_seconds=0.1)
        path.write_text(base.replace(api, changed))
        assert "changed: api" in (await cli("reload", "--config", str(path))).stdout
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING and s.starts == 3)
        assert await counters() == (3.0, 2.0, 3)
        path.write_text(base.replace(api, ""))
        assert "removed: api" in (await cli("reload", "--config", str(path))).stdout
        path.write_text(base)
        assert "added: api" in (await cli("reload", "--config", str(path))).stdout
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING and s.starts == 4)
        assert await counters() == (4.0, 3.0, 4)
