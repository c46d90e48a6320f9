"""The orphan guard's own process (see guard.py): `python -I -S guard_process.py FD`.

Only interpreter-builtin C modules are imported (no socket.py, signal.py or enum), so the guard
holds about 3 MiB of its own memory instead of 6.
"""

import _signal  # type: ignore[import-not-found]  # (typeshed knows only signal.py)
import _socket
import os
import select
import sys
from array import array

_STOP_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_FD_BYTES = array("i").itemsize


def serve(fd: int) -> None:
    for sig in _STOP_SIGNALS:  # only the daemon's end of the socket ends the guard
        _signal.signal(sig, _signal.SIG_IGN)
    sock = _socket.socket(fileno=fd)
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    watched: dict[int, int] = {}  # pidfd -> pid
    space = _socket.CMSG_SPACE(4 * _FD_BYTES)
    while True:
        for ready, _ in poller.poll():
            if ready != fd:  # that service process ended: it needs no killing any more
                poller.unregister(ready)
                os.close(ready)
                del watched[ready]
                continue
            try:
                data, ancillary, _, _ = sock.recvmsg(64, space)
            except OSError:
                data, ancillary = b"", []
            fds = array("i")
            for level, kind, payload in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
            if not data:  # the daemon is gone
                for pidfd in fds:
                    os.close(pidfd)
                kill_all(watched)
                return
            pid = int.from_bytes(data[:4], sys.byteorder, signed=True)
            for pidfd in fds:
                watched[pidfd] = pid
                poller.register(pidfd, select.EPOLLIN)


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


if __name__ == "__main__":
    serve(int(sys.argv[1]))
