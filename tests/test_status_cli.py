"""`supervisor status` from anywhere: --url, $SUPERVISOR_URL, the daemon's status file, then
the config; proxies ignored for loopback; malformed answers are exit 4, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.config import load_config
from supervisor.control import rundir
from supervisor.control.client import show_status
from supervisor.core.lifecycle import State
from supervisor.daemon import Daemon
from tests.support import SLEEPER_CODE, base_url, free_port, service, wait_for


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                              text=True, timeout=60, cwd=cwd, env=env)

    return run()


def hostile_env(runtime: str | None = None) -> dict[str, str]:
    """Proxies that go nowhere, and a runtime directory of the test's own."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPERVISOR_URL", "RUNTIME_DIRECTORY", "NO_PROXY", "no_proxy")}
    env.update({"HTTP_PROXY": dead, "http_proxy": dead, "HTTPS_PROXY": dead,
                "https_proxy": dead, "ALL_PROXY": dead, "all_proxy": dead})
    if runtime is not None:
        env["XDG_RUNTIME_DIR"] = runtime
    return env


@pytest.mark.anyio
async def test_status_from_anywhere_through_proxies(tmp_path: Path) -> None:
    runtime = tempfile.mkdtemp(prefix="svr-")
    try:
        config_dir = tmp_path / "etc"
        config_dir.mkdir()
        path = config_dir / "services.toml"
        path.write_text(f'[supervisor]\nlisten = "127.0.0.1:{free_port()}"\n\n'
                        + service("api", SLEEPER_CODE, start_seconds=0.1))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "services.toml").write_text("[services.api\nbroken = ")  # being edited
        env = hostile_env(runtime)
        daemon = Daemon(load_config(path), environ={"XDG_RUNTIME_DIR": runtime},
                        handle_signals=False)
        status_file = Path(runtime) / "supervisor" / rundir.STATUS_FILE
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                await wait_for(daemon, "api", lambda s: s.state is State.RUNNING)
                assert json.loads(status_file.read_text())["url"] == base_url(daemon)
                for args, extra in ((("status",), {}),
                                    (("status", "--json"), {}),
                                    (("status", "--config", str(path)), {}),
                                    (("status",), {"SUPERVISOR_URL": base_url(daemon),
                                                   "XDG_RUNTIME_DIR": "/nonexistent"}),
                                    (("status", "--url", base_url(daemon)),
                                     {"XDG_RUNTIME_DIR": "/nonexistent"})):
                    result = await anyio.to_thread.run_sync(
                        lambda a=args, e=extra: run_cli(*a, cwd=elsewhere, env={**env, **e}))
                    assert result.returncode == 0, (args, result.stderr)
                    assert "api" in result.stdout and "Traceback" not in result.stderr
            finally:
                daemon.request_shutdown()
        assert not status_file.exists()  # removed at exit
        down = run_cli("status", cwd=elsewhere, env=env)
        assert down.returncode == 4 and "Traceback" not in down.stderr
        assert len(down.stderr.strip().splitlines()) == 1
    finally:
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)


# -- malformed answers ----------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body: bytes = self.server.body  # type: ignore[attr-defined]
        length: int = self.server.length  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length if length >= 0 else len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fake_daemon() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.body = b"{}"  # type: ignore[attr-defined]
    server.length = -1  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("body,length", [
    (b"not json", -1), (b"[1, 2]", -1), (b'{"services": "x"}', -1),
    (b'{"services": [{"name": "a", "state": "running", "pid": "x", "uptime_seconds": "y"}]}',
     -1),
    (b'{"services": [{"name": "a", "state": "running"}]', -1),  # truncated JSON
    (b'{"services": []}', 1000),  # truncated body
    (b"\xff\xfe\x00", -1), (b"[" * 100000, -1),
])
def test_malformed_answers_are_exit_4_through_the_cli(tmp_path: Path, body: bytes,
                                                      length: int) -> None:
    with fake_daemon() as server:
        server.body, server.length = body, length  # type: ignore[attr-defined]
        for extra in ((), ("--json",)):
            result = run_cli("status", "--url", url_of(server), *extra, cwd=tmp_path,
                             env=hostile_env())
            assert result.returncode == 4, (body[:80], result.stdout, result.stderr)
            assert "malformed" in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "state", "pid", "uptime_seconds", "starts", "last_exit",
                         "next_start_in_seconds", "scrape", "readiness", "checks", "healthy",
                         "latency_ms", "error", "signal", "code", "at", "reason", "services",
                         "time", "status", "ok"]) | st.text(max_size=4), inner, max_size=6),
    max_leaves=20)
service_rows = st.fixed_dictionaries(
    {"name": st.text(max_size=6), "state": st.sampled_from(["running", "stopped", "x"])},
    optional={"pid": json_values, "uptime_seconds": json_values, "starts": json_values,
              "last_exit": json_values, "next_start_in_seconds": json_values,
              "scrape": json_values})
documents = json_values | st.fixed_dictionaries(
    {"services": st.lists(service_rows, max_size=3)},
    optional={"time": json_values, "readiness": json_values})


@pytest.fixture(scope="module")
def shared_fake_daemon() -> Iterator[ThreadingHTTPServer]:
    with fake_daemon() as server:
        yield server


@settings(max_examples=100, deadline=None)
@given(document=documents, as_json=st.booleans())
def test_any_json_answer_gives_a_table_or_a_clean_exit_4(
        shared_fake_daemon: ThreadingHTTPServer, document: Any, as_json: bool) -> None:
    server = shared_fake_daemon
    server.body = json.dumps(document, allow_nan=True).encode()  # type: ignore[attr-defined]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = show_status(url_of(server), None, as_json, environ={})
    assert code in (0, 3, 4)
    if code == 4:
        assert "malformed" in err.getvalue() and out.getvalue() == ""
    else:
        assert out.getvalue() and err.getvalue() == ""


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    # `supervisor status | head -3`: the pipe closes under the writer.
    document = {"version": 1, "time": 1.0, "services": [
        {"name": f"svc{i}", "state": "running", "pid": 100 + i} for i in range(2000)]}
    body = json.dumps(document).encode()
    with fake_daemon() as server:
        server.body = body  # type: ignore[attr-defined]
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line
        try:
            proc = subprocess.run([sys.executable, "-m", "supervisor", "status", "--url",
                                   url_of(server)], stdout=write_end, stderr=subprocess.PIPE,
                                  text=True, timeout=30, cwd=tmp_path)
        finally:
            os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_a_service_without_a_process_shows_no_scrape_verdict() -> None:
    from supervisor.control.client import render

    document = {"version": 1, "time": 1.0, "services": [
        {"name": "api", "state": "waiting", "pid": None, "waiting_for": "dependency db",
         "scrape": {"ok": False, "error": "connection refused"}},
        {"name": "db", "state": "running", "pid": 42, "uptime_seconds": 3.0,
         "scrape": {"ok": False, "error": "connection refused"}}]}
    rows = {line.split()[0]: line.split() for line in render(document).splitlines()[1:3]}
    assert "failing" not in rows["api"] and rows["api"][-1] == "-"
    assert "failing" in rows["db"]
