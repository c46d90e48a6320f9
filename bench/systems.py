"""The three process supervisors under test, each configured for the same N children.

Each adapter writes its own config file into a scratch directory and returns the argv that runs
the daemon in the foreground. Settings are chosen to be fair: no start grace period anywhere
(`start_seconds = 0`, `startsecs=0`, `warmup_delay = 0`), immediate restarts, children's output
discarded or drained, no extra HTTP/stats servers for the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SLEEP = ["sleep", "100000"]


@dataclass(frozen=True)
class Child:
    """One supervised program: its argv and, optionally, a metrics endpoint."""

    name: str
    argv: tuple[str, ...]
    metrics_url: str | None = None


@dataclass(frozen=True)
class System:
    """A supervisor to launch: `name` as printed, `kind` = ours | supervisord | circus."""

    name: str
    kind: str
    backend: str = ""
    cgroups: str = "off"  # ours: "auto" = a cgroup per service (where the machine allows)

    def launch_argv(self, workdir: Path, children: Sequence[Child], tools: Tools,
                    settings: dict[str, float]) -> list[str]:
        if self.kind == "ours":
            return _ours(workdir, children, tools, self.backend, settings, self.cgroups)
        if self.kind == "supervisord":
            return _supervisord(workdir, children, tools)
        if self.kind == "circus":
            return _circus(workdir, children, tools)
        raise ValueError(self.kind)


@dataclass(frozen=True)
class Tools:
    python: str  # the interpreter that has our `supervisor` package
    venv: Path | None  # throwaway virtualenv with supervisord and circus, if installed
    versions: dict[str, str]


def sleepers(n: int) -> list[Child]:
    return [Child(f"c{i}", tuple(SLEEP)) for i in range(n)]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _ours(workdir: Path, children: Sequence[Child], tools: Tools, backend: str,
          settings: dict[str, float], cgroups: str = "off") -> list[str]:
    lines = ["[supervisor]", f"cgroups = {_toml_str(cgroups)}",
             f'listen = "127.0.0.1:{int(settings["port"])}"',
             f"control_socket = {_toml_str(str(workdir / 'control.sock'))}",
             f"scrape_interval = {settings.get('scrape_interval', 5.0)}",
             f"stats_interval = {settings.get('stats_interval', 5.0)}", ""]
    for child in children:
        lines += [f"[services.{child.name}]",
                  "command = [" + ", ".join(_toml_str(a) for a in child.argv) + "]",
                  "start_seconds = 0.0",
                  "stop_timeout = 10.0",
                  # A run this long counts as stable, so a killed child restarts at once (the
                  # bench never kills a child younger than this).
                  f"backoff_reset_after = {settings['reset_after']}"]
        if child.metrics_url:
            lines.append(f"metrics_url = {_toml_str(child.metrics_url)}")
        lines.append("")
    path = workdir / "services.toml"
    path.write_text("\n".join(lines))
    return [tools.python, "-m", "supervisor", "run", "--config", str(path),
            "--backend", backend]


def _supervisord(workdir: Path, children: Sequence[Child], tools: Tools) -> list[str]:
    assert tools.venv is not None
    lines = ["[supervisord]", "nodaemon=true", f"logfile={workdir}/supervisord.log",
             f"pidfile={workdir}/supervisord.pid", f"childlogdir={workdir}",
             "minfds=4096", "minprocs=512", "",
             "[unix_http_server]", f"file={workdir}/supervisor.sock", "",
             "[rpcinterface:supervisor]",
             "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
             ""]
    for child in children:
        lines += [f"[program:{child.name}]", "command=" + " ".join(child.argv),
                  "startsecs=0", "autorestart=true", "stopwaitsecs=10",
                  "stdout_logfile=NONE", "stderr_logfile=NONE", ""]
    path = workdir / "supervisord.conf"
    path.write_text("\n".join(lines))
    return [str(tools.venv / "bin" / "supervisord"), "-n", "-c", str(path)]


def _circus(workdir: Path, children: Sequence[Child], tools: Tools) -> list[str]:
    assert tools.venv is not None
    lines = ["[circus]",
             # Circus notices dead children only by polling every check_delay (5 s by default
             # in ini files); 0.1 s reproduces the 45-80 ms restarts quoted in issue 6.
             "check_delay = 0.1",
             f"endpoint = ipc://{workdir}/endpoint",
             f"pubsub_endpoint = ipc://{workdir}/pubsub",
             f"stats_endpoint = ipc://{workdir}/stats",
             "statsd = False", "httpd = False", "loglevel = WARNING", ""]
    for child in children:
        lines += [f"[watcher:{child.name}]", f"cmd = {child.argv[0]}",
                  "args = " + " ".join(child.argv[1:]), "numprocesses = 1",
                  "warmup_delay = 0", "graceful_timeout = 10", ""]
    path = workdir / "circus.ini"
    path.write_text("\n".join(lines))
    return [str(tools.venv / "bin" / "circusd"), str(path)]


def prepare_venv(path: Path, install: bool) -> tuple[Path | None, dict[str, str], list[str]]:
    """Create (or reuse) a throwaway virtualenv with supervisord and circus from PyPI.

    Returns the venv (None when unusable), the installed versions and notes about failures.
    """
    notes: list[str] = []
    pip = path / "bin" / "pip"
    if not pip.exists():
        if not install:
            return None, {}, [f"no virtualenv at {path} (run without --no-install)"]
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
    for package in ("supervisor", "circus"):
        binary = path / "bin" / ("supervisord" if package == "supervisor" else "circusd")
        if binary.exists() or not install:
            continue
        result = subprocess.run([str(pip), "install", "-q", package],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            notes.append(f"pip install {package} failed: {result.stderr.strip()[-300:]}")
    versions: dict[str, str] = {}
    freeze = subprocess.run([str(pip), "list", "--format=json"], capture_output=True,
                            text=True, timeout=120)
    if freeze.returncode == 0:
        for row in json.loads(freeze.stdout):
            if row["name"].lower() in ("supervisor", "circus"):
                versions[row["name"].lower()] = row["version"]
    return path, versions, notes


def available(system: System, tools: Tools) -> bool:
    if system.kind == "ours":
        return True
    if tools.venv is None:
        return False
    binary = "supervisord" if system.kind == "supervisord" else "circusd"
    return os.access(tools.venv / "bin" / binary, os.X_OK)


ALL = (System("ours/asyncio", "ours", "asyncio"), System("ours/trio", "ours", "trio"),
       System("ours+cg/asyncio", "ours", "asyncio", "auto"),
       System("ours+cg/trio", "ours", "trio", "auto"),
       System("supervisord", "supervisord"), System("circus", "circus"))


def default_python() -> str:
    return sys.executable
