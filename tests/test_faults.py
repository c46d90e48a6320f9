"""Issue 12: no service, config value or fault takes the daemon down or makes it lie.

A crash loop past 1,100 quick failures, unexpected errors at a service's boundary (a spawn, a
lifecycle step), honest `waiting` states with `supervisor start` refusing unsatisfied
dependencies, and sd_notify STATUS= following state changes. Both backends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import daemon as daemon_module
from supervisor.core import lifecycle as lc
from supervisor.core.lifecycle import State
from supervisor.process.spawn import Child
from tests.support import (
    PY,
    SLEEPER_CODE,
    free_port,
    get,
    poll_until,
    receive_notify,
    running_daemon,
    sample,
    service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio
FALSE = shutil.which("false") or "/bin/false"  # exits 1 at once


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                              text=True, timeout=60)

    return await anyio.to_thread.run_sync(run)


def flagged(flag: Path) -> list[str]:
    """A command that exits 1 at once while `flag` is missing, and sleeps once it exists. sh
    decides within milliseconds; a Python interpreter, under a CPU hog, took longer than the
    service's start_seconds just to start, so the failing service counted as running and its
    dependents started."""
    return ["sh", "-c", 'test -f "$1" || exit 1; exec "$2" -c "$3"', "flagged", str(flag), PY,
            SLEEPER_CODE]


def raw_service(name: str, command: list[str], **keys: object) -> str:
    lines = [f"[services.{name}]", f"command = {json.dumps(command)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


async def assert_healthy(daemon: daemon_module.Daemon) -> None:
    response = await get(daemon, "/v1/health")
    assert response.status_code == 200, response.text


# -- defect 1: a crash loop ------------------------------------------------------------------
async def test_crash_loop_past_1100_quick_failures_keeps_the_daemon_up(tmp_path: Path) -> None:
    """Before the fix, the 1,025th quick failure raised OverflowError out of the daemon."""
    path = write_config(tmp_path, raw_service("loop", [FALSE], backoff_initial=0.0001,
                                              backoff_max=0.0002, backoff_jitter=0.0)
                        + service("steady", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "steady", lambda s: s.state is State.RUNNING)
        steady_pid = daemon.snapshots["steady"].pid
        snap = await wait_for(daemon, "loop", lambda s: s.exits["failure"] > 1100, timeout=90)
        assert snap.quick_failures > 1100
        await assert_healthy(daemon)
        metrics = (await get(daemon, "/v1/metrics")).text
        assert (sample(metrics, "service_exits_total", service="loop", reason="failure") or 0
                ) > 1100
        assert daemon.snapshots["steady"].pid == steady_pid  # the others go on untouched
        backoff = sample(metrics, "service_restart_backoff_seconds", service="loop")
        assert backoff is not None and backoff <= 0.0002


# -- one service never takes the daemon down ----------------------------------------------
async def test_unexpected_spawn_error_makes_only_that_service_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from supervisor.process.spawn import spawn as real_spawn

    calls = {"bad": 0}

    def faulty_spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
        if "BAD-SERVICE" in argv[-1]:
            calls["bad"] += 1
            raise RuntimeError("injected spawn fault")
        return real_spawn(argv, env, cwd)

    path = write_config(tmp_path, service("bad", "# BAD-SERVICE\n" + SLEEPER_CODE)
                        + service("good", SLEEPER_CODE, start_seconds=0.1))
    with caplog.at_level(logging.ERROR, logger="supervisor"):
        async with running_daemon(path, spawner=faulty_spawn) as daemon:
            snap = await wait_for(daemon, "bad", lambda s: s.state is State.FATAL)
            assert snap.last_error is not None and "RuntimeError" in snap.last_error
            assert "injected spawn fault" in snap.last_error
            await wait_for(daemon, "good", lambda s: s.state is State.RUNNING)
            await assert_healthy(daemon)
            status = (await get(daemon, "/v1/status")).json()
            bad = next(s for s in status["services"] if s["name"] == "bad")
            assert bad["state"] == "fatal" and "injected spawn fault" in bad["last_error"]
            metrics = (await get(daemon, "/v1/metrics")).text
            assert sample(metrics, "service_state", service="bad", state="fatal") == 1.0
            assert sample(metrics, "service_up", service="good") == 1.0
            # An operator's start tries again (and is contained again).
            result = await cli("start", "bad", "--socket", daemon.control_socket)
            assert "bad: fatal" in result.stdout and "Traceback" not in result.stderr
            assert calls["bad"] == 2
            await assert_healthy(daemon)
    assert "service failed unexpectedly service=bad state=fatal" in caplog.text
    assert "injected spawn fault" in caplog.text


async def test_unexpected_lifecycle_error_is_contained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lifecycle step raising (here: on the exit of one service) kills what that service
    left, makes it fatal, and leaves the daemon and the other services running."""
    real_exited = lc.Lifecycle._exited

    def faulty_exited(self: lc.Lifecycle, event: lc.Exited) -> list[lc.Action]:
        if self.policy.name == "crashy":
            raise ValueError("injected lifecycle fault")
        return real_exited(self, event)

    monkeypatch.setattr(lc.Lifecycle, "_exited", faulty_exited)
    grandchild = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(0.3)\nsys.exit(3)\n")
    path = write_config(tmp_path, service("crashy", code, start_seconds=0.1)
                        + service("good", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        good = await wait_for(daemon, "good", lambda s: s.state is State.RUNNING)
        snap = await wait_for(daemon, "crashy", lambda s: s.state is State.FATAL)
        assert snap.last_error is not None and "injected lifecycle fault" in snap.last_error
        assert snap.pid is None
        # What the service left in its process group went with it.
        leftover = int(grandchild.read_text())
        assert await anyio.to_thread.run_sync(
            lambda: poll_until(lambda: not _alive(leftover), 10))
        await assert_healthy(daemon)
        assert daemon.snapshots["good"].pid == good.pid
        assert daemon.snapshots["good"].state is State.RUNNING


async def test_a_stop_that_lands_while_a_spawn_fails_stops_the_service(tmp_path: Path) -> None:
    """Stop queued ahead of a failed spawn's SpawnFailed (the lifecycle table's
    `stopping/no-pid`): the service ends `stopped`. It used to restart as after a failure, so
    a stop (and the daemon's shutdown) could wait on a crash loop."""
    from supervisor.config import ServiceSpec
    from supervisor.process.spawn import spawn
    from supervisor.runner import ServiceRunner

    def stop_then_spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
        runner.stop()  # an operator's stop, queued while this spawn is under way
        return spawn(argv, env, cwd)  # a real failure: there is no such program

    spec = ServiceSpec(name="gone", command=(str(tmp_path / "no-such-program"),), env={},
                       cwd=str(tmp_path), start_seconds=0.1)
    runner = ServiceRunner(spec, environ=dict(os.environ), publish=lambda s: None,
                           spawner=stop_then_spawn)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        runner.start()
        with anyio.fail_after(10):
            snap = await runner.wait_until(
                lambda s: s.last_exit is not None and s.state in lc.SETTLED_STATES)
        assert snap.state is State.STOPPED, snap
        assert snap.last_exit is not None and snap.last_exit.reason == "spawn_error"
        assert snap.exits["spawn_error"] == 1 and snap.starts == 0
        assert snap.last_error is not None and "no-such-program" in snap.last_error
        tg.cancel_scope.cancel()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- defect 9: honest states ---------------------------------------------------------------
async def test_dependency_fatal_shows_waiting_and_start_refuses(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flag = tmp_path / "db-may-run"
    path = write_config(tmp_path, raw_service("db", flagged(flag), start_seconds=1.0,
                                              max_retries=0)
                        + service("api", SLEEPER_CODE, start_seconds=0.1, depends_on=["db"]))
    with caplog.at_level(logging.INFO, logger="supervisor"):
        async with running_daemon(path) as daemon:
            await wait_for(daemon, "db", lambda s: s.state is State.FATAL)
            snap = await wait_for(daemon, "api", lambda s: s.state is State.WAITING
                                  and s.waiting_for == "dependency db is fatal")
            assert snap.pid is None
            shown = await cli("status", "--config", str(path))
            assert shown.returncode == 3
            rows = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines()[1:3]}
            assert rows == {"db": "fatal", "api": "waiting"}
            assert "api: waiting for dependency db is fatal" in shown.stdout
            document = (await get(daemon, "/v1/status")).json()
            api = next(s for s in document["services"] if s["name"] == "api")
            assert api["state"] == "waiting" and api["waiting_for"] == "dependency db is fatal"
            metrics = (await get(daemon, "/v1/metrics")).text
            assert sample(metrics, "service_state", service="api", state="waiting") == 1.0
            assert sample(metrics, "service_state", service="api", state="stopped") == 0.0
            # `start` refuses, naming the dependency; nothing changes.
            refused = await cli("start", "api", "--config", str(path))
            assert refused.returncode == 1
            assert "api needs db (fatal)" in refused.stderr, refused.stderr
            assert daemon.snapshots["api"].state is State.WAITING
            # Naming the dependency too starts it first; while it fails, api is not started.
            began = time.monotonic()
            failed = await cli("start", "db", "api", "--config", str(path))
            assert failed.returncode == 1
            assert "db: fatal" in failed.stdout and "api: waiting" in failed.stdout
            assert time.monotonic() - began < 8  # not held for the whole request bound
            assert daemon.snapshots["api"].starts == 0
            flag.write_text("")
            started = await cli("start", "db", "api", "--config", str(path))
            assert started.returncode == 0, started.stdout + started.stderr
            assert "api: running" in started.stdout and "db: running" in started.stdout
            db_snap, api_snap = daemon.snapshots["db"], daemon.snapshots["api"]
            assert db_snap.started_at is not None and api_snap.started_at is not None
            assert db_snap.started_at < api_snap.started_at
            assert api_snap.starts == 1  # the held-back autostart did not spawn it again
    assert "waiting service=api reason=dependency db is fatal" in caplog.text


async def test_waiting_service_starts_by_itself_unless_stopped(tmp_path: Path) -> None:
    flag = tmp_path / "db-may-run"
    path = write_config(tmp_path, raw_service("db", flagged(flag), start_seconds=1.0,
                                              backoff_initial=0.05, backoff_max=0.1)
                        + service("api", SLEEPER_CODE, start_seconds=0.1, depends_on=["db"])
                        + service("web", SLEEPER_CODE, start_seconds=0.1, depends_on=["db"]))
    async with running_daemon(path) as daemon:
        # A crash-looping dependency: one steady reason, not one per backoff round.
        await wait_for(daemon, "api", lambda s: s.waiting_for == "dependency db is not "
                       "running yet")
        stopped = await cli("stop", "web", "--config", str(path))
        assert stopped.returncode == 0 and "web: stopped" in stopped.stdout
        flag.write_text("")
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        await anyio.sleep(0.3)
        assert daemon.snapshots["web"].state is State.STOPPED  # the operator's stop stands
        assert daemon.snapshots["web"].starts == 0


# -- defect 9: STATUS= follows state changes ------------------------------------------------
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_notify_status_follows_state_changes_within_a_second(tmp_path: Path,
                                                             backend: str) -> None:
    port = free_port()
    sock_dir = tempfile.mkdtemp(prefix="sv-")
    path = tmp_path / "services.toml"
    path.write_text(f'[supervisor]\nlisten = "127.0.0.1:{port}"\nstats_interval = 60\n'
                    f'control_socket = "{sock_dir}/control.sock"\n'
                    + service("api", SLEEPER_CODE, start_seconds=0.5))
    sock_path = Path(tempfile.mkdtemp(prefix="sv-n-")) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(path),
                               "--backend", backend], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    try:
        ready = receive_notify(sock, "STATUS=1 starting", 20)
        # running after start_seconds (0.5 s). stats_interval is 60 s, so a STATUS= sent only
        # with the periodic update would come a minute later: the bounds tell the two apart
        # with the margin a loaded machine needs (it can hold a process back for seconds).
        running = receive_notify(sock, "STATUS=1 running", 10)
        assert running - ready < 5.0
        done = subprocess.run([sys.executable, "-m", "supervisor", "stop", "api", "--config",
                               str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        # `stop` returns once api is stopped; its STATUS= follows the change, not the minute.
        stopped = time.monotonic()
        assert receive_notify(sock, "STATUS=1 stopped", 10) - stopped < 5.0
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        sock.close()


class CountingNotifier:
    def __init__(self) -> None:
        self.statuses: list[tuple[float, str]] = []

    def ready(self) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...

    def status(self, text: str) -> None:
        self.statuses.append((time.monotonic(), text))


async def test_notify_status_is_rate_limited_when_services_flap(tmp_path: Path) -> None:
    services = "".join(raw_service(f"flap{i}", [FALSE], backoff_initial=0.02, backoff_max=0.05)
                       for i in range(20))
    path = write_config(tmp_path, services)
    notifier = CountingNotifier()
    async with running_daemon(path, notifier=notifier) as daemon:
        begin = time.monotonic()
        await wait_for(daemon, "flap0", lambda s: s.exits["failure"] >= 20)
        await anyio.sleep(1.0)
        elapsed = time.monotonic() - begin
        changes = sum(s.starts for s in daemon.snapshots.values())
        sent = [t for t, _ in notifier.statuses if t >= begin]
    assert changes > 100  # hundreds of state changes...
    # ...and at most one STATUS= per 0.2 s (plus the periodic one per stats_interval 0.5 s).
    assert len(sent) <= elapsed / 0.2 + elapsed / 0.5 + 3, (len(sent), elapsed)


async def test_unexpected_error_in_a_runner_task_is_contained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task of the runner (here: the output drain of one service) raising."""
    from supervisor import runner as runner_module
    real_drain = runner_module.drain

    async def faulty_drain(fd: int, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "leaky":
            os.close(fd)
            raise OSError("injected drain fault")
        await real_drain(fd, name, *args, **kwargs)

    monkeypatch.setattr(runner_module, "drain", faulty_drain)
    path = write_config(tmp_path, service("leaky", SLEEPER_CODE, start_seconds=0.1)
                        + service("good", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "leaky", lambda s: s.state is State.FATAL)
        assert snap.last_error is not None and "injected drain fault" in snap.last_error
        await wait_for(daemon, "good", lambda s: s.state is State.RUNNING)
        await assert_healthy(daemon)
        monkeypatch.setattr(runner_module, "drain", real_drain)
        result = await cli("start", "leaky", "--socket", daemon.control_socket)
        assert result.returncode == 0 and "leaky: running" in result.stdout
