"""docs/operator-guide.md's install steps, word for word, under a temporary prefix.

Every line of the guide's first `sh` block under "## Install" runs in a copy of this checkout,
with absolute paths (/opt, /etc, /usr/local/bin, /var, /run) moved under the prefix. Only what
needs a real systemd and root is replaced: `useradd` is skipped (the daemon runs as the test's
user), `systemctl daemon-reload` is skipped, and `systemctl enable --now platform-supervisor`
runs the installed unit's ExecStart= with its Environment= lines and the *_DIRECTORY variables
systemd would set, and nothing else from the test's environment (so the services find their
interpreter through the unit's PATH, or not at all). The one edit an operator would not make:
the shipped ports are moved to free ones, since other tests share this machine.

Then the daemon must be running with all four stand-ins, /v1/ready 200, and the unit's
ExecReload= must succeed on a valid file and fail on a rejected one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, poll_until

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "operator-guide.md"
SHIM = Path(__file__).with_name("subreaper_shim.py")
UNIT_NAME = "platform-supervisor.service"
SERVICES = ("event-writer", "api", "observer", "watchdog")
_ABSOLUTE = re.compile(r"(?<![\w./-])/(opt|etc|usr/local/bin|var|run)(?=/|\b)")

# pip builds and installs the package (about 10-20 s here); the default 120 s per test is tight
# on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def install_steps() -> list[str]:
    text = GUIDE.read_text()
    section = text[text.index("\n## Install\n"):]
    m = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert m, "no sh block under ## Install"
    return [line for line in m.group(1).splitlines() if line.strip()]


def moved(text: str, prefix: Path) -> str:
    return _ABSOLUTE.sub(lambda m: f"{prefix}/{m.group(1)}", text)


def unit_directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}{key}", []).append(value)
    return out


def unit_environment(unit: dict[str, list[str]], prefix: Path) -> dict[str, str]:
    """What systemd gives ExecStart=/ExecReload=: its default PATH, Environment=, and the
    directories of RuntimeDirectory= & co (created, as systemd does)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8"}
    for line in unit.get("[Service]Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = moved(value, prefix)
    for key, base in (("RuntimeDirectory", "run"), ("StateDirectory", "var/lib"),
                      ("LogsDirectory", "var/log"), ("ConfigurationDirectory", "etc")):
        (name,) = unit[f"[Service]{key}"]
        directory = prefix / base / name
        directory.mkdir(parents=True, exist_ok=True)
        # With the unit's mode, as systemd does (the daemon refuses a runtime directory that
        # other users can reach).
        (mode,) = unit.get(f"[Service]{key}Mode", ["0755"])
        directory.chmod(int(mode, 8))
        env[key.upper().replace("DIRECTORY", "_DIRECTORY")] = str(directory)
    env["HOME"] = env["STATE_DIRECTORY"]
    return env


def free_the_shipped_ports(config: Path) -> str:
    text = config.read_text()
    daemon = free_port()
    assert "127.0.0.1:9464" in text
    text = text.replace("127.0.0.1:9464", f"127.0.0.1:{daemon}")
    for i in range(1, 5):
        assert f"127.0.0.1:808{i}" in text
        text = text.replace(f"127.0.0.1:808{i}", f"127.0.0.1:{free_port()}")
    config.write_text(text)
    return f"http://127.0.0.1:{daemon}"


class Daemon:
    """ExecStart= under a subreaper (tests/subreaper_shim.py), stopped with SIGTERM."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.shim = subprocess.Popen([sys.executable, str(SHIM), "2", *argv], env=env,
                                         stdout=subprocess.PIPE, stderr=out, text=True,
                                         start_new_session=True, cwd="/")
        assert self.shim.stdout is not None
        first = self.shim.stdout.readline()
        assert first.startswith("pid "), first
        self.pid = int(first.split()[1])

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]

    def running(self) -> bool:
        return self.shim.poll() is None

    def stop(self) -> tuple[str, str]:
        """SIGTERM to the daemon; the shim's `exit` and `leftover` lines."""
        if self.shim.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            out, _ = self.shim.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.shim.pid, signal.SIGKILL)
            out, _ = self.shim.communicate(timeout=10)
        lines: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            lines[key] = value.strip()
        return lines.get("exit", "?"), lines.get("leftover", "?")


@pytest.fixture
def prefix() -> Iterator[Path]:
    # Short: the control socket lives under it, and Unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sv-inst-"))
    # What a Debian machine already has.
    for directory in ("opt", "usr/local/bin", "etc/systemd/system", "var/lib", "var/log", "run"):
        (path / directory).mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_guides_install_steps_yield_a_running_daemon(prefix: Path) -> None:
    checkout = prefix / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
        ".ruff_cache"))
    shell_env = {k: v for k, v in os.environ.items()
                 if k not in ("VIRTUAL_ENV", "PYTHONPATH", "DATABASE_URL", "REDIS_URL",
                              "ENVIRONMENT", "NOTIFY_SOCKET", "JOURNAL_STREAM",
                              "SUPERVISOR_JOURNAL_SOCKET")}
    # The operator's shell: not this test's venv.
    shell_env["PATH"] = ":".join(p for p in shell_env.get("PATH", "/usr/bin:/bin").split(":")
                                 if not p.startswith(str(Path(sys.executable).parent)))
    steps = install_steps()
    assert steps[-1] == "systemctl enable --now platform-supervisor", steps
    daemon: Daemon | None = None
    url = ""
    for step in steps:
        if step.startswith("useradd "):
            continue  # runs as the test's user
        if step == "systemctl daemon-reload":
            continue
        if step == "systemctl enable --now platform-supervisor":
            # The operator's one edit here: ports free on a shared machine.
            url = free_the_shipped_ports(prefix / "etc" / "platform-supervisor" / "services.toml")
            unit = unit_directives(prefix / "etc" / "systemd" / "system" / UNIT_NAME)
            env = unit_environment(unit, prefix)
            (exec_start,) = unit["[Service]ExecStart"]
            daemon = Daemon(shlex.split(moved(exec_start, prefix)), env, prefix / "daemon.log")
            continue
        assert not step.startswith(("systemctl", "sudo")), f"unexpected step {step!r}"
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", moved(step, prefix)],
                                cwd=checkout, env=shell_env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{step}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert daemon is not None
    try:
        supervisor = prefix / "usr" / "local" / "bin" / "supervisor"
        config = prefix / "etc" / "platform-supervisor" / "services.toml"

        def status() -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(supervisor), "status", "--config", str(config)],
                                  env=env, capture_output=True, text=True, timeout=30)

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        def all_running() -> bool:
            return daemon is not None and daemon.running() and status().returncode == 0

        assert poll_until(all_running, timeout=90, interval=0.5), (
            status().stdout + status().stderr + daemon.output())
        table = status().stdout
        for name in SERVICES:
            assert re.search(rf"^{re.escape(name)}\s+running\b", table, flags=re.M), table
        assert poll_until(ready, timeout=60, interval=0.5), httpx.get(f"{url}/v1/ready").text
        # No service fell back to an interpreter without its dependencies.
        assert "ModuleNotFoundError" not in daemon.output()

        # Documentation= points at a file the install put there.
        (doc,) = unit["[Unit]Documentation"]
        assert doc.startswith("file://")
        assert Path(moved(doc.removeprefix("file://"), prefix)).is_file()

        # ExecReload=: `systemctl reload` succeeds on a valid file, fails on a rejected one.
        (exec_reload,) = unit["[Service]ExecReload"]
        reload_argv = shlex.split(moved(exec_reload, prefix))
        result = subprocess.run(reload_argv, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        config.write_text(config.read_text() + "\n[services.broken]\nrestart = \"sometimes\"\n")
        result = subprocess.run(reload_argv, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "services.broken" in result.stderr
        # Everything still running (the file is broken now: ask the daemon's address directly).
        still = subprocess.run([str(supervisor), "status", "--url", url], env=env,
                               capture_output=True, text=True, timeout=30)
        assert still.returncode == 0, still.stdout + still.stderr
    finally:
        code, leftover = daemon.stop()
    assert code == "0", daemon.output()
    assert leftover == "", leftover
