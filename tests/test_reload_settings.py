"""What a reload does with each [supervisor] key: applies it, or (restart-only keys) keeps the
running value and says so; and `cgroups = "required"`, which refuses to run without a cgroup
per service instead of falling back."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from supervisor.config import RELOADED, RESTART_ONLY, Settings, load_config
from supervisor.core.errors import ConfigError
from supervisor.core.lifecycle import State
from supervisor.process.cgroup import unified_mount
from tests.support import (
    LOAD_SLACK,
    SLEEPER_CODE,
    free_port,
    get,
    metrics_server,
    poll_until,
    sample,
    service,
    until,
    wait_for,
    write_config,
)
from tests.support import running_daemon as running


def test_every_setting_is_either_reloaded_or_restart_only() -> None:
    """A new [supervisor] key must be classified, or a reload would silently ignore it."""
    restart_only = {f for fields in RESTART_ONLY.values() for f in fields}
    every = {f.name for f in dataclasses.fields(Settings)}
    assert restart_only.isdisjoint(RELOADED)
    assert restart_only | RELOADED == every, every ^ (restart_only | RELOADED)


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                              text=True, timeout=60)

    return await anyio.to_thread.run_sync(run)


@pytest.mark.anyio
async def test_a_reload_names_the_restart_only_keys_it_did_not_apply(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="supervisor")
    port = free_port()
    path = write_config(tmp_path, service("api", SLEEPER_CODE), port=port)
    async with running(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        cgroup = daemon.snapshots["api"].cgroup
        text = path.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
        text = text.replace("[supervisor]\n", '[supervisor]\ncgroups = "off"\n'
                            'log_level = "debug"\nmax_connections = 7\n', 1)
        path.write_text(text)
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 0, result.stderr
        assert "restart needed: listen, cgroups, log_level, max_connections" in result.stdout
        for key in ("listen", "cgroups", "log_level", "max_connections"):
            assert any(f"[supervisor] {key} changes take effect on restart only" in r.message
                       for r in caplog.records), key
        # The running values are kept: the old port answers, the service stays contained
        # as it was, and nothing was restarted.
        assert (await get(daemon, "/v1/health")).status_code == 200
        assert daemon.snapshots["api"].cgroup == cgroup
        assert daemon.snapshots["api"].starts == 1
        # A reload that changes none of them says nothing of a restart.
        path.write_text(path.read_text() + service("extra", SLEEPER_CODE))
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 0 and "restart needed" not in result.stdout


@pytest.mark.anyio
async def test_a_reload_applies_a_new_scrape_interval(tmp_path: Path) -> None:
    body = tmp_path / "metrics.txt"
    body.write_text("# TYPE app_version gauge\napp_version 1\n")
    port = free_port()
    path = write_config(tmp_path, service("api", metrics_server(port, body),
                                          metrics_url=f"http://127.0.0.1:{port}/metrics"),
                        supervisor="scrape_interval = 3600.0\n")

    async def version(daemon: object) -> float | None:
        return sample((await get(daemon, "/v1/metrics")).text,  # type: ignore[arg-type]
                      "app_version", service="api")

    async with running(path) as daemon:
        await until(lambda: version(daemon), 10 * LOAD_SLACK, "first scrape")
        assert await version(daemon) == 1.0
        path.write_text(path.read_text().replace("scrape_interval = 3600.0",
                                                 "scrape_interval = 0.1"))
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 0, result.stderr
        assert "restart needed" not in result.stdout
        body.write_text("# TYPE app_version gauge\napp_version 2\n")
        # On the old interval this would be an hour away.
        async def updated() -> bool:
            return await version(daemon) == 2.0

        await until(updated, 10 * LOAD_SLACK, "a scrape on the reloaded interval")


def test_required_is_a_cgroups_mode_and_others_are_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE), supervisor='cgroups = "required"')
    assert load_config(path).settings.cgroups == "required"
    path.write_text(path.read_text().replace('"required"', '"on"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cgroups" in str(info.value) and "required" in str(info.value)


def _cgroup2_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    mounts = []
    while (mount := unified_mount(text)) is not None:
        mounts.append(mount)
        text = "\n".join(line for line in text.splitlines() if f" {mount} " not in line)
    return mounts


def _without_cgroup2() -> list[str] | None:
    """A command prefix that runs its command in a mount namespace with no cgroup2 mounted:
    a host without cgroups, made real here (root only)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or not _cgroup2_mounts():
        return None
    umounts = " && ".join(f"umount -l {m}" for m in _cgroup2_mounts())
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'{umounts} && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "grep", "-c", "cgroup2", "/proc/self/mountinfo"],
                           capture_output=True, text=True, timeout=30)
    return prefix if probe.stdout.strip() == "0" else None


NO_CGROUPS = _without_cgroup2()


@pytest.mark.skipif(NO_CGROUPS is None, reason="needs root and unshare to hide cgroup2")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_required_refuses_to_start_without_cgroups_and_auto_falls_back(
        tmp_path: Path, backend: str) -> None:
    assert NO_CGROUPS is not None
    marker = tmp_path / "started"
    code = f"open({str(marker)!r}, 'a').write('x')\n" + SLEEPER_CODE
    path = write_config(tmp_path, service("api", code), supervisor='cgroups = "required"')
    run = [*NO_CGROUPS, sys.executable, "-m", "supervisor", "run", "--config", str(path),
           "--backend", backend]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert '[supervisor] cgroups is "required"' in refused.stderr
    assert "no cgroup2 hierarchy mounted" in refused.stderr
    assert not marker.exists()  # nothing was started
    # The same host with "auto": the fallback, and the service runs.
    path.write_text(path.read_text().replace('"required"', '"auto"'))
    daemon = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert poll_until(marker.exists, 20 * LOAD_SLACK), "the service never started"
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert "no cgroup per service (fallback containment) reason=no cgroup2" in err


def test_the_configuration_reference_says_which_keys_need_a_restart() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines()
            if line.startswith("| `")}
    for key in RESTART_ONLY:
        assert "Changes apply on restart, not reload." in rows[key], key
    for key in ("scrape_interval", "stats_interval", "environment", "deny_metrics"):
        assert "restart, not reload" not in rows[key], key


@pytest.mark.anyio
async def test_a_reload_applies_a_new_stats_interval(tmp_path: Path) -> None:
    # The service forks a second process a moment after it starts: sampled every hour, the
    # count would stay what the first round saw.
    code = "import os, time\ntime.sleep(0.5)\nos.fork()\n" + SLEEPER_CODE
    path = write_config(tmp_path, service("api", code))
    path.write_text(path.read_text().replace("stats_interval = 0.5", "stats_interval = 3600.0"))

    async def processes(daemon: object) -> float | None:
        return sample((await get(daemon, "/v1/metrics")).text,  # type: ignore[arg-type]
                      "service_processes", service="api")

    async with running(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        path.write_text(path.read_text().replace("stats_interval = 3600.0",
                                                 "stats_interval = 0.2"))
        result = await cli("reload", "--config", str(path))
        assert result.returncode == 0 and "restart needed" not in result.stdout, result

        async def forked() -> bool:
            return await processes(daemon) == 2.0

        await until(forked, 10 * LOAD_SLACK, "a stats round on the reloaded interval")
