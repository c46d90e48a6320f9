"""Secrets never print: a canary password, shaped every way we can think of, through every
output (parsers' own messages, /v1/ready, /v1/status, `supervisor status`, check-config and
run errors, the log)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import CheckSpec, load_config
from supervisor.core.redact import LogRedactor, Redactor, redact_text, url_problem, url_secrets
from supervisor.daemon import Daemon
from supervisor.logs.setup import configure_logging
from tests.support import SLEEPER_CODE, base_url, get, service, write_config

MARK = "CANARY"
# Each shape that breaks one parser or another: unencoded URL delimiters, '%', spaces,
# unicode, base64's alphabet.
CANARIES = (
    "CANARYab/cd", "ab/CANARY/cd", "CANARY#frag", "fr#CANARY", "CAN@CANARY", "CANARY%zz",
    "CANARY%2", "CANARY:x:y", "CANARY?x=1", "CANARY with spaces", "CANARYÄü€", "Q0FO+CANARY/a=",
    "CANARY+/==", "/CANARY", "CANARY/", "12/CANARY", "CANARY'\"\\",
)
TEMPLATES = (
    "postgresql://app:{pw}@127.0.0.1:1/db",
    "redis://:{pw}@127.0.0.1:1/0",
    "redis://user:{pw}@127.0.0.1:1",
    "http://user:{pw}@127.0.0.1:1/health",
    "postgresql://app@127.0.0.1:1/db?password={pw}",
    "redis://127.0.0.1:1/0?password={pw}",
)


def parser_messages(url: str) -> list[str]:
    """What the parsers our clients use say about `url` (the text an error would carry)."""
    import httpx
    from asyncpg import connect_utils
    from redis.connection import parse_url

    out: list[str] = []
    attempts = [
        lambda: urlsplit(url).port,
        lambda: int(urlsplit(url).netloc.rpartition(":")[2] or 0),
        lambda: parse_url(url),
        lambda: httpx.URL(url),
        lambda: connect_utils._parse_connect_dsn_and_args(
            dsn=url, host=None, port=None, user=None, password=None, passfile=None,
            database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
            server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None),
    ]
    for attempt in attempts:
        try:
            result = attempt()
            out.append(repr(result))
        except Exception as exc:  # every message counts, whatever its type
            out.append(f"{type(exc).__name__}: {exc}")
    return out


password_strategy = st.builds(
    lambda a, b: a + MARK + b,
    st.text(alphabet="/#@%:? +=äü€xyz09'\\", max_size=6),
    st.text(alphabet="/#@%:? +=äü€xyz09'\\", max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=password_strategy, template=st.sampled_from(TEMPLATES))
def test_parsers_messages_are_masked_whatever_the_password(password: str, template: str) -> None:
    url = template.format(pw=password)
    secrets = url_secrets(url)
    for message in parser_messages(url):
        assert MARK not in redact_text(message, secrets), (url, message)
    assert MARK not in redact_text(url, secrets)


@settings(max_examples=150, deadline=None)
@given(password=password_strategy, template=st.sampled_from(TEMPLATES[:4]))
def test_accepted_urls_parse_to_the_password_as_written(password: str, template: str) -> None:
    """What check-config accepts, every parser reads with the password where it was meant."""
    url = template.format(pw=password)
    if url_problem(url, path_at_ok=url.startswith("http")) is None:
        assert urlsplit(url).password == password


def test_redactor_walks_documents_and_keeps_shapes() -> None:
    redactor = Redactor(url_secrets("redis://:CANARY%2Fx@h"))
    doc = {"a": ["CANARY/x", {"k": "x CANARY%2Fx y", "n": 1.5, "b": None}], "c": "ok"}
    out = redactor.redact_obj(doc)
    assert MARK not in json.dumps(out, ensure_ascii=False)
    assert out["a"][1]["n"] == 1.5 and out["a"][1]["b"] is None and out["c"] == "ok"
    assert list(out) == ["a", "c"] and out["a"][1]["k"] == "x *** y"


def test_log_filter_masks_messages_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = configure_logging("info", stream=stream, environ={})
    redactor = LogRedactor(Redactor(url_secrets("postgresql://u:CANARY/pw@h/db")))
    handler.addFilter(redactor)
    log = logging.getLogger("test_secrets")
    try:
        try:
            int("CANARY/pw")
        except ValueError:
            log.exception("check failed target=%s", "CANARY/pw")
        log.warning("plain %s", "CANARY%2Fpw")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "ValueError" in text and "***" in text
    assert MARK not in text


# -- through the operator's interfaces --------------------------------------------------------

def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("canary", [c for c in CANARIES if url_problem(
    f"postgresql://app:{c}@127.0.0.1:1/db") is not None])
def test_check_config_and_run_reject_unparseable_urls_by_key(tmp_path: Path, canary: str
                                                             ) -> None:
    marker = tmp_path / "spawned"
    checks = (f"[checks.db]\ntype = \"postgres\"\n"
              f"dsn = {toml_string(f'postgresql://app:{canary}@127.0.0.1:1/db')}\n"
              f"[checks.cache]\ntype = \"redis\"\n"
              f"url = {toml_string(f'redis://:{canary}@127.0.0.1:1/0')}\n")
    services = service("api", f"open({str(marker)!r}, 'w').close()\n" + SLEEPER_CODE,
                       metrics_url=f"http://u:{canary}@127.0.0.1:1/metrics")
    path = write_config(tmp_path, checks + services)
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path))
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "checks.db.dsn" in output and "checks.cache.url" in output, output
        assert MARK not in output, output
        assert "Traceback" not in output
    assert not marker.exists()  # run refused before spawning anything


def test_dsn_file_that_does_not_parse_is_named_by_key(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://app:CANARY/x#y@127.0.0.1:1/db\n")
    path = write_config(tmp_path, f'[checks.db]\ntype = "postgres"\ndsn_file = "{secret}"\n'
                        + service("api", SLEEPER_CODE))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1 and "checks.db.dsn_file" in result.stderr
    assert MARK not in result.stdout + result.stderr


def test_env_secret_in_a_missing_command_path_is_named_not_printed(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[services.api]\ncommand = ["${APP_TOKEN}/bin/app"]\n'
                        'cwd = "${APP_TOKEN}"\n')
    env = {**os.environ, "APP_TOKEN": "/opt/CANARY-s3cr3t"}
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path), env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "${APP_TOKEN}" in output and MARK not in output, output


@pytest.mark.anyio
async def test_canary_sweep_through_every_output(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Targets that check-config would refuse (a config built another way, or an old file)
    still never print their password: /v1/ready, /v1/status, `supervisor status` (text and
    --json), the WARNING log."""
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.1))
    config = load_config(path)
    checks: dict[str, CheckSpec] = {}
    for i, canary in enumerate(CANARIES):
        for j, template in enumerate(TEMPLATES):
            kind = template.split(":")[0].replace("postgresql", "postgres")
            name = f"c{i}_{j}"
            checks[name] = CheckSpec(name, kind, template.format(pw=canary), timeout=0.5,
                                     interval=0.5)
    config = dataclasses.replace(config, checks=checks)
    daemon = Daemon(config, handle_signals=False)
    caplog.set_level(logging.DEBUG)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            with anyio.fail_after(30):
                # Bounded polling: results only accumulate, no event says "all of them".
                while any(name not in daemon.monitor.snapshot().results  # noqa: ASYNC110
                          for name in checks):
                    await anyio.sleep(0.1)
            ready = await get(daemon, "/v1/ready")
            status = await get(daemon, "/v1/status")
            text = await anyio.to_thread.run_sync(
                lambda: run_cli("status", "--url", base_url(daemon)))
            as_json = await anyio.to_thread.run_sync(
                lambda: run_cli("status", "--url", base_url(daemon), "--json"))
            by_socket = await anyio.to_thread.run_sync(  # the control socket's status command
                lambda: run_cli("status", "--config", str(path), "--json"))
        finally:
            daemon.request_shutdown()
    assert ready.status_code == 503
    errors = [c.get("error", "") for c in ready.json()["checks"].values()]
    assert any("***" in e for e in errors)  # the parsers did echo the passwords
    outputs = {"ready": ready.text, "status": status.text, "status text": text.stdout,
               "status json": as_json.stdout, "status by socket": by_socket.stdout,
               "log": caplog.text}
    for where, output in outputs.items():
        decoded = output.encode().decode("unicode_escape", errors="ignore")
        assert MARK not in output and MARK not in decoded, (where, output[:2000])
    assert text.returncode == 0 and as_json.returncode == 0  # every service runs
    assert by_socket.returncode == 0, by_socket.stderr
    assert json.loads(by_socket.stdout).keys() == status.json().keys()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "check unhealthy" in r.getMessage()]
    # (a few cut-short URLs fall back to localhost:6379, the shared Redis, and pass)
    assert len(warnings) > len(checks) // 2


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=password_strategy, via_env=st.booleans(),
       where=st.sampled_from(["dsn", "url", "metrics_url"]))
def test_check_config_never_prints_a_password_it_rejects(tmp_path: Path, password: str,
                                                         via_env: bool, where: str) -> None:
    """Whatever its shape, a password (written in the file or interpolated from the
    environment) is either accepted and parsed as meant, or rejected by key, unprinted."""
    from supervisor.core.errors import ConfigError

    written = "${DB_PASS}" if via_env else password
    url = {"dsn": f"postgresql://app:{written}@127.0.0.1:1/db",
           "url": f"redis://:{written}@127.0.0.1:1/0",
           "metrics_url": f"http://u:{written}@127.0.0.1:1/metrics"}[where]
    key = {"dsn": "checks.db.dsn", "url": "checks.db.url",
           "metrics_url": "services.api.metrics_url"}[where]
    kind = {"dsn": "postgres", "url": "redis", "metrics_url": None}[where]
    text = f"[services.api]\ncommand = [{toml_string(sys.executable)}]\n"
    if kind is None:
        text += f"metrics_url = {toml_string(url)}\n"
    else:
        text += f'[checks.db]\ntype = "{kind}"\n{where} = {toml_string(url)}\n'
    path = tmp_path / "services.toml"
    path.write_text(text)
    try:
        config = load_config(path, {"DB_PASS": password, "PATH": os.defpath})
    except ConfigError as exc:
        assert MARK not in exc.render() and MARK not in str(exc)
        assert key in exc.render()
        return
    expanded = url.replace("${DB_PASS}", password)
    assert urlsplit(expanded).password == password
    assert MARK not in Redactor(config.secrets).redact(f"x {password} y {expanded}")
