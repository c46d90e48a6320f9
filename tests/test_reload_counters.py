"""Counters per service name for the daemon's lifetime, whatever reloads and restarts do."""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.control.server import execute
from supervisor.core import lifecycle as lc
from tests.support import SLEEPER_CODE, running_daemon, service, wait_for, write_config

OPS = st.lists(st.sampled_from(["restart", "change", "remove", "add"]), min_size=1, max_size=4)


def _api(version: int) -> str:
    return service("api", SLEEPER_CODE, start_seconds=0, stop_timeout=2) + (
        f'env = {{ V = "{version}" }}\n')


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
@example(ops=["restart", "change", "remove", "add"])
def test_counters_never_go_back(backend: str, ops: list[str]) -> None:
    """Any sequence of restarts and reloads that change, remove or add back a service: its
    starts and exits by reason never decrease, and every process it started is accounted
    for (starts + spawn errors == exits + the one running)."""
    tmp = Path(tempfile.mkdtemp(prefix="sv-rc-"))
    other = service("other", SLEEPER_CODE, start_seconds=0)
    path = write_config(tmp, _api(0) + other)
    header = path.read_text().split("[services.")[0]

    async def main() -> None:
        version, present = 0, True
        seen: tuple[int, dict[str, int]] = (0, {})
        async with running_daemon(path) as daemon:
            await wait_for(daemon, "api", lambda s: s.state is lc.State.RUNNING)
            for op in ops:
                if op == "restart" and present:
                    answer = await execute(daemon, {"command": "restart", "services": ["api"]})
                    assert answer["ok"], answer
                elif op in ("change", "remove", "add"):
                    version += op == "change"
                    present = op != "remove"
                    path.write_text(header + (_api(version) if present else "") + other)
                    result = await daemon.reload()
                    assert result.ok, result
                if present:
                    snap = await wait_for(daemon, "api",
                                          lambda s: s.state is lc.State.RUNNING)
                    assert snap.starts >= seen[0]
                    assert all(snap.exits[r] >= n for r, n in seen[1].items())
                    seen = (snap.starts, dict(snap.exits))
                    assert snap.starts + snap.exits["spawn_error"] == sum(
                        snap.exits.values()) + 1

    anyio.run(main, backend=backend)
