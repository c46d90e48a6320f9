"""The control channel: start/stop/restart/reload over a Unix socket, never over HTTP.

supervisord's CVE-2017-11610 came from a control API on its HTTP server; here the HTTP port is
read-only and control needs access to a socket file created with mode 0600 (0660 with
`control_socket_group`). One JSON line in, one JSON line out. Commands come from an explicit
allow-list; requests naming an unknown service change nothing.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor import lifecycle as lc
from supervisor.errors import SupervisorError

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

log = logging.getLogger(__name__)

COMMANDS = ("start", "stop", "restart", "reload")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0


def default_socket_path(environ: dict[str, str] | None = None) -> str:
    """systemd's RuntimeDirectory=platform-supervisor gives /run/platform-supervisor; the CLI
    run by root outside systemd finds the same path. Other users get a private directory of
    their own."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return str(Path(runtime) / "control.sock")
    if os.geteuid() == 0:
        return "/run/platform-supervisor/control.sock"
    base = env.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"supervisor-{os.geteuid()}" / "control.sock")


def socket_path_for(config_path: str) -> str:
    """Where the daemon run with `config_path` listens for control. Reads only that one key, so
    that `supervisor reload` still reaches the daemon when the edited file is invalid."""
    from supervisor.config import load_toml_file
    from supervisor.datatypes import interpolate

    try:
        configured = load_toml_file(config_path).get("supervisor", {}).get("control_socket")
        if isinstance(configured, str):
            path = Path(interpolate(configured, os.environ)).expanduser()
            if not path.is_absolute():
                path = Path(config_path).resolve().parent / path
            return str(path)
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return default_socket_path()


async def serve_control(daemon: Daemon, path: str, group: str | None, *,
                        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    directory = Path(path).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if Path(path).is_socket():
        if _socket_answers(path):
            raise SupervisorError(f"control socket {path} is in use by another daemon")
        Path(path).unlink()
    listener = await anyio.create_unix_listener(path, mode=0o600)
    if group is not None:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        except (KeyError, OSError) as exc:
            log.error("control socket group=%s not applied: %s", group, exc)
    log.info("control socket path=%s", path)
    try:
        async with listener:
            task_status.started()
            await listener.serve(lambda stream: _handle(daemon, stream))
    finally:
        try:
            Path(path).unlink()
        except OSError:
            pass


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


async def _handle(daemon: Daemon, stream: SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                buffered = BufferedByteReceiveStream(stream)
                line = await buffered.receive_until(b"\n", MAX_REQUEST)
            request = json.loads(line)
            response = await execute(daemon, request)
        except TimeoutError:
            response = {"ok": False, "error": "request timed out"}
        except (anyio.IncompleteRead, anyio.DelimiterNotFound, ValueError):
            response = {"ok": False, "error": "malformed request: expected one JSON line"}
        try:
            await stream.send(json.dumps(response).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def execute(daemon: Daemon, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict) or request.get("command") not in COMMANDS:
        return {"ok": False, "error": f"unknown command (expected one of {', '.join(COMMANDS)})"}
    command = request["command"]
    log.info("control command=%s services=%s", command, ",".join(request.get("services") or []))
    if daemon.shutting_down():  # services are being stopped for good: start or reload nothing
        return {"ok": False, "error": f"the daemon is shutting down; {command} refused"}
    if command == "reload":
        result = await daemon.reload()
        if result.error is not None:
            return {"ok": False, "error": result.error}
        return {"ok": result.ok, "problems": list(result.problems), "added": list(result.added),
                "removed": list(result.removed), "changed": list(result.changed)}
    names = request.get("services")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return {"ok": False, "error": "name at least one service"}
    unknown = [n for n in names if n not in daemon.runners]
    if unknown:
        return {"ok": False, "error": f"unknown service(s): {', '.join(unknown)} "
                                      f"(known: {', '.join(daemon.runners)})"}
    if command == "start":
        # A start never ignores depends_on: refused (nothing changes) while a dependency that
        # is not named too neither runs nor exited successfully.
        refused = []
        for name in dict.fromkeys(names):
            blockers = daemon.unsatisfied_dependencies(name, ignore=tuple(names))
            if blockers:
                why = ", ".join(f"{dep} ({state})" for dep, state in blockers.items())
                refused.append(f"{name} needs {why}")
        if refused:
            return {"ok": False, "error": "not started: " + "; ".join(refused)
                    + " (start the dependencies first, or name them too)"}
    results: dict[str, str] = {}
    done = {name: anyio.Event() for name in names}
    async with anyio.create_task_group() as tg:
        for name in done:
            tg.start_soon(_apply, daemon, command, name, results, done)
    return {"ok": True, "services": results}


async def _apply(daemon: Daemon, command: str, name: str, results: dict[str, str],
                 done: dict[str, anyio.Event]) -> None:
    runner = daemon.runners.get(name)
    if runner is None:  # a reload removed it since the request was checked
        results[name] = "removed"
        done[name].set()
        return
    spec = runner.spec
    bound = spec.stop_timeout + spec.start_seconds + 10.0
    with anyio.move_on_after(bound):
        if command == "stop":
            await runner.stop_and_wait()
        elif command == "start":
            # Dependencies named in the same request start first; if one of them does not
            # come up, this one is not started (it stays as it was, e.g. `waiting`).
            for dep in spec.depends_on:
                if dep in done:
                    await done[dep].wait()
            if not daemon.unsatisfied_dependencies(name):
                await runner.wait_applied(runner.start())
                await runner.wait_until(lambda s: s.state not in (lc.State.STARTING,)
                                        and s.state is not lc.State.STOPPED)
        elif command == "restart":
            before = runner.snapshot.starts
            runner.stop()
            runner.start()  # the lifecycle spawns again once the stop has completed
            await runner.wait_until(lambda s: s.starts > before and s.state is not
                                    lc.State.STARTING or s.state in (lc.State.FATAL,))
    results[name] = runner.snapshot.state.value
    done[name].set()


# -- client side (the CLI) -------------------------------------------------------------------
def request(path: str, command: str, services: Sequence[str] = (), timeout: float = 120.0
            ) -> dict[str, Any]:
    """Blocking client used by the CLI. Raises OSError when the daemon cannot be reached."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, "services": list(services)}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result
