"""Service probes (issue 17): liveness restarts, readiness gates dependents, startup holds
liveness off, exec probes leave nothing behind. Real child processes and real HTTP on
loopback, through the daemon's interfaces (status, metrics, log), on both backends."""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import anyio
import pytest

from supervisor.checks.probes import probe_service
from supervisor.config import ProbeSpec
from supervisor.control.client import render
from supervisor.core.lifecycle import State
from supervisor.process.spawn import spawn
from tests.dbservers import BlackHole, black_hole  # noqa: F401 (fixture)
from tests.support import (
    LOAD_SLACK,
    PY,
    free_port,
    get,
    running_daemon,
    sample,
    service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.anyio

# A service with /v1/health (500 while `<dir>/sick` exists, hangs while `<dir>/hang` exists)
# and /v1/ready (503 until `<dir>/ready` exists). SIGTERM is recorded in `<dir>/terms`, so a
# test can see the normal stop path was taken.
APP = """
import http.server, os, signal, sys, time
port, state = int(sys.argv[1]), sys.argv[2]
def term(*_):
    with open(os.path.join(state, "terms"), "a") as f:
        f.write("TERM\\n")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/v1/health":
            while os.path.exists(os.path.join(state, "hang")):
                time.sleep(0.05)
            code = 500 if os.path.exists(os.path.join(state, "sick")) else 200
        elif self.path == "/v1/ready":
            code = 200 if os.path.exists(os.path.join(state, "ready")) else 503
        else:
            code = 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def app(name: str, port: int, state: Path, extra: str = "", **keys: object) -> str:
    table = service(name, APP, **keys).replace(
        '"]\n', f'", "{port}", "{state}"]\n', 1)
    return table + extra


def probe_table(service_name: str, kind: str, **keys: object) -> str:
    import json

    lines = [f"[services.{service_name}.{kind}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def listening(service_name: str, port: int) -> str:
    """A startup probe that passes once the service listens on `port`: liveness is judged
    from then on, not while the interpreter still starts (seconds on a loaded machine, which
    a liveness probe alone would punish with a restart loop)."""
    return probe_table(service_name, "startup", type="tcp", address=f"127.0.0.1:{port}",
                       period=0.1, timeout=1.0, failure_threshold=600)


def snapshot_of(daemon, name: str):  # type: ignore[no-untyped-def]
    return daemon.runners[name].snapshot


# -- liveness ---------------------------------------------------------------------------------

async def test_failing_health_restarts_the_service_within_the_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    period, threshold, timeout = 0.3, 2, 0.5
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.2,
                                      backoff_jitter=0.0) + listening("api", port) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=period, timeout=timeout, failure_threshold=threshold))
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "api", lambda s: s.state is State.RUNNING
                               and (s.probes["liveness"].passing is True), timeout=60)
        (tmp_path / "sick").touch()
        sick_at = time.monotonic()
        second = await wait_for(daemon, "api", lambda s: s.starts == 2 and s.pid is not None)
        elapsed = time.monotonic() - sick_at
        (tmp_path / "sick").unlink()
        assert elapsed <= period * threshold + timeout + LOAD_SLACK, elapsed
        assert second.pid != first.pid
        # The normal stop path: stop_signal (SIGTERM) reached the service.
        assert (tmp_path / "terms").read_text().count("TERM") == 1
        assert second.exits["liveness"] == 1 and second.exits["stopped"] == 0
        assert second.last_exit is not None and second.last_exit.reason == "liveness"
        text = (await get(daemon, "/v1/metrics")).text
        labels = {"service": "api", "environment": "development"}
        assert sample(text, "service_exits_total", reason="liveness", **labels) == 1.0
        failures = sample(text, "service_probe_failures_total", probe="liveness", **labels)
        assert failures is not None and failures >= threshold
        status = (await get(daemon, "/v1/status")).json()
        entry = next(s for s in status["services"] if s["name"] == "api")
        assert entry["last_exit"]["reason"] == "liveness"
        assert entry["probes"]["liveness"]["failures"] >= threshold
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "liveness probe failed" in r.getMessage()]
    assert warnings and "service=api" in warnings[0] and "HTTP 500" in warnings[0]


async def test_black_holed_liveness_probe_is_judged_within_timeout(
        tmp_path: Path, black_hole: BlackHole) -> None:  # noqa: F811
    timeout = 0.4
    spec = ProbeSpec("liveness", "http", target=f"http://{black_hole.address}/v1/health",
                     timeout=timeout)
    started = time.monotonic()
    result = await probe_service("svc", spec)
    assert time.monotonic() - started < timeout + LOAD_SLACK  # not the black hole's forever
    assert not result.healthy and result.error is not None and "timed out" in result.error
    tcp = ProbeSpec("liveness", "exec", command=("sleep", "30"), timeout=timeout)
    started = time.monotonic()
    result = await probe_service("svc", tcp, spawner=spawn)
    assert time.monotonic() - started < timeout + LOAD_SLACK  # not sleep's 30 s
    assert not result.healthy and "timed out" in (result.error or "")
    # And through the daemon: a hanging /health restarts the service.
    port = free_port()
    (tmp_path / "hang").touch()
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.1)
                        + listening("api", port) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=0.2, timeout=timeout, failure_threshold=1, initial_delay=0.2))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.probes["startup"].passing is True, timeout=60)
        started = time.monotonic()
        snap = await wait_for(daemon, "api", lambda s: s.exits["liveness"] >= 1)
        assert time.monotonic() - started <= 0.2 + 0.2 + timeout + LOAD_SLACK
        assert "timed out" in (snap.last_error or snap.probes["liveness"].last_error or "")
        (tmp_path / "hang").unlink()


# -- startup ----------------------------------------------------------------------------------

async def test_startup_probe_holds_liveness_off_until_it_passes(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "sick").touch()  # liveness would fail at once
    started_flag = tmp_path / "started"
    path = write_config(tmp_path, app("api", port, tmp_path, start_seconds=0.1) + probe_table(
        "api", "startup", type="exec", command=["test", "-f", str(started_flag)],
        period=0.1, timeout=1.0, failure_threshold=1000) + probe_table(
        "api", "liveness", type="http", url=f"http://127.0.0.1:{port}/v1/health",
        period=0.1, timeout=0.5, failure_threshold=1))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.probes["startup"].failures >= 5)
        snap = snapshot_of(daemon, "api")
        assert snap.starts == 1 and snap.exits["liveness"] == 0
        assert snap.probes["liveness"].failures == 0 and snap.probes["liveness"].passing is None
        started_flag.touch()
        snap = await wait_for(daemon, "api", lambda s: s.exits["liveness"] >= 1)
        assert snap.probes["liveness"].failures >= 1
        (tmp_path / "sick").unlink()


async def test_startup_probe_exhausted_restarts_the_service(tmp_path: Path) -> None:
    path = write_config(tmp_path, service("slow", "import time; time.sleep(300)",
                                          start_seconds=0.1, backoff_jitter=0.0)
                        + probe_table("slow", "startup", type="tcp",
                                      address=f"127.0.0.1:{free_port()}", period=0.1,
                                      timeout=0.2, failure_threshold=3))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "slow", lambda s: s.exits["liveness"] >= 1)
        assert snap.last_exit is not None and snap.last_exit.reason == "liveness"
        assert "connect" in (snap.probes["startup"].last_error or "")
        await wait_for(daemon, "slow", lambda s: s.starts >= 2)


# -- readiness and depends_on -------------------------------------------------------------------

async def test_dependents_start_only_once_the_dependency_is_ready(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    path = write_config(tmp_path, app("db", port, tmp_path, start_seconds=0.1) + probe_table(
        "db", "readiness", type="http", url=f"http://127.0.0.1:{port}/v1/ready", period=0.1,
        timeout=0.5, failure_threshold=2) + service(
        "app", "import time; time.sleep(300)", depends_on=["db"], start_seconds=0.1),
        supervisor="ready_includes_services = true")
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "db", lambda s: s.state is State.RUNNING)
        await wait_for(daemon, "app", lambda s: s.state is State.WAITING)
        # db answers its readiness probe (503) a few times: app is still held back.
        await wait_for(daemon, "db", lambda s: s.probes["readiness"].failures >= 3
                       and "HTTP 503" in (s.probes["readiness"].last_error or ""), timeout=30)
        app_snap = snapshot_of(daemon, "app")
        assert app_snap.state is State.WAITING and app_snap.starts == 0
        assert app_snap.waiting_for == "dependency db is not ready"
        response = await get(daemon, "/v1/ready")
        assert response.status_code == 503 and response.json()["services"] == {"db": False}
        status = (await get(daemon, "/v1/status")).json()
        db = next(s for s in status["services"] if s["name"] == "db")
        assert db["ready"] is False and "HTTP 503" in db["probes"]["readiness"]["last_error"]
        assert db["readiness_probe"] is True
        app_entry = next(s for s in status["services"] if s["name"] == "app")
        assert app_entry["ready"] is False and app_entry["readiness_probe"] is False
        table = render(status).splitlines()
        assert "READY" in table[0]
        rows = {row.split()[0]: row.split() for row in table[1:3]}
        assert rows["db"][1] == "running" and rows["db"][3] == "no"
        assert rows["app"][1:4] == ["waiting", "-", "no"]
        assert any(line.startswith("app: waiting for dependency db is not ready")
                   for line in table)
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_ready", service="db") == 0.0
        (tmp_path / "ready").touch()
        await wait_for(daemon, "app", lambda s: s.state is State.RUNNING)
        text = (await get(daemon, "/v1/metrics")).text
        assert sample(text, "service_ready", service="db") == 1.0
        assert sample(text, "service_ready", service="app") == 1.0  # no probe: running
        assert (await get(daemon, "/v1/ready")).status_code == 200
        # Unready again: reported, but the dependent keeps running.
        (tmp_path / "ready").unlink()
        await wait_for(daemon, "db", lambda s: s.ready is False)
        assert (await get(daemon, "/v1/ready")).status_code == 503
        await anyio.sleep(0.3)
        assert snapshot_of(daemon, "app").state is State.RUNNING
        assert snapshot_of(daemon, "app").starts == 1
    messages = [r.getMessage() for r in caplog.records]
    ready_at = next(i for i, m in enumerate(messages) if m.startswith("ready service=db"))
    spawned_at = next(i for i, m in enumerate(messages) if m.startswith("spawned service=app"))
    assert ready_at < spawned_at
    assert any(m.startswith("not ready service=db") for m in messages[spawned_at:])


# -- exec probes leave nothing behind ------------------------------------------------------------

def _marked(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(entry))
    return found


async def _none_marked(marker: str, within: float = 15.0) -> list[int]:
    deadline = time.monotonic() + within
    while _marked(marker) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return _marked(marker)


FORK_AND_HANG = "import os, time\nos.fork()\nos.fork()\ntime.sleep(300)"


async def test_exec_probe_that_forks_and_hangs_leaves_nothing_behind() -> None:
    marker = f"probe-marker-{uuid.uuid4().hex}"
    spec = ProbeSpec("liveness", "exec", command=(PY, "-c", FORK_AND_HANG, marker),
                     timeout=0.5)
    started = time.monotonic()
    result = await probe_service("svc", spec, spawner=spawn, env=dict(os.environ))
    assert time.monotonic() - started < 0.5 + LOAD_SLACK  # not the hang's 300 s
    assert not result.healthy and "timed out" in (result.error or "")
    assert await _none_marked(marker) == []
    # A command that exits 0 at once but leaves a forked child behind passes, and the child
    # goes with its group.
    code = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(300)\nsys.exit(0)"
    spec = ProbeSpec("liveness", "exec", command=(PY, "-c", code, marker), timeout=2.0)
    result = await probe_service("svc", spec, spawner=spawn, env=dict(os.environ))
    assert result.healthy, result.error
    assert await _none_marked(marker) == []


async def test_exec_probes_of_a_running_service_leave_nothing_behind(tmp_path: Path) -> None:
    marker = f"probe-marker-{uuid.uuid4().hex}"
    path = write_config(tmp_path, service("svc", "import time; time.sleep(300)",
                                          start_seconds=0.1) + probe_table(
        "svc", "readiness", type="exec", command=[PY, "-c", FORK_AND_HANG, marker],
        period=0.1, timeout=0.2, failure_threshold=1))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "svc", lambda s: s.probes["readiness"].failures >= 4)
        assert snap.ready is False and snap.state is State.RUNNING  # never restarted
        assert len(_marked(marker)) <= 4  # at most the attempt under way (it forks twice)
    assert await _none_marked(marker) == []


# -- config: every key checked, with its key path ---------------------------------------------

def test_probe_tables_parse_with_defaults_and_kubernetes_names(tmp_path: Path) -> None:
    from supervisor.config import load_config

    path = write_config(tmp_path, service("api", "pass") + probe_table(
        "api", "liveness", type="http", url="http://127.0.0.1:8081/v1/health", period=5.0,
        timeout=1.0, failure_threshold=3, initial_delay=0.0) + probe_table(
        "api", "readiness", type="http", url="http://127.0.0.1:8081/v1/ready", period=2.0,
        success_threshold=1, failure_threshold=1) + probe_table(
        "api", "startup", type="tcp", address="127.0.0.1:8081", failure_threshold=30)
        + probe_table("api", "readiness", type="exec", command=["true"]).replace(
            "[services.api.readiness]", "[services.other]\ncommand = [\"true\"]\n"
            "[services.other.readiness]"),
        supervisor="ready_includes_services = true")
    config = load_config(path)
    api = config.services["api"]
    assert api.liveness is not None and api.liveness.period == 5.0
    assert api.readiness is not None and api.readiness.failure_threshold == 1
    assert api.startup is not None and api.startup.type == "tcp"
    assert api.startup.failure_threshold == 30 and api.startup.period == 10.0
    assert list(api.probes()) == ["startup", "liveness", "readiness"]
    other = config.services["other"].readiness
    assert other is not None and other.command == ("true",)
    assert config.settings.ready_includes_services is True


@pytest.mark.parametrize(("probe", "key_path"), [
    ({"type": "http", "url": "http://x/", "period": float("nan")}, "liveness.period"),
    ({"type": "http", "url": "http://x/", "timeout": float("inf")}, "liveness.timeout"),
    ({"type": "http", "url": "http://x/", "timeout": 0}, "liveness.timeout"),
    ({"type": "http", "url": "http://x/", "initial_delay": -1}, "liveness.initial_delay"),
    ({"type": "http", "url": "http://x/", "failure_threshold": 0},
     "liveness.failure_threshold"),
    ({"type": "http", "url": "http://x/", "failure_threshold": 10**30},
     "liveness.failure_threshold"),
    ({"type": "http", "url": "http://x/", "success_threshold": 2},
     "liveness.success_threshold"),
    ({"type": "http", "url": "http://x/", "period": True}, "liveness.period"),
    ({"type": "http", "url": "ftp://x/"}, "liveness.url"),
    ({"type": "http", "url": "http://x/\u0000"}, "liveness.url"),
    ({"type": "http"}, "liveness.url"),
    ({"type": "http", "url": ""}, "liveness.url"),
    ({"type": "tcp", "address": ""}, "liveness.address"),
    ({"type": "tcp", "address": "nohost"}, "liveness.address"),
    ({"type": "tcp", "url": "http://x/", "address": "127.0.0.1:1"}, "liveness.url"),
    ({"type": "exec", "command": []}, "liveness.command"),
    ({"type": "exec", "command": ["no-such-probe-program-here"]}, "liveness.command"),
    ({"type": "exec", "command": ["/nonexistent/probe"]}, "liveness.command"),
    ({"type": "exec", "command": ["true", "a\u0000"]}, "liveness.command[1]"),
    ({"type": "grpc"}, "liveness.type"),
    ({"url": "http://x/"}, "liveness.type"),
    ({"type": "http", "url": "http://x/", "periodSeconds": 1}, "liveness.periodSeconds"),
    ("not a table", "liveness"),
])
def test_bad_probe_values_are_refused_with_their_key_path(
        tmp_path: Path, probe: object, key_path: str) -> None:
    from tests.test_config_hostile import problems_of

    problems = problems_of(tmp_path, {"api": {"command": ["/bin/sleep", "30"],
                                              "liveness": probe}})
    assert any(p.startswith(f"services.api.{key_path}: ") for p in problems), problems
    assert all("Traceback" not in p for p in problems)


def test_ready_includes_services_must_be_a_boolean(tmp_path: Path) -> None:
    from supervisor.config import load_config
    from supervisor.core.errors import ConfigError

    path = write_config(tmp_path, service("api", "pass"),
                        supervisor='ready_includes_services = "yes"')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(p.startswith("supervisor.ready_includes_services: ")
               for p in caught.value.problems)


def _hostile_probe_tables():  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    from tests.test_config_hostile import hostile_number, hostile_text

    value = st.one_of(hostile_number, st.floats(0.0, 5.0), st.integers(1, 5))
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["http", "tcp", "exec", "udp"])},
        optional={
            "url": st.one_of(st.just("http://127.0.0.1:1/h"), hostile_text),
            "address": st.one_of(st.just("127.0.0.1:1"), hostile_text),
            "command": st.one_of(st.just(["true"]), st.lists(hostile_text, max_size=2)),
            **{key: value for key in ("period", "timeout", "failure_threshold",
                                      "success_threshold", "initial_delay")},
        })


def test_generated_probe_tables_are_refused_cleanly_or_bounded(tmp_path: Path) -> None:
    import math

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from supervisor.config import MAX_PROBE_THRESHOLD, MAX_PROBE_TIMEOUT, MAX_SECONDS, load_config
    from supervisor.core.errors import ConfigError
    from tests.test_config_hostile import config_text

    kinds = st.sampled_from(["liveness", "readiness", "startup"])

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(kind=kinds, table=_hostile_probe_tables())
    def check(kind: str, table: dict[str, object]) -> None:
        path = write_config(tmp_path, config_text(
            {"svc": {"command": ["/bin/sleep", "30"], kind: table}}))
        try:
            spec = load_config(path).services["svc"].probes()[kind]
        except ConfigError as exc:
            assert exc.problems
            for problem in exc.problems:
                where, sep, message = problem.partition(": ")
                assert sep and message and where.startswith(f"services.svc.{kind}"), problem
            return
        for number in (spec.period, spec.timeout, spec.initial_delay):
            assert math.isfinite(number) and 0 <= number <= MAX_SECONDS
        assert 0 < spec.timeout <= MAX_PROBE_TIMEOUT and spec.period >= 0.01
        assert 1 <= spec.failure_threshold <= MAX_PROBE_THRESHOLD
        assert 1 <= spec.success_threshold <= MAX_PROBE_THRESHOLD
        assert "\0" not in spec.target and all("\0" not in a for a in spec.command)
        assert spec.target or (spec.command and spec.command[0])

    check()


# -- the lifecycle (pure) ---------------------------------------------------------------------

def _machine(restart: str = "always"):  # type: ignore[no-untyped-def]
    from supervisor.config import Backoff, ServiceSpec
    from supervisor.core import lifecycle as lc

    spec = ServiceSpec(name="svc", command=("true",), env={}, cwd="/", restart=restart,
                       start_seconds=1.0, stop_timeout=7.0, stop_signal=2,
                       backoff=Backoff(initial=1.0, jitter=0.0, reset_after=10.0))
    return lc.Lifecycle(spec.policy(), random=lambda: 0.5)


def test_liveness_failure_takes_the_normal_stop_path_then_restarts() -> None:
    from supervisor.core import lifecycle as lc
    m = _machine()
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.TimerFired("started", 1.0, m.timer_generation))
    assert m.handle(lc.ProbeFailed("liveness", "HTTP 500", 20.0, 10)) == [
        lc.SignalGroup(2), lc.StartTimer("kill", 7.0, m.timer_generation)]
    assert m.state is State.STOPPING and m.last_error == "liveness probe failed: HTTP 500"
    assert m.handle(lc.ProbeFailed("liveness", "again", 20.5, 10)) == []  # already stopping
    assert m.handle(lc.TimerFired("kill", 27.0, m.timer_generation)) == [
        lc.SignalGroup(lc.SIGKILL)]
    actions = m.handle(lc.Exited(10, None, 9, 27.1, 27.1))
    # A stable run before the failure: restart at once, as after a crash.
    assert lc.Spawn(m.spawn_attempt) in actions and m.state is State.STARTING
    assert m.exits["liveness"] == 1 and m.exits["stopped"] == 0
    assert m.last_exit is not None and m.last_exit.reason == "liveness"
    # A quick liveness failure: backoff applies.
    m.handle(lc.Spawned(11, 28.0, 28.0))
    assert m.handle(lc.ProbeFailed("liveness", "late", 28.5, 10)) == []  # about pid 10: moot
    m.handle(lc.ProbeFailed("startup", "refused", 29.0, 11))
    actions = m.handle(lc.Exited(11, 0, None, 29.1, 29.1))
    assert m.state is State.BACKOFF
    assert lc.StartTimer("backoff", 1.0, m.timer_generation) in actions
    assert m.exits["liveness"] == 2


def test_operator_stop_during_a_liveness_restart_wins_and_never_restarts_policy() -> None:
    from supervisor.core import lifecycle as lc
    m = _machine()
    m.handle(lc.StartRequested(0.0))
    m.handle(lc.Spawned(10, 0.0, 0.0))
    m.handle(lc.ProbeFailed("liveness", "x", 0.5, 10))
    m.handle(lc.StopRequested(0.6))
    m.handle(lc.Exited(10, 0, None, 0.7, 0.7))
    assert m.state is State.STOPPED and m.exits["stopped"] == 1
    never = _machine("never")
    never.handle(lc.StartRequested(0.0))
    never.handle(lc.Spawned(10, 0.0, 0.0))
    never.handle(lc.ProbeFailed("liveness", "x", 0.5, 10))
    never.handle(lc.Exited(10, 0, None, 0.7, 0.7))
    assert never.state is State.EXITED and never.exits["liveness"] == 1
    idle = _machine()
    assert idle.handle(lc.ProbeFailed("liveness", "x", 0.0, 10)) == []
    assert idle.state is State.STOPPED


async def test_probe_errors_never_show_the_url_password(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "Pr0be-canary-s3cret"
    closed = free_port()
    path = write_config(tmp_path, service("svc", "import time; time.sleep(300)",
                                          start_seconds=0.1) + probe_table(
        "svc", "liveness", type="http", url=f"http://user:{canary}@127.0.0.1:{closed}/h",
        period=0.1, timeout=0.5, failure_threshold=2) + probe_table(
        "svc", "readiness", type="http",
        url=f"http://127.0.0.1:{closed}/r?token={canary}&password={canary}", period=0.1,
        timeout=0.5))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "svc", lambda s: s.exits["liveness"] >= 1
                       and s.probes["readiness"].failures >= 1)
        status = (await get(daemon, "/v1/status")).text
        metrics = (await get(daemon, "/v1/metrics")).text
        ready = (await get(daemon, "/v1/ready")).text
    assert "liveness" in status and "readiness" in status
    for text in (status, metrics, ready, caplog.text):
        assert canary not in text


async def test_a_standin_toggled_unhealthy_is_restarted_within_the_bound(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    flag = tmp_path / "unhealthy"
    period, threshold, timeout = 0.5, 2, 1.0
    path = write_config(tmp_path, f"""
[services.watchdog]
command = ["{PY}", "{root}/standins/watchdog.py", "--listen", "127.0.0.1:{port}"]
env = {{ STANDIN_UNHEALTHY_FILE = "{flag}" }}
start_seconds = 0.2
""" + listening("watchdog", port) + probe_table("watchdog", "liveness", type="http",
                  url=f"http://127.0.0.1:{port}/v1/health", period=period, timeout=timeout,
                  failure_threshold=threshold, initial_delay=0.5))
    async with running_daemon(path) as daemon:
        first = await wait_for(daemon, "watchdog", lambda s: s.probes["liveness"].passing is True,
                               timeout=30)
        flag.touch()
        sick_at = time.monotonic()
        second = await wait_for(daemon, "watchdog", lambda s: s.starts == 2, timeout=30)
        elapsed = time.monotonic() - sick_at
        flag.unlink()
        assert elapsed <= period * threshold + timeout + LOAD_SLACK, elapsed
        assert second.pid != first.pid and second.exits["liveness"] == 1
        # The stand-in stopped cleanly on SIGTERM (the normal stop path), exit status 0.
        assert second.last_exit is not None and second.last_exit.code == 0
        await wait_for(daemon, "watchdog", lambda s: s.probes["liveness"].passing is True,
                       timeout=30)


async def test_exec_probe_under_way_at_shutdown_leaves_nothing_behind(tmp_path: Path) -> None:
    marker = f"probe-marker-{uuid.uuid4().hex}"
    path = write_config(tmp_path, service("svc", "import time; time.sleep(300)",
                                          start_seconds=0.1) + probe_table(
        "svc", "liveness", type="exec", command=[PY, "-c", FORK_AND_HANG, marker],
        period=60.0, timeout=60.0))
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "svc", lambda s: s.pid is not None)
        deadline = time.monotonic() + 10
        while len(_marked(marker)) < 4 and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert len(_marked(marker)) == 4  # the probe and what it forked, hanging
        started = time.monotonic()
    assert time.monotonic() - started < 5.0  # the probe did not hold the shutdown up
    assert await _none_marked(marker) == []


def test_a_probe_url_password_is_a_config_secret(tmp_path: Path) -> None:
    from supervisor.config import load_config

    canary = "Pr0be-canary-s3cret"
    path = write_config(tmp_path, service("svc", "pass") + probe_table(
        "svc", "liveness", type="http", url=f"http://user:{canary}@127.0.0.1:1/h"))
    assert canary in load_config(path).secrets


async def test_supervisor_start_of_a_dependency_and_its_dependent_waits_for_ready(
        tmp_path: Path) -> None:
    from tests.test_operators import cli

    port = free_port()
    (tmp_path / "ready").touch()
    path = write_config(tmp_path, app("db", port, tmp_path, start_seconds=0.1, autostart=False)
                        + probe_table("db", "readiness", type="http",
                                      url=f"http://127.0.0.1:{port}/v1/ready", period=0.1,
                                      timeout=0.5, initial_delay=0.6)
                        + service("app", "import time; time.sleep(300)", depends_on=["db"],
                                  start_seconds=0.1, autostart=False))
    async with running_daemon(path) as daemon:
        refused = await cli("start", "app", "--config", str(path))
        assert refused.returncode != 0 and "db" in refused.stdout + refused.stderr
        started = await cli("start", "db", "app", "--config", str(path))
        assert started.returncode == 0, started.stdout + started.stderr
        assert "app: running" in started.stdout, started.stdout
        assert snapshot_of(daemon, "db").ready is True


async def test_probe_failures_count_on_across_a_reload(tmp_path: Path) -> None:
    closed = free_port()

    def config(period: float) -> str:
        return service("svc", "import time; time.sleep(300)", start_seconds=0.1) + probe_table(
            "svc", "readiness", type="tcp", address=f"127.0.0.1:{closed}", period=period,
            timeout=0.5)

    path = write_config(tmp_path, config(0.1))
    async with running_daemon(path) as daemon:
        before = await wait_for(daemon, "svc", lambda s: s.probes["readiness"].failures >= 3)
        path.write_text(path.read_text().replace("period = 0.1", "period = 0.2"))
        result = await daemon.reload()
        assert result.ok and result.changed == ("svc",)
        snap = snapshot_of(daemon, "svc")
        assert snap.probes["readiness"].failures >= before.probes["readiness"].failures
        text = (await get(daemon, "/v1/metrics")).text
        count = sample(text, "service_probe_failures_total", service="svc", probe="readiness")
        assert count is not None and count >= before.probes["readiness"].failures
