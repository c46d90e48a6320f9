"""`supervisor status` when web_config_file protects the HTTP port (basic auth, TLS, mTLS): on
the daemon's host it asks the control socket, which needs no HTTP credentials, and prints the
same document as /v1/status; over HTTP it takes a CA, a client certificate and credentials
from a file or the environment, and a refusal is one clear line and exit 4, never a secret."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.control.client import HttpAuth, show_status
from tests.support import SLEEPER_CODE, running_daemon, service, wait_for, write_config
from tests.test_status_cli import documents, fake_daemon, hostile_env, run_cli, url_of
from tests.test_web_config import PASSWORD, PKI, basic, make_pki, url, web_config

CANARY = "CANARY-dsn-s3cr3t"
CHECK = (f'[checks.db]\ntype = "postgres"\ntimeout = 0.5\n'
         f'dsn = "postgresql://app:{CANARY}@127.0.0.1:1/db"\n')
MTLS = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path)


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


@pytest.mark.anyio
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


@pytest.mark.anyio
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


@pytest.mark.anyio
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


def test_a_status_document_larger_than_a_request_comes_whole(capsys: pytest.CaptureFixture[str],
                                                             runtime: str) -> None:
    """Hundreds of services make a reply far larger than the 64 KiB a request may be."""
    os.chmod(runtime, 0o700)
    path = str(Path(runtime) / "control.sock")
    services = [{"name": f"svc-{i:04d}", "state": "running", "pid": 1000 + i,
                 "padding": "x" * 200} for i in range(1000)]
    reply = json.dumps({"ok": True, "status": {"version": 1, "services": services}}).encode()
    assert len(reply) > 200_000
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        code = show_status(None, None, True, {}, socket_path=path)
    finally:
        thread.join(10)
        server.close()
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["services"]) == 1000


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=200))
def test_any_credentials_file_is_used_or_refused_without_quoting_it(content: bytes) -> None:
    """Whatever the file holds: a clean exit 4 naming the file (never its content), or, for a
    well-formed user:password, a request to a port where nobody listens (exit 4 too)."""
    with tempfile.TemporaryDirectory() as directory:
        secret = Path(directory) / "auth"
        secret.write_bytes(b"CANARY" + content)
        out, err = io_run(lambda: show_status(
            "http://127.0.0.1:9", None, False, {}, auth=HttpAuth(basic_auth_file=str(secret))))
    assert out[0] == 4
    assert "CANARY" not in out[1] + err and "Traceback" not in err


def io_run(call: Any) -> tuple[tuple[int, str], str]:
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = call()
    return (code, stdout.getvalue()), stderr.getvalue()


class FakeControlSocket:
    """A control socket of our own (so trusted) that answers every request with `reply`."""

    def __init__(self, directory: str) -> None:
        os.chmod(directory, 0o700)
        self.path = str(Path(directory) / "control.sock")
        self.reply = b""
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def both_ways() -> Iterator[tuple[FakeControlSocket, Any]]:
    directory = tempfile.mkdtemp(prefix="svs-")
    fake = FakeControlSocket(directory)
    try:
        with fake_daemon() as server:
            yield fake, server
    finally:
        fake.close()
        shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=80, deadline=None)
@given(document=documents, as_json=st.booleans())
def test_the_same_document_prints_the_same_and_exits_the_same_either_way(
        both_ways: tuple[FakeControlSocket, Any], document: Any, as_json: bool) -> None:
    fake, server = both_ways
    if isinstance(document, dict) and not document.get("time"):
        document["time"] = 1.0  # else "ago" is measured from two different clocks readings
    body = json.dumps(document, allow_nan=True)
    fake.reply = ('{"ok": true, "status": ' + body + "}\n").encode()
    server.body = body.encode()
    by_socket = io_run(lambda: show_status(None, None, as_json, {}, socket_path=fake.path))
    by_http = io_run(lambda: show_status(url_of(server), None, as_json, {}))
    assert by_socket[0] == by_http[0]  # exit code and stdout
    assert by_socket[0][0] in (0, 3, 4)
    assert bool(by_socket[1]) == bool(by_http[1])  # an error line on both, or on neither
