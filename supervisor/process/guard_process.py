"""The orphan guard's own process (see guard.py): `python -I -S guard_process.py FD [CGROUP]`.

Only interpreter-builtin C modules are imported (no socket.py, signal.py or enum), so the guard
holds about 3 MiB of its own memory instead of 6.
"""

import _signal  # type: ignore[import-not-found]  # (typeshed knows only signal.py)
import _socket
import os
import select
import sys
from array import array
from io import BufferedReader

_STOP_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_FD_BYTES = array("i").itemsize
_PAUSE_MS = 20  # at most one wake-up per pause for the daemon's messages (see serve)
STOPPING = b"stopping"  # guard.py's: the daemon is shutting down (a pid message is 4 bytes)
SERVICE_SUFFIX = ".service"  # cgroup.py's: a service's cgroup (never the daemon's leaf)


def serve(fd: int, cgroup: str | None = None) -> None:
    for sig in _STOP_SIGNALS:  # only the daemon's end of the socket ends the guard
        _signal.signal(sig, _signal.SIG_IGN)
    if cgroup is not None:
        try:  # out of the daemon's leaf, which is killed with the daemon
            _write(cgroup + "/guard/cgroup.procs", b"0")
        except OSError:
            cgroup = None
    sock = _socket.socket(fileno=fd)
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    # The pause's own wait: woken by the daemon's end only, not by its messages (keyed
    # wake-ups: arriving data does not even wake a poll that asked for no POLLIN).
    hangup = select.poll()
    hangup.register(fd, select.POLLRDHUP)
    watched: dict[int, int] = {}  # pidfd -> pid
    emptying: dict[int, str] = {}  # cgroup.events fd -> its service cgroup (shutting down)
    space = _socket.CMSG_SPACE(4 * _FD_BYTES)
    while True:
        for ready, _ in poller.poll():
            if ready in emptying:  # that cgroup's `populated` changed
                if not _still_populated(ready):
                    _remove_emptied(poller, emptying, ready)
                continue
            if ready != fd:  # that service process ended: it needs no killing any more
                poller.unregister(ready)
                os.close(ready)
                del watched[ready]
                continue
            while True:  # every message queued, not one per wake-up
                try:
                    data, ancillary, _, _ = sock.recvmsg(64, space, _socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    data, ancillary = b"", []
                fds = array("i")
                for level, kind, payload in ancillary:
                    if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
                if data == STOPPING:
                    if cgroup is not None:
                        _watch_emptying(cgroup, poller, emptying)
                    continue
                if not data:  # the daemon is gone
                    for pidfd in fds:
                        os.close(pidfd)
                    for events in emptying:
                        os.close(events)
                    if cgroup is not None:
                        kill_cgroups(cgroup)
                    kill_all(watched)
                    if cgroup is not None:
                        remove_cgroups(cgroup)
                    return
                pid = int.from_bytes(data[:4], sys.byteorder, signed=True)
                for pidfd in fds:
                    watched[pidfd] = pid
                    poller.register(pidfd, select.EPOLLIN)
        # At most one wake-up per pause for messages: woken for each of a startup's spawns,
        # the guard preempted the daemon on its core (0.25 ms of each 0.6 ms spawn). Nothing
        # waits on the guard meanwhile: what the daemon sends is queued in the socket, pidfds
        # included (they stay valid in flight), and read, in order, before the end of the
        # daemon, which ends the pause at once (a clean shutdown waits for the guard's exit).
        hangup.poll(_PAUSE_MS)


def _watch_emptying(cgroup: str, poller: "select.epoll", emptying: dict[int, str]) -> None:
    """Remove each service cgroup of the instance once it is empty: now if it is, else when
    its cgroup.events says so (EPOLLPRI: kernfs signals a change of the file)."""
    for child in _children(cgroup):
        if not child.endswith(SERVICE_SUFFIX) or child in emptying.values():
            continue
        try:
            events = os.open(child + "/cgroup.events", os.O_RDONLY)
        except OSError:
            continue
        emptying[events] = child
        poller.register(events, select.EPOLLPRI)
        if not _still_populated(events):  # the read also arms the next notification
            _remove_emptied(poller, emptying, events)


def _still_populated(events: int) -> bool:
    try:
        return b"populated 1" in os.pread(events, 4096, 0)
    except OSError:
        return False


def _remove_emptied(poller: "select.epoll", emptying: dict[int, str], events: int) -> None:
    poller.unregister(events)
    os.close(events)
    try:
        os.rmdir(emptying.pop(events))
    except OSError:  # refilled (a placement just before the shutdown), or gone already
        pass


def kill_all(watched: dict[int, int]) -> None:
    for pidfd, pid in watched.items():
        alive = not select.select([pidfd], [], [], 0)[0]  # a pidfd reads ready once it exits
        if alive:
            try:
                os.killpg(pid, _signal.SIGKILL)  # the leader lives, so its group id is its pid
            except OSError:
                pass
        try:
            _signal.pidfd_send_signal(pidfd, _signal.SIGKILL)
        except OSError:
            pass


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _children(cgroup: str) -> list[str]:
    try:
        names = os.listdir(cgroup)
    except OSError:
        return []
    return [cgroup + "/" + n for n in names if n != "guard" and os.path.isdir(cgroup + "/" + n)]


def kill_cgroups(cgroup: str) -> None:
    """cgroup.kill every cgroup of the instance but the guard's: each service's, and the
    daemon's leaf (anything there outlived the daemon)."""
    for child in _children(cgroup):
        try:
            _write(child + "/cgroup.kill", b"1")
        except OSError:
            pass


def _populated(events: BufferedReader) -> bool:
    try:
        events.seek(0)
        return b"populated 1" in events.read()
    except OSError:
        return False


def remove_cgroups(cgroup: str, timeout_ms: int = 5000) -> None:
    """Wait (on cgroup.events' change notifications, bounded) for the killed cgroups to
    empty, then remove the instance's subtree, moving this process out of it last."""
    files = []
    for child in _children(cgroup):
        try:
            files.append(open(child + "/cgroup.events", "rb"))  # noqa: SIM115
        except OSError:
            continue
    poller = select.poll()
    for f in files:
        poller.register(f.fileno(), select.POLLPRI)
    for _ in range(timeout_ms // 100):
        # Reading re-arms the notification (kernfs compares against the last read).
        if not any(_populated(f) for f in files):
            break
        poller.poll(100)  # woken by a change of cgroup.events; 100 ms bounds a lost one
    for f in files:
        f.close()
    for child in _children(cgroup):
        try:
            os.rmdir(child)
        except OSError:
            pass
    parent = cgroup.rsplit("/", 1)[0]
    try:
        _write(parent + "/cgroup.procs", b"0")
        os.rmdir(cgroup + "/guard")
        os.rmdir(cgroup)
    except OSError:
        pass


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
