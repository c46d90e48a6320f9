"""`supervisor status` when web_config_file protects the HTTP port (basic auth, TLS, mTLS): on
the daemon's host it asks the control socket, which needs no HTTP credentials, and prints the
same document as /v1/status; over HTTP it takes a CA, a client certificate and credentials
from a file or the environment, and a refusal is one clear line and exit 4, never a secret."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support import SLEEPER_CODE, running_daemon, service, wait_for, write_config
from tests.test_status_cli import hostile_env, run_cli
from tests.test_web_config import PASSWORD, PKI, basic, pki, url, web_config  # noqa: F401

pytestmark = pytest.mark.anyio

CANARY = "CANARY-dsn-s3cr3t"
CHECK = (f'[checks.db]\ntype = "postgres"\ntimeout = 0.5\n'
         f'dsn = "postgresql://app:{CANARY}@127.0.0.1:1/db"\n')
MTLS = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"


@pytest.fixture
def runtime() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="svr-")  # short: Unix socket paths are limited
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def shape(value: Any) -> Any:
    """The keys of a JSON document, recursively (values such as times differ between reads)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__ if value is not None else None


def without_socket_key(path: Path) -> None:
    """The control socket in the default runtime directory, as in production."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("control_socket")))


async def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: run_cli(*args, cwd=cwd, env=env))


def assert_clean(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in (CANARY, PASSWORD, *secrets):
        assert secret not in result.stdout and secret not in result.stderr
    assert "Traceback" not in result.stderr


async def test_basic_auth_port_status_through_the_control_socket(tmp_path: Path, pki: PKI,
                                                                 runtime: str) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.1) + CHECK,
                        web_config(pki, users=True))
    without_socket_key(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = hostile_env(runtime)
    async with running_daemon(path, environ={"XDG_RUNTIME_DIR": runtime}) as daemon:
        await wait_for(daemon, "api", lambda s: s.pid is not None and s.state.value == "running")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url(daemon, "http") + "/v1/status")
            assert response.status_code == 401  # the port is protected
            over_http = (await client.get(url(daemon, "http") + "/v1/status",
                                          headers=basic("prometheus", PASSWORD))).json()
        for args in (("status",), ("status", "--config", str(path)),
                     ("status", "--socket", str(Path(runtime) / "supervisor" / "control.sock"))):
            table = await cli(*args, cwd=elsewhere, env=env)
            assert table.returncode == 0, (args, table.stderr)
            assert "api" in table.stdout and "running" in table.stdout
            assert "readiness:" in table.stdout and "db" in table.stdout
            assert_clean(table)
            as_json = await cli(*args, "--json", cwd=elsewhere, env=env)
            assert as_json.returncode == 0, (args, as_json.stderr)
            assert_clean(as_json)
            document = json.loads(as_json.stdout)
            assert shape(document) == shape(over_http) or (
                # a check's verdict may carry an error one read and not the next
                {k: v for k, v in shape(document).items() if k != "readiness"}
                == {k: v for k, v in shape(over_http).items() if k != "readiness"})
            assert document["daemon"]["pid"] == over_http["daemon"]["pid"]
            assert [s["name"] for s in document["services"]] == ["api"]
            assert "db" in document["readiness"]["checks"]
        # A service that is not running: exit 3, by the socket as by HTTP.
        daemon.runners["api"].stop()
        await wait_for(daemon, "api", lambda s: s.state.value == "stopped")
        stopped = await cli("status", cwd=elsewhere, env=env)
        assert stopped.returncode == 3, stopped.stderr
        assert_clean(stopped)


async def test_mtls_port_status_through_the_socket_and_over_https(tmp_path: Path, pki: PKI,
                                                                  runtime: str) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.1) + CHECK,
                        web_config(pki, MTLS, users=True))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = hostile_env(runtime)
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.pid is not None and s.state.value == "running")
        through_socket = await cli("status", "--config", str(path), "--json", cwd=elsewhere,
                                   env=env)
        assert through_socket.returncode == 0, through_socket.stderr
        assert_clean(through_socket)
        assert json.loads(through_socket.stdout)["services"][0]["name"] == "api"

        # Over HTTPS (--url): each missing piece is named, one line, exit 4.
        https = url(daemon)
        untrusted = await cli("status", "--url", https, cwd=elsewhere, env=env)
        assert untrusted.returncode == 4 and "--cacert" in untrusted.stderr
        no_cert = await cli("status", "--url", https, "--cacert", str(pki.directory / "ca.pem"),
                            cwd=elsewhere, env=env)
        assert no_cert.returncode == 4 and "--cert" in no_cert.stderr, no_cert.stderr
        secret = tmp_path / "auth"
        secret.write_text(f"prometheus:{PASSWORD}\n")
        secret.chmod(0o600)
        full = ("status", "--url", https, "--cacert", str(pki.directory / "ca.pem"),
                "--cert", str(pki.client))
        no_auth = await cli(*full, cwd=elsewhere, env=env)
        assert no_auth.returncode == 4 and "--basic-auth-file" in no_auth.stderr
        good = await cli(*full, "--json", "--basic-auth-file", str(secret), cwd=elsewhere,
                         env=env)
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["services"][0]["name"] == "api"
        for result in (untrusted, no_cert, no_auth, good):
            assert_clean(result)
            if result.returncode:
                assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_no_reachable_socket_falls_back_to_http_and_says_what_to_do(
        tmp_path: Path, pki: PKI, runtime: str) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE, start_seconds=0.1) + CHECK,
                        web_config(pki, users=True))
    # The same daemon seen through a config whose control socket does not exist (another
    # user's daemon, or a socket removed): the CLI falls back to the config's listen.
    other = tmp_path / "other"
    other.mkdir()
    copy = other / "services.toml"
    copy.write_text("\n".join(
        'control_socket = "/nonexistent/control.sock"' if line.startswith("control_socket")
        else line for line in path.read_text().splitlines()))
    env = hostile_env(runtime)
    async with running_daemon(path) as daemon:
        await wait_for(daemon, "api", lambda s: s.pid is not None and s.state.value == "running")
        refused = await cli("status", "--config", str(copy), cwd=other, env=env)
        assert refused.returncode == 4
        assert "401" in refused.stderr and "--basic-auth-file" in refused.stderr
        assert "control socket" in refused.stderr and "/nonexistent" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert_clean(refused)
        wrong = await cli("status", "--config", str(copy), cwd=other,
                          env={**env, "SUPERVISOR_BASIC_AUTH": "prometheus:wrong-CANARY-pw"})
        assert wrong.returncode == 4 and "refused" in wrong.stderr
        assert_clean(wrong, "wrong-CANARY-pw")
        good = await cli("status", "--config", str(copy), "--json", cwd=other,
                         env={**env, "SUPERVISOR_BASIC_AUTH": f"prometheus:{PASSWORD}"})
        assert good.returncode == 0, good.stderr
        assert_clean(good)
        assert json.loads(good.stdout)["daemon"]["pid"] > 0
        # An explicit --socket has no fallback: it names the socket.
        explicit = await cli("status", "--socket", "/nonexistent/control.sock", cwd=other,
                             env=env)
        assert explicit.returncode == 4 and "/nonexistent/control.sock" in explicit.stderr
        assert_clean(explicit)
        # A malformed credentials file is a clear error that does not quote it.
        bad = tmp_path / "bad-auth"
        bad.write_text("CANARY-no-colon\n")
        malformed = await cli("status", "--config", str(copy), "--basic-auth-file", str(bad),
                              cwd=other, env=env)
        assert malformed.returncode == 4 and "user:password" in malformed.stderr
        assert_clean(malformed, "CANARY-no-colon")
