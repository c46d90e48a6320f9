"""systemd/platform-supervisor.service: systemd's verifier and security scorer, plus the contract.

`systemd-analyze verify` needs ExecStart's (and ExecReload's) executable to exist when it runs,
and /usr/local/bin/supervisor is only there after installation. The tests therefore verify a
copy whose Exec* program is rewritten to this test's Python interpreter; nothing else changes.
`verify` exits 0 even for values it rejects (`Type=notifyy`), so its stderr is the signal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.config import ServiceSpec

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "platform-supervisor.service"
INSTALLED_EXEC = "/usr/local/bin/supervisor"


def directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section; repeated keys keep every value."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unexpected time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"={INSTALLED_EXEC} ", f"={sys.executable} "))
    return copy


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze must be installed"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_verify_is_clean(unit_copy: Path) -> None:
    result = analyze("verify", unit_copy.name, cwd=unit_copy.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_stderr_does_catch_bad_values(unit_copy: Path) -> None:
    # Guards the test above: the same check must fail on a typo that verify exits 0 for.
    unit_copy.write_text(unit_copy.read_text().replace("Type=notify\n", "Type=notifyy\n"))
    result = analyze("verify", unit_copy.name, cwd=unit_copy.parent)
    assert "notifyy" in result.stderr


def test_security_exposure_at_most_2_5(unit_copy: Path) -> None:
    result = analyze("security", "--offline=true", unit_copy.name, cwd=unit_copy.parent)
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert m, result.stdout[-2000:]
    assert float(m.group(1)) <= 2.5, result.stdout


def test_service_contract() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert seconds(d["WatchdogSec"][0]) == 30
    config = "/etc/platform-supervisor/services.toml"
    assert d["ExecStart"] == [f"{INSTALLED_EXEC} run --config {config}"]
    # Waits for the daemon's verdict: a rejected file fails `systemctl reload`.
    assert d["ExecReload"] == [f"{INSTALLED_EXEC} reload --config {config}"]
    assert d["KillMode"] == ["mixed"]
    assert d["Restart"] == ["on-failure"]
    # Names Debian's supervisord package does not use (supervisor.service, /etc/supervisor,
    # /var/log/supervisor, /run/supervisor).
    assert UNIT.name == "platform-supervisor.service"
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory",
                "ConfigurationDirectory", "User", "Group"):
        assert d[key] == ["platform-supervisor"], key
    values = " ".join(v for vs in d.values() for v in vs)
    assert not re.search(r"/(etc|run|var/log|var/lib)/supervisor\b", values), values
    # ~3 fds per service: the default soft limit of 1024 would cap the daemon near 250.
    assert int(d["LimitNOFILE"][0].split(":")[0]) >= 16384
    # Services find the venv's interpreter first.
    (path_env,) = [e for e in d["Environment"] if e.startswith("PATH=")]
    assert path_env.split("=", 1)[1].split(":")[0] == "/opt/platform-supervisor/bin"
    # systemd must wait longer than the daemon's own graceful stop of a default service.
    assert seconds(d["TimeoutStopSec"][0]) >= 4 * ServiceSpec.stop_timeout
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectClock",
        "ProtectHostname",
        "ProtectKernelLogs",
        "ProtectKernelModules",
        "ProtectKernelTunables",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
    ):
        assert d.get(key) == ["yes"], key
    # A cgroup per service needs the unit's subtree delegated and writable (systemd 252's
    # ProtectControlGroups=yes makes all of /sys/fs/cgroup read-only, the subtree included).
    assert d["Delegate"] == ["yes"]
    assert d["ProtectControlGroups"] == ["no"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["SystemCallArchitectures"] == ["native"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["UMask"] == ["0077"]
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    # psutil must see the services' /proc entries.
    assert "ProtectProc" not in d
    assert "ProcSubset" not in d


def test_python_stack_survives_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes, emulated with the kernel's prctl(PR_SET_MDWE).

    systemd implements it as a seccomp filter; the kernel flag refuses the same W|X mappings.
    Exercises what the daemon loads: libffi closures (ctypes), psutil, both backends, a
    spawned child, and asyncpg's C extension against the real PostgreSQL.
    """
    code = textwrap.dedent(
        """
        import ctypes, mmap, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(f"prctl(PR_SET_MDWE) failed errno={ctypes.get_errno()}")
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except PermissionError:
            pass
        else:
            sys.exit("W|X mapping was allowed: MDWE not in effect")
        cmp = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
        arr = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
        libc.qsort(arr, 5, ctypes.sizeof(ctypes.c_int), cmp(lambda a, b: a[0] - b[0]))
        assert list(arr) == [1, 2, 3, 4, 5]
        import anyio, asyncpg, httpx, prometheus_client, psutil, redis, trio  # noqa
        import supervisor.config, supervisor.logs.setup, supervisor.control.notify  # noqa
        p = psutil.Process()
        with p.oneshot():
            p.cpu_times(); p.memory_info(); p.num_threads(); p.num_fds()
        async def spawn():
            proc = await anyio.run_process([sys.executable, "-c", "print(7)"])
            assert proc.stdout.strip() == b"7"
        async def pg():
            conn = await asyncpg.connect(
                host="127.0.0.1", port=5432, user="postgres", database="test", timeout=5)
            try:
                assert await conn.fetchval("SELECT 41 + 1") == 42
            finally:
                await conn.close()
        anyio.run(spawn, backend="asyncio")
        anyio.run(spawn, backend="trio")
        anyio.run(pg, backend="asyncio")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    # And the unit really asks for it.
    assert directives(UNIT.read_text())["MemoryDenyWriteExecute"] == ["yes"]


def test_ready_comment_says_when_ready_is_sent() -> None:
    """The unit's comment matches daemon.py: READY=1 after the listener, the control socket and
    the spawn of services without depends_on/wait_for; the others start afterwards."""
    text = UNIT.read_text()
    assert "READY=1 once every service is spawned" not in text
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    for words in ("control socket", "neither depends_on nor wait_for", "after READY=1"):
        assert words in comment, words
    daemon = (Path(__file__).resolve().parents[1] / "supervisor" / "daemon.py").read_text()
    run = daemon[daemon.index("async def run("):]
    order = [run.index(s) for s in ("services.spawn_independent(", "obs.serve(listener)",
                                    "serve_control", "services.start_all, self.services.dependent",
                                    'self.announce.send("ready")')]
    assert order == sorted(order)


def test_documentation_points_at_a_shipped_file() -> None:
    """Documentation= names the guide that pip installs with the package (wheel data files)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    (doc,) = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
              if line.startswith("Documentation=")]
    assert doc.startswith("file:///opt/platform-supervisor/share/doc/platform-supervisor/")
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    data_files = pyproject["tool"]["setuptools"]["data-files"]
    shipped = {f"{target}/{Path(pattern).name}" for target, patterns in data_files.items()
               for pattern in patterns}
    assert doc.removeprefix("file:///opt/platform-supervisor/") in shipped
    assert (root / "docs" / Path(doc).name).is_file()
