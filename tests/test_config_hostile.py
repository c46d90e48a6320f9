"""Issue 12, defect 2: whatever check-config accepts, `run` and reload run.

Hostile values (NaN, infinities, negative and absurd numbers, NUL bytes, bad environment
names) are refused with their key path and without echoing an environment value; a property
test generates service tables and checks that each is either refused cleanly or runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from supervisor.config import load_config
from supervisor.core.errors import ConfigError
from supervisor.core.lifecycle import State
from tests.support import SLEEPER_CODE, get, running_daemon, service, wait_for, write_config

SECRET = "s3cr3t-VALUE"
SLEEP = ["/bin/sleep", "30"]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON escapes the C0 controls as \\uXXXX, which TOML reads back; DEL must be too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def config_text(services: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, table in services.items():
        lines.append(f"[services.{name}]")
        lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def problems_of(tmp_path: Path, services: dict[str, dict[str, Any]],
                environ: dict[str, str] | None = None) -> list[str]:
    path = write_config(tmp_path, config_text(services))
    try:
        load_config(path, environ if environ is not None else {"HOME": "/root",
                                                                "PATH": "/usr/bin:/bin"})
    except ConfigError as exc:
        return exc.problems
    return []


# -- each member of the class, with its key path ---------------------------------------------
NUMBER_CASES = [
    ("start_seconds", math.nan), ("stop_timeout", math.nan), ("backoff_initial", math.inf),
    ("backoff_max", math.inf), ("backoff_factor", 1e300), ("backoff_factor", math.nan),
    ("backoff_jitter", -math.inf), ("backoff_jitter", 1.5), ("backoff_reset_after", -1),
    ("wait_timeout", 1e300), ("scrape_timeout", math.nan), ("scrape_timeout", 0),
    ("max_retries", -1), ("max_retries", 2**62), ("stop_timeout", 10**18),
    ("start_seconds", -0.5), ("stop_timeout", 10**400), ("max_retries", -(10**400)),
    ("backoff_max", 1e400),
]


@pytest.mark.parametrize(("key", "value"), NUMBER_CASES)
def test_hostile_service_numbers_are_refused_with_their_key_path(
        tmp_path: Path, key: str, value: float) -> None:
    problems = problems_of(tmp_path, {"api": {"command": SLEEP, key: value}})
    assert [p for p in problems if p.startswith(f"services.api.{key}: ")], problems


@pytest.mark.parametrize(("key", "value"), [
    ("scrape_interval", math.nan), ("stats_interval", math.inf), ("stats_interval", 0.0),
    ("scrape_interval", 1e-9), ("max_connections", 10**12), ("scrape_interval", 1e300)])
def test_hostile_daemon_numbers_are_refused(tmp_path: Path, key: str, value: float) -> None:
    path = tmp_path / "services.toml"
    path.write_text(f"[supervisor]\n{key} = {toml_value(value)}\n"
                    + config_text({"api": {"command": SLEEP}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(p.startswith(f"supervisor.{key}: ") for p in caught.value.problems)


@pytest.mark.parametrize(("key", "value"), [("timeout", math.nan), ("interval", math.inf),
                                            ("timeout", 1e300), ("interval", -1)])
def test_hostile_check_numbers_are_refused(tmp_path: Path, key: str, value: float) -> None:
    path = tmp_path / "services.toml"
    path.write_text(f'[checks.db]\ntype = "tcp"\naddress = "127.0.0.1:1"\n'
                    f"{key} = {toml_value(value)}\n" + config_text({"api": {"command": SLEEP}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(p.startswith(f"checks.db.{key}: ") for p in caught.value.problems)


@pytest.mark.parametrize(("table", "where"), [
    ({"env": {"A=B": "1"}}, "services.api.env.'A=B'"),
    ({"env": {"": "1"}}, "services.api.env"),
    ({"env": {"A\0B": "1"}}, "services.api.env."),
    ({"env": {"TOKEN": SECRET + "\0"}}, "services.api.env.TOKEN"),
    ({"env": {"TOKEN": "${UNSET:-" + SECRET + "\0}"}}, "services.api.env.TOKEN"),
    ({"env": {"TOKEN": "${" + SECRET}}, "services.api.env.TOKEN"),
    ({"command": ["/bin/sleep", "3\0"]}, "services.api.command[1]"),
    ({"command": ["/bin/sleep\0"]}, "services.api.command[0]"),
    ({"cwd": "/tmp\0"}, "services.api.cwd"),
    ({"env_file": ["/tmp/env\0"]}, "services.api.env_file[0]"),
    ({"metrics_url": "http://127.0.0.1:1/\0"}, "services.api.metrics_url"),
    ({"stop_signal": "TERM\0"}, "services.api.stop_signal"),
    ({"depends_on": ["x\0"]}, "services.api.depends_on[0]"),
    ({"cwd": "/" + "a" * 5000}, "services.api.cwd"),
    ({"command": ["/" + "a" * 5000 + "/x"]}, "services.api.command"),
    ({"cwd": "~no-such-user-here/x"}, "services.api.cwd"),
])
def test_hostile_strings_are_refused_without_echoing_values(
        tmp_path: Path, table: dict[str, Any], where: str) -> None:
    problems = problems_of(tmp_path, {"api": {"command": SLEEP, **table}})
    assert [p for p in problems if p.startswith(where)], problems
    assert not [p for p in problems if SECRET in p or "\0" in p], problems


def test_an_integer_too_long_for_python_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(config_text({"api": {"command": SLEEP}}) + "stop_timeout = 1" + "0" * 5000)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "4300 digits" in caught.value.problems[0]


def test_nul_from_interpolation_and_env_file_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(f"FROM_FILE={SECRET}\0tail\n")
    problems = problems_of(tmp_path, {"api": {"command": SLEEP, "env_file": [str(env_file)],
                                              "env": {"FROM_ENV": "${INJECTED}"}}},
                           environ={"INJECTED": SECRET + "\0", "PATH": "/bin"})
    assert any(p.startswith("services.api.env_file[0]") and "FROM_FILE" in p
               for p in problems), problems
    assert any(p.startswith("services.api.env.FROM_ENV") for p in problems), problems
    assert not [p for p in problems if SECRET in p], problems


def test_check_config_cli_refuses_what_run_would_crash_on(tmp_path: Path) -> None:
    """The issue's examples: rc 1, every key path, no traceback, no secret."""
    path = write_config(tmp_path, config_text({"api": {
        "command": ["/bin/sleep", "1\0"], "start_seconds": math.nan, "stop_timeout": math.nan,
        "backoff_factor": 1e300, "backoff_initial": math.inf,
        "env": {"A=B": "x", "": "y", "TOKEN": SECRET + "\0"}}}))
    for command in ("check-config", "run"):
        done = subprocess.run([sys.executable, "-m", "supervisor", command, "--config",
                               str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and SECRET not in done.stderr
        for key in ("command[1]", "start_seconds", "stop_timeout", "backoff_factor",
                    "backoff_initial", "env.'A=B'", "env.TOKEN"):
            assert f"services.api.{key}: " in done.stderr, (key, done.stderr)


# -- reload ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_reload_adding_a_hostile_service_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.1))
    async with running_daemon(path) as daemon:
        snap = await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
        good = path.read_text()
        for bad in ({"command": SLEEP, "env": {"A=B": "1"}},
                    {"command": SLEEP, "stop_timeout": math.nan},
                    {"command": ["/bin/sleep", "3\0"]},
                    {"command": SLEEP, "backoff_initial": math.inf}):
            path.write_text(good + config_text({"bad": bad}))
            result = await daemon.reload()
            assert not result.ok and any(p.startswith("services.bad.") for p in result.problems)
            assert set(daemon.runners) == {"api"}
        path.write_text(good + config_text({"bad": {"command": SLEEP, "start_seconds": math.nan,
                                                    "env": {"K": SECRET + "\0"}}}))

        def reload() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "supervisor", "reload", "--config",
                                   str(path)], capture_output=True, text=True, timeout=60)

        done = await anyio.to_thread.run_sync(reload)
        assert done.returncode == 1 and "services.bad.start_seconds" in done.stderr
        assert SECRET not in done.stderr
        await anyio.sleep(0.3)
        assert daemon.snapshots["api"].pid == snap.pid and daemon.last_reload_ok is False
        assert (await get(daemon, "/v1/health")).status_code == 200


# -- the property: refused cleanly, or it runs -------------------------------------------------
hostile_text = st.text(alphabet=st.sampled_from(list("ab=$}{:-_ \0\n\x7fé")), max_size=6)
hostile_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0.0, 3.0),
    st.integers(-(2**63), 2**63 - 1), st.integers(-(10**400), 10**400), st.integers(0, 5),
    hostile_text, st.booleans())
NUMERIC_KEYS = ("start_seconds", "stop_timeout", "backoff_initial", "backoff_max",
                "backoff_factor", "backoff_jitter", "backoff_reset_after", "wait_timeout",
                "scrape_timeout", "max_retries")
env_values = st.one_of(hostile_text.map(lambda t: SECRET + t), st.integers(-5, 5),
                       st.sampled_from(["${HOME}", "${UNSET:-x}", "${UNSET}", SECRET + "${",
                                        "${UNSET:-" + SECRET + "\0}"]))
hostile_tables = st.fixed_dictionaries(
    {"command": st.one_of(st.just(SLEEP), st.just(["/bin/sleep", "3\0"]),
                          st.lists(hostile_text, max_size=2))},
    optional={
        **{key: hostile_number for key in NUMERIC_KEYS},
        "env": st.dictionaries(st.one_of(st.sampled_from(["A", "B_2", "PATH"]), hostile_text),
                               env_values, max_size=3),
        "cwd": st.one_of(st.sampled_from([".", "/tmp", "/nonexistent", "/" + "a" * 5000,
                                          "~no-such-user-here"]), hostile_text),
        "restart": st.sampled_from(["always", "on-failure", "never", "sometimes"]),
        "autostart": st.one_of(st.booleans(), hostile_number),
    })
# Near-valid tables (edge values of the accepted ranges), so that many examples do run.
plausible_number = st.one_of(st.floats(0.0, 2.0), st.integers(0, 3),
                             st.sampled_from([0.0, 1.0, 100.0, 604800.0, 1e-300, 5e-324]))
plausible_tables = st.fixed_dictionaries(
    {"command": st.just(SLEEP)},
    optional={
        **{key: plausible_number for key in NUMERIC_KEYS},
        "env": st.dictionaries(st.text(st.sampled_from(list("AB_9é$ ")), min_size=1,
                                       max_size=4),
                               st.text(st.sampled_from(list("xy ${}é\n")), max_size=6)
                               .map(lambda t: SECRET + t), max_size=3),
        "restart": st.sampled_from(["always", "on-failure", "never"]),
        "autostart": st.booleans(),
    })
service_tables = st.one_of(hostile_tables, plausible_tables)


supervisor_tables = st.fixed_dictionaries({}, optional={
    "scrape_interval": st.one_of(hostile_number, plausible_number),
    "max_connections": st.one_of(hostile_number, st.integers(1, 300)),
    "environment": st.one_of(hostile_text, st.just("prod")),
    "log_level": st.sampled_from(["info", "debug", "loud"]),
    "deny_metrics": st.lists(st.one_of(hostile_text, st.sampled_from(["[", "*x*", "a[!b]"])),
                             max_size=2),
})
check_tables = st.fixed_dictionaries({"type": st.just("tcp"),
                                      "address": st.sampled_from(["127.0.0.1:1", "x:\0"])},
                                     optional={"timeout": st.one_of(hostile_number,
                                                                    plausible_number),
                                               "interval": st.one_of(hostile_number,
                                                                     plausible_number)})


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tables=st.lists(service_tables, min_size=1, max_size=2), daemon_table=supervisor_tables,
       check=st.one_of(st.none(), check_tables))
@pytest.mark.anyio
async def test_generated_configs_are_refused_cleanly_or_run(
        tmp_path: Path, tables: list[dict[str, Any]], daemon_table: dict[str, Any],
        check: dict[str, Any] | None) -> None:
    services = {f"svc{i}": table for i, table in enumerate(tables)}
    text = config_text(services)
    if check is not None:
        text += "[checks.gate]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in check.items())
    path = write_config(tmp_path, text, supervisor="".join(
        f"{k} = {toml_value(v)}\n" for k, v in daemon_table.items()))
    try:
        load_config(path)
    except ConfigError as exc:
        event("refused")
        assert exc.problems
        for problem in exc.problems:
            where, sep, message = problem.partition(": ")
            assert sep and message, problem
            assert where.startswith(("services.svc", "supervisor.", "checks.gate")), problem
            assert SECRET not in problem, problem
        return
    event("ran")
    async with running_daemon(path) as daemon:
        response = await get(daemon, "/v1/health")
        assert response.status_code == 200
        for name, table in services.items():
            if table.get("autostart", True) is True and table["command"] == SLEEP:
                await wait_for(daemon, name, lambda s: s.state is not State.STOPPED
                               and s.state is not State.WAITING)
        assert (await get(daemon, "/v1/health")).status_code == 200
        assert (await get(daemon, "/v1/metrics")).status_code == 200
