"""Helpers shared by the daemon tests: free ports, config files, an in-process daemon."""

from __future__ import annotations

import inspect
import json
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from supervisor.config import Config, load_config
from supervisor.daemon import Daemon
from supervisor.runner import ServiceSnapshot

T = TypeVar("T")

PY = sys.executable
# What a loaded machine (2 cores shared with a CPU hog and other test runs) can add to a time
# bound that is the point of a test: a process or thread held back from a CPU for a second or
# more. Such a bound must still tell the behaviour apart from its failure (a timeout that is not
# honoured takes the whole hang; a missing poke waits a full interval), so choose the failure
# far away rather than the bound tight.
LOAD_SLACK = 2.0
SLEEPER_CODE = "import time\nwhile True: time.sleep(1)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, services: str, supervisor: str = "", port: int | None = None
                 ) -> Path:
    port = port or free_port()
    # Unix socket paths are limited to 107 bytes: keep it out of pytest's long tmp paths.
    sock_dir = tempfile.mkdtemp(prefix="sv-")
    text = (f'[supervisor]\nlisten = "127.0.0.1:{port}"\nstats_interval = 0.5\n'
            f'control_socket = "{sock_dir}/control.sock"\n'
            f"{textwrap.dedent(supervisor)}\n{textwrap.dedent(services)}")
    path = tmp_path / "services.toml"
    path.write_text(text)
    return path


def service(name: str, code: str, **keys: Any) -> str:
    """A [services.NAME] table running `python -c code`."""
    lines = [f"[services.{name}]", f"command = {json.dumps([PY, '-c', textwrap.dedent(code)])}"]
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def running_daemon(path: Path, **kwargs: Any) -> AsyncIterator[Daemon]:
    config: Config = load_config(path)
    daemon = Daemon(config, handle_signals=False, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_shutdown()


async def wait_for(daemon: Daemon, name: str, predicate: Callable[[ServiceSnapshot], bool],
                   timeout: float = 10.0) -> ServiceSnapshot:
    with anyio.fail_after(timeout):
        return await daemon.runners[name].wait_until(predicate)


def base_url(daemon: Daemon) -> str:
    assert daemon.listen_address is not None
    host, port = daemon.listen_address
    return f"http://{host}:{port}"


async def get(daemon: Daemon, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(daemon), timeout=10) as client:
        return await client.get(path, **kwargs)


def sample(text: str, name: str, **labels: str) -> float | None:
    """Read one sample's value from exposition text with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def promtool_ok(text: str | bytes) -> None:
    """`promtool check metrics` lints the text (it accepts empty input, so that is refused)."""
    import shutil
    import subprocess

    data = text.encode() if isinstance(text, str) else text
    assert data.strip(), "promtool accepts empty input; an empty exposition proves nothing"
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: .ci/run installs Debian's prometheus"
    done = subprocess.run([promtool, "check", "metrics"], input=data, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll a cheap predicate (sync code) until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def until(check: Callable[[], T | Awaitable[T]], within: float, what: str,
                interval: float = 0.05) -> T:
    """Await (or call) `check` until it returns something truthy; that value. A deadline, not
    a fixed wait: set it for a loaded machine (it costs nothing when the condition comes early).
    On timeout an AssertionError names `what` was awaited and the last value seen."""
    last: Any = None
    try:
        with anyio.fail_after(within):
            while True:
                last = check()
                if inspect.isawaitable(last):
                    last = await last
                if last:
                    return last  # type: ignore[no-any-return]
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what} (last: {last!r})") from None


def receive_notify(sock: socket.socket, wanted: str, timeout: float,
                   seen: list[str] | None = None) -> float:
    """Read sd_notify datagrams from `sock` (each appended to `seen`) until one carries the line
    `wanted` (e.g. "READY=1", "STATUS=1 running"); the time.monotonic() it was read."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return time.monotonic()
    raise AssertionError(f"no {wanted} within {timeout}s; got {seen}")


def metrics_server(port: int, body_file: Path) -> str:
    """Code for a service that serves `body_file` (read at every GET, so a test can change it)
    as a Prometheus text exposition on 127.0.0.1:`port`."""
    return (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        body = open({str(body_file)!r}, 'rb').read()\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Type', 'text/plain; version=0.0.4')\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")


def served(sources: list[list[Any]], deny: Any, accept: str = "text/plain;version=0.0.4"
           ) -> tuple[str, list[tuple[str, str]]]:
    """What /v1/metrics serves for these families, through the production merge
    (render.CachingRenderer), source `s<i>` for the i-th list; and the clashes it reported as
    (source, family name)."""
    from prometheus_client.exposition import choose_encoder

    from supervisor.observe.render import CachingRenderer, always

    clashes: list[tuple[str, str]] = []
    srcs = [always(f"s{i}", lambda f=families: f, service=f"s{i}")  # type: ignore[misc]
            for i, families in enumerate(sources)]
    renderer = CachingRenderer(lambda: srcs, lambda: deny,
                               lambda service, family: clashes.append((service, family)))
    encoder, content_type = choose_encoder(accept)
    return renderer.render(encoder, content_type).decode(), clashes
