"""Every metric name the dashboard, alerts and docs rely on is one a live daemon really exports."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.core.lifecycle import State
from supervisor.daemon import Daemon
from tests.support import SLEEPER_CODE, get, running_daemon, service, wait_for, write_config
from tests.test_dashboard import EXPORTED

pytestmark = pytest.mark.anyio

# Attached by Prometheus itself to every target, not by the daemon.
FROM_PROMETHEUS = {"up"}


async def exported_labels(daemon: Daemon) -> dict[str, set[str]]:
    """Each sample name on /v1/metrics with the label names it carries."""
    exported: dict[str, set[str]] = {}
    text = (await get(daemon, "/v1/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


async def test_live_daemon_exports_every_documented_name(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[checks.redis]
type = "redis"
url = "redis://127.0.0.1:6379/0"
interval = 0.3
""" + service("api", SLEEPER_CODE, start_seconds=0.1, metrics_url="http://127.0.0.1:1/metrics")
        + '[services.api.readiness]\ntype = "exec"\ncommand = ["false"]\nperiod = 0.2\n',
        supervisor="scrape_interval = 0.3")
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)  # an exit, for service_last_exit_code
        await wait_for(daemon, "api", lambda s: s.starts == 2)
        await get(daemon, "/nope")  # a 404: the daemon's own failure counter
        # Until a stats round, a check and a (failing) scrape have run: 1 s when idle, longer
        # on a loaded machine.
        exported: dict[str, set[str]] = {}
        missing = sorted(EXPORTED)
        with anyio.move_on_after(20):
            while True:
                exported = await exported_labels(daemon)
                missing = sorted(set(EXPORTED) - set(exported) - FROM_PROMETHEUS)
                if not missing:
                    break
                await anyio.sleep(0.2)
    assert missing == [], "not exported within 20 s"
    for name, extra in EXPORTED.items():
        if name in FROM_PROMETHEUS:
            continue
        assert {"service", "environment"} | set(extra) <= exported[name], name
