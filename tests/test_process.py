"""The daemon as operators run it: `python -m supervisor run`, under a subreaper of the test's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import LOAD_SLACK, SLEEPER_CODE, free_port, service, write_config

SHIM = Path(__file__).with_name("subreaper_shim.py")


def start(path: Path, backend: str, linger: float) -> tuple[subprocess.Popen[str], int]:
    shim = subprocess.Popen(
        [sys.executable, str(SHIM), str(linger), sys.executable, "-m", "supervisor", "run",
         "--config", str(path), "--backend", backend],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert shim.stdout is not None
    line = shim.stdout.readline()
    assert line.startswith("pid "), line
    return shim, int(line.split()[1])


def wait_running(port: int, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            services = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=2).json()["services"]
            if sum(s["state"] == "running" for s in services) == count:
                return services  # type: ignore[no-any-return]
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("services did not reach running")


def finish(shim: subprocess.Popen[str]) -> tuple[int, list[int]]:
    out, _ = shim.communicate(timeout=60)
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
    return int(lines["exit"]), [int(p) for p in lines.get("leftover", "").split()]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_stops_everything_and_exits_0(tmp_path: Path, backend: str) -> None:
    port = free_port()
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.2)
                        + "[services.family]\n"
                          'command = ["sh", "-c", "sleep 300 & sleep 300 & wait"]\n'
                          "start_seconds = 0.2\n", port=port)
    shim, daemon_pid = start(path, backend, linger=10.0)
    try:
        wait_running(port, 2)
        descendants = [p.pid for p in psutil.Process(daemon_pid).children(recursive=True)]
        assert len(descendants) >= 4  # api, sh, two sleeps
        os.kill(daemon_pid, signal.SIGTERM)
        code, leftover = finish(shim)
    finally:
        shim.kill()
    assert code == 0
    assert leftover == []
    assert not [pid for pid in descendants if psutil.pid_exists(pid)]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigkill_of_the_daemon_leaves_no_service_behind(tmp_path: Path, backend: str) -> None:
    port = free_port()
    path = write_config(tmp_path, "".join(
        service(f"s{i}", SLEEPER_CODE, start_seconds=0.2) for i in range(3)), port=port)
    shim, daemon_pid = start(path, backend, linger=10.0)
    try:
        services = wait_running(port, 3)
        pids = [int(s["pid"]) for s in services]  # type: ignore[call-overload]
        os.kill(daemon_pid, signal.SIGKILL)
        code, leftover = finish(shim)
    finally:
        shim.kill()
    assert code == -signal.SIGKILL
    assert leftover == []  # PR_SET_PDEATHSIG took every service down with the daemon
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_daemon_refuses_a_taken_port_without_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, service("api", SLEEPER_CODE), port=port)
        result = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# The daemon as the CLI runs it, told to stop at its first spawn, reports what it had imported
# then and whether the collector was on.
FIRST_SPAWN = """\
import gc, json, os, signal, sys
import supervisor.daemon as daemon
from supervisor import cli
real, seen = daemon.spawn, []
def first(*args, **kwargs):
    if not seen:
        seen.append({"modules": sorted(sys.modules), "gc": gc.isenabled()})
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
daemon.spawn = first
code = cli.main(["run", "--config", sys.argv[1], "--backend", sys.argv[2]])
print(json.dumps({"code": code, "first_spawn": seen[0] if seen else None, "gc": gc.isenabled()}))
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_services_spawn_before_the_http_stack_and_without_collections(
        tmp_path: Path, backend: str) -> None:
    """The daemon spawns its services before importing prometheus_client, wsgiref, psutil or
    httpx (about 80 ms), on trio before asyncio too (with ssl, ~14 ms), and with the collector
    off (its collections took 20-40 ms of a 200-service startup); the collector is back on
    once the daemon is up, or has ended."""
    path = write_config(tmp_path, service("api", SLEEPER_CODE))
    out = subprocess.run([sys.executable, "-c", FIRST_SPAWN, str(path), backend],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    report = json.loads(out.splitlines()[-1])
    assert report["code"] == 0 and report["gc"] is True
    first = report["first_spawn"]
    heavy = ["prometheus_client", "wsgiref", "psutil", "httpx", "supervisor.web.http",
             "supervisor.observability", *(["asyncio"] if backend == "trio" else [])]
    assert [m for m in heavy if m in first["modules"]] == []
    assert first["gc"] is False


def test_services_start_with_default_signal_dispositions(tmp_path: Path) -> None:
    """Started with SIGHUP and SIGUSR1 ignored (nohup, some CI runners), the daemon still
    gives its services default dispositions, as systemd does: SIG_IGN would survive exec."""
    port = free_port()
    report = tmp_path / "sigign"
    probe = (f"import subprocess\n"  # a shell's view: Python itself ignores SIGPIPE
             f"subprocess.run(['sh', '-c', 'grep SigIgn /proc/self/status > {report}.tmp && "
             f"mv {report}.tmp {report}'], check=True)\n"
             "import time\n"
             "while True: time.sleep(1)\n")
    path = write_config(tmp_path, service("probe", probe), port=port)

    def ignore_some() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    daemon = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=ignore_some)
    try:
        deadline = time.monotonic() + 20
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mask = int(report.read_text().split()[1], 16)
    finally:
        daemon.terminate()
        daemon.wait(20)
    assert mask & (1 << (signal.SIGHUP - 1)) == 0
    assert mask & (1 << (signal.SIGUSR1 - 1)) == 0


def _sig_masks(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["SigBlk"], 16), int(fields["SigIgn"], 16)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_inherited_blocked_mask_is_cleared(tmp_path: Path, backend: str) -> None:
    """Started with SIGTERM, SIGHUP, SIGUSR1 and SIGCHLD blocked (the mask survives execve)
    and SIGUSR2 ignored, the daemon still stops on SIGTERM, and its services start with an
    empty mask and default dispositions (SigBlk 0, SigIgn 0: `sleep` ignores nothing)."""
    port = free_port()
    path = write_config(tmp_path, '[services.plain]\ncommand = ["sleep", "300"]\n'
                                  "start_seconds = 0.1\n", port=port)
    blocked = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
    wrapper = ("import os, signal, sys\n"
               f"signal.pthread_sigmask(signal.SIG_BLOCK, {[int(s) for s in blocked]})\n"
               "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    shim = subprocess.Popen(
        [sys.executable, str(SHIM), "0.5", sys.executable, "-c", wrapper, "-m", "supervisor",
         "run", "--config", str(path), "--backend", backend],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert shim.stdout is not None
        daemon_pid = int(shim.stdout.readline().split()[1])
        services = wait_running(port, 1)
        child = int(services[0]["pid"])  # type: ignore[call-overload]
        assert _sig_masks(child) == (0, 0)
        os.kill(daemon_pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(daemon_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            os.kill(daemon_pid, signal.SIGKILL)
            raise AssertionError("the daemon ignored SIGTERM")
        code, leftover = finish(shim)
    finally:
        shim.kill()
        shim.wait(10)
    assert code == 0
    assert leftover == []


def _zombie_of(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] == "Z" and int(stat[1]) == parent


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_adopted_orphans_are_reaped_as_they_exit(tmp_path: Path, backend: str) -> None:
    """A service leaves 100 orphans behind (their parent exits at once); the daemon, their
    subreaper, reaps each within about a second of its exit, long before the next stats round
    (stats_interval = 300 s): reaping follows SIGCHLD, not a timer."""
    port = free_port()
    pids_file = tmp_path / "orphans"
    code = f"""
        import os, time
        if os.fork() == 0:
            pids = []
            for _ in range(100):
                pid = os.fork()
                if pid == 0:
                    time.sleep(1.5)  # their parent is long gone by then: adopted by the daemon
                    os._exit(0)
                pids.append(pid)
            with open({str(pids_file)!r} + ".tmp", "w") as f:
                f.write(" ".join(map(str, pids)))
            os.rename({str(pids_file)!r} + ".tmp", {str(pids_file)!r})
            os._exit(0)
        os.wait()
        while True: time.sleep(1)
        """
    path = write_config(tmp_path, service("forker", code, start_seconds=0.1), port=port)
    path.write_text(path.read_text().replace("stats_interval = 0.5", "stats_interval = 300"))
    shim, daemon_pid = start(path, backend, linger=10.0)
    try:
        deadline = time.monotonic() + 20
        while not pids_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        orphans = [int(p) for p in pids_file.read_text().split()]
        assert len(orphans) == 100
        # Wait for every orphan to have exited (alive means neither gone nor a zombie) ...
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                psutil.pid_exists(p) and not _zombie_of(p, daemon_pid) for p in orphans):
            time.sleep(0.01)
        exited = time.monotonic()
        # ... then for the daemon to reap them: about a second, not a stats interval.
        while time.monotonic() < exited + 20 and any(_zombie_of(p, daemon_pid) for p in orphans):
            time.sleep(0.01)
        took = time.monotonic() - exited
        zombies = [p for p in orphans if _zombie_of(p, daemon_pid)]
        os.kill(daemon_pid, signal.SIGTERM)
        code_, leftover = finish(shim)
    finally:
        shim.kill()
        shim.wait(10)
    assert zombies == []
    # About a second on a quiet machine; the bound adds a loaded machine's margin and stays
    # far from the 300 s stats interval a timer-driven reaper would wait for.
    assert took < 2.0 + LOAD_SLACK, f"orphans reaped {took:.2f} s after they exited"
    assert code_ == 0 and leftover == []


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_orphan_reaper_never_takes_a_services_exit(tmp_path: Path, backend: str) -> None:
    """SIGCHLD wakes the orphan reaper at every exit of a service too: it must leave those to
    their runners, so exit codes stay exact while it runs (a second reaper racing the pidfd
    watchers turned `exit 3` into 255 or 0)."""
    port = free_port()
    path = write_config(tmp_path, """
[services.three]
command = ["sh", "-c", "exit 3"]
start_seconds = 0
backoff_initial = 0.001
backoff_max = 0.005
[services.orphans]
command = ["sh", "-c", "(sleep 0.01 &) ; (sleep 0.02 &) ; exit 0"]
start_seconds = 0
backoff_initial = 0.001
backoff_max = 0.005
""", port=port)
    shim, daemon_pid = start(path, backend, linger=10.0)
    try:
        deadline = time.monotonic() + 30
        three: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                services = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=2).json()
                three = next(s for s in services["services"] if s["name"] == "three")
                if int(three["starts"]) >= 60:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        metrics = httpx.get(f"http://127.0.0.1:{port}/v1/metrics", timeout=5).text
        os.kill(daemon_pid, signal.SIGTERM)
        code, leftover = finish(shim)
    finally:
        shim.kill()
        shim.wait(10)
    assert int(three["starts"]) >= 60  # type: ignore[call-overload]
    assert three["last_exit"] == {**three["last_exit"], "code": 3}  # type: ignore[dict-item]
    from tests.support import sample

    assert sample(metrics, "service_exits_total", service="three", reason="signal") == 0
    assert sample(metrics, "service_exits_total", service="three", reason="success") == 0
    assert sample(metrics, "service_exits_total", service="orphans", reason="failure") == 0
    assert sample(metrics, "service_exits_total", service="orphans", reason="signal") == 0
    assert code == 0 and leftover == []


def _alive(pid: int) -> bool:
    """Not exited (a zombie counts as exited). The shim may reap it between two looks."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
