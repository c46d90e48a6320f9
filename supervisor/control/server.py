"""The control channel: start/stop/restart/reload over a Unix socket, never over HTTP, and a
read-only `status` (the /v1/status document) for `supervisor status` on the daemon's host.

supervisord's CVE-2017-11610 came from a control API on its HTTP server; here the HTTP port is
read-only and control needs access to a socket file created with mode 0600 (0660 with
`control_socket_group`). One JSON line in, one JSON line out. Commands come from an explicit
allow-list; requests naming an unknown service change nothing.

The socket lives in a private runtime directory (see `rundir`) and is taken, with a lock next
to it, before any service is spawned (`ControlSocket`); the client sends nothing until it has
checked who owns the socket file and, once connected, who runs the process behind it.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.control import rundir
from supervisor.core import lifecycle as lc
from supervisor.core.errors import SupervisorError

if TYPE_CHECKING:
    from supervisor.core.redact import Redactor
    from supervisor.runner import ServiceRunner

log = logging.getLogger(__name__)

COMMANDS = ("start", "stop", "restart", "reload", "status")
MAX_REQUEST = 64 * 1024
# A reply can be a whole status document (hundreds of services): the client reads up to this.
MAX_REPLY = 16 * 1024 * 1024
REQUEST_TIMEOUT = 5.0
BACKLOG = 64
# Requests handled at once; more wait in the listen backlog. Each holds a descriptor for up
# to REQUEST_TIMEOUT: without a cap, a client opening connections in a loop could use up the
# daemon's descriptors, and with them its services' next spawns.
MAX_CLIENTS = 32
# accept() errors that say "not now" (out of descriptors or memory, a client gone before it
# was accepted): the loop waits and accepts again, doubling the wait up to the maximum,
# instead of ending, which ended the daemon (and stopped every service) when a start of 400
# services had used up its descriptors.
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                        errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
ACCEPT_PAUSE = (0.005, 1.0)


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    problems: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    error: str | None = None  # refused without reading the file (the daemon is stopping)
    restart_needed: tuple[str, ...] = ()  # changed restart-only [supervisor] keys (not applied)


class Controlled(Protocol):
    """What the control socket needs of the daemon (the daemon is one)."""

    @property
    def redactor(self) -> Redactor: ...
    @property
    def runners(self) -> Mapping[str, ServiceRunner]: ...
    def status(self) -> tuple[int, dict[str, Any]]: ...
    def shutting_down(self) -> bool: ...
    async def reload(self) -> ReloadResult: ...
    def unsatisfied_dependencies(self, name: str, ignore: tuple[str, ...] = ()
                                 ) -> dict[str, str]: ...


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """`control.sock` in the default runtime directory (see `rundir.default_directory`):
    systemd's RuntimeDirectory=platform-supervisor gives /run/platform-supervisor, and the
    CLI run by the same user with the same environment finds the same path."""
    return str(Path(rundir.default_directory(environ)) / "control.sock")


def socket_path_for(config_path: str) -> str:
    """Where the daemon run with `config_path` listens for control. Reads only that one key, so
    that `supervisor reload` still reaches the daemon when the edited file is invalid."""
    from supervisor.config import load_toml_file
    from supervisor.core.datatypes import interpolate

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


class ControlSocket:
    """The bound (not yet served) control socket, and the lock that makes it this daemon's.

    Taken before any service is spawned: a second daemon configured with the same socket is
    refused here, before it has started anything, and the first one is not disturbed.
    """

    def __init__(self, path: str, group: str | None = None) -> None:
        self.path = path
        self.directory = str(Path(path).parent)
        rundir.ensure_private(self.directory)
        # The lock, not the socket file, decides which daemon owns the path: a connect() to a
        # socket that is bound but not yet listening fails, so "does it answer" alone would let
        # two daemons starting together both take it. The lock dies with its process.
        self._lock = _take_lock(path + ".lock", path)
        try:
            _clear_stale(path)
            self.sock = _bind(path)
        except BaseException:
            os.close(self._lock)
            raise
        st = os.lstat(path)
        self._identity = (st.st_dev, st.st_ino)
        if group is not None:
            _share_with_group(path, self.directory, group)

    def close(self) -> None:
        """Close the socket and remove its file (only if it is still ours), then unlock."""
        if self._lock < 0:
            return
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._lock)
        self._lock = -1


def _take_lock(lock_path: str, path: str) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SupervisorError(f"cannot open control socket lock {lock_path}: "
                              f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SupervisorError(f"control socket {path} is held by another running daemon; "
                              "refusing to start a second one (nothing was started)") from None
    return fd


def _clear_stale(path: str) -> None:
    """Remove what a dead daemon left at `path`; refuse anything that is not a socket."""
    try:
        st = os.lstat(path)  # never follows a symlink
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SupervisorError(f"control socket {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a directory"
                if stat.S_ISDIR(st.st_mode) else "a regular file"
                if stat.S_ISREG(st.st_mode) else "not a socket")
        raise SupervisorError(f"control socket path {path} exists and is {kind}; refusing to "
                              "replace it (remove it, or set another control_socket)")
    if not rundir.trusted_owner(st):
        raise SupervisorError(f"control socket {path} belongs to uid {st.st_uid}; refusing "
                              "to replace it")
    if _socket_answers(path):
        raise SupervisorError(f"control socket {path} is held by another running daemon; "
                              "refusing to start a second one (nothing was started)")
    os.unlink(path)  # a stale socket of a daemon that died


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file and fails on anything already there, symlinks included.
        sock.bind(path)
        os.chmod(path, 0o600)  # inside a private directory no one else can swap it meanwhile
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot listen on control socket {path}: "
                              f"{exc.strerror or exc}") from None
    return sock


def _share_with_group(path: str, directory: str, group: str) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        st = os.lstat(directory)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700:
            os.chown(directory, -1, gid)
            os.chmod(directory, 0o750)  # the group may traverse, not write
    except (KeyError, OSError) as exc:
        log.error("control socket group=%s not applied: %s", group, exc)


async def serve_control(daemon: Controlled, control: ControlSocket, *,
                        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    listener = await anyio.abc.SocketListener.from_socket(control.sock)
    log.info("control socket path=%s", control.path)
    slots = anyio.Semaphore(MAX_CLIENTS)
    async with listener, anyio.create_task_group() as tg:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                stream = await _accept(listener)
            except BaseException:
                slots.release()
                raise
            tg.start_soon(_handle_then_release, daemon, stream, slots)


async def _accept(listener: anyio.abc.SocketListener) -> SocketStream:
    """The next connection, waiting out transient accept() errors (_TRANSIENT)."""
    pause, warned = ACCEPT_PAUSE[0], False
    while True:
        try:
            return await listener.accept()
        except (anyio.BrokenResourceError, OSError) as exc:
            error = exc if isinstance(exc, OSError) else exc.__cause__
            if not isinstance(error, OSError) or error.errno not in _TRANSIENT:
                raise
            if not warned:  # once per streak, not once per retry
                log.warning("control socket cannot accept error=%s; retrying",
                            error.strerror or error)
                warned = True
        await anyio.sleep(pause)
        pause = min(pause * 2, ACCEPT_PAUSE[1])


async def _handle_then_release(daemon: Controlled, stream: SocketStream,
                               slots: anyio.Semaphore) -> None:
    try:
        await _handle(daemon, stream)
    finally:
        slots.release()


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


async def _handle(daemon: Controlled, stream: SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                buffered = BufferedByteReceiveStream(stream)
                line = await buffered.receive_until(b"\n", MAX_REQUEST)
            request = json.loads(line)
            response = daemon.redactor.redact_obj(await execute(daemon, request))
        except TimeoutError:
            response = {"ok": False, "error": "request timed out"}
        except (anyio.IncompleteRead, anyio.DelimiterNotFound, ValueError):
            response = {"ok": False, "error": "malformed request: expected one JSON line"}
        try:
            await stream.send(json.dumps(response).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def execute(daemon: Controlled, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict) or request.get("command") not in COMMANDS:
        return {"ok": False, "error": f"unknown command (expected one of {', '.join(COMMANDS)})"}
    command = request["command"]
    if command == "status":
        # Read-only: the same document as GET /v1/status, built and redacted the same way, for
        # `supervisor status` on this host when the HTTP port wants TLS or credentials.
        _code, document = daemon.status()
        return {"ok": True, "status": document}
    log.info("control command=%s services=%s", command, ",".join(request.get("services") or []))
    if daemon.shutting_down():  # services are being stopped for good: start or reload nothing
        return {"ok": False, "error": f"the daemon is shutting down; {command} refused"}
    if command == "reload":
        result = await daemon.reload()
        if result.error is not None:
            return {"ok": False, "error": result.error}
        return {"ok": result.ok, "problems": list(result.problems), "added": list(result.added),
                "removed": list(result.removed), "changed": list(result.changed),
                "restart_needed": list(result.restart_needed)}
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


async def _apply(daemon: Controlled, command: str, name: str, results: dict[str, str],
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
                    other = daemon.runners.get(dep)
                    if other is not None and other.snapshot.ready is not None:
                        # It has a readiness probe: wait (within the bound) until it is ready.
                        await other.wait_until(lambda s: s.is_ready or s.state not in (
                            lc.State.STARTING, lc.State.RUNNING))
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
class UntrustedSocket(SupervisorError):
    """The control socket is not one the CLI may send a command to."""


def request(path: str, command: str, services: Sequence[str] = (), timeout: float = 120.0
            ) -> dict[str, Any]:
    """Blocking client used by the CLI. Raises OSError when the daemon cannot be reached,
    UntrustedSocket before sending anything when the socket or the daemon behind it belongs
    to another user, ValueError for an answer that is not one JSON object."""
    st = os.lstat(path)  # a symlink is not followed, and is refused below
    check_socket(path, st)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        check_peer(path, sock, st)
        sock.sendall(json.dumps({"command": command, "services": list(services)}).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n") and len(data) <= MAX_REPLY:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError("expected a JSON object")
    return result


def check_socket(path: str, st: os.stat_result) -> None:
    """Accept a socket owned by root or by the caller, one shared with one of the caller's
    groups (control_socket_group: mode 0660), or one that only its owner can have placed
    (root and a daemon run as a service user in /run/platform-supervisor)."""
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise UntrustedSocket(f"refusing control socket {path}: it is {kind}")
    shared = (st.st_gid in (os.getegid(), *os.getgroups())
              and st.st_mode & 0o060 == 0o060 and not st.st_mode & 0o007)
    if not (rundir.trusted_owner(st) or shared
            or rundir.placed_by_owner(str(Path(path).parent), st)):
        raise UntrustedSocket(f"refusing control socket {path}: it belongs to uid {st.st_uid}, "
                              f"neither root nor you (uid {os.geteuid()}); nothing was sent")


def check_peer(path: str, sock: socket.socket, st: os.stat_result) -> None:
    """The process that accepted must run as root or as the socket file's owner."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, st.st_uid):
        raise UntrustedSocket(f"refusing control socket {path}: the process behind it runs as "
                              f"uid {uid}, not as its owner uid {st.st_uid}; nothing was sent")
