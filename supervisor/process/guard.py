"""The orphan guard: a small companion process that SIGKILLs every service if the daemon dies
without stopping them (SIGKILL, the OOM killer, a crash).

Why not PR_SET_PDEATHSIG in each child: it has to be armed between fork and exec, and CPython
can vfork() only without a preexec_fn. Exec'ing util-linux `setpriv --pdeathsig` in front of
each command works but costs a second exec, about 1 ms of a 1.5 ms spawn, and it covers the
direct child only. Instead the daemon hands the guard a pidfd for each service process right
after spawning it, over a Unix socket (SCM_RIGHTS). When the daemon's end of that socket
closes, which the kernel does however the daemon ends, the guard kills the process group of
every service still alive, then exits. A pidfd names one process, so a reused pid can never
be hit; a live leader's pid is its group's id, so the group is killed only while its leader
provably lives.

The guard reads its socket at most once per 20 ms pause, all that is queued at once: woken
for each message, it preempted the daemon on its core during a startup (a quarter of each
spawn). A registration counts from the moment it is queued: the kernel keeps the pidfds in
flight, and the guard reads everything queued before it acts on the daemon's end, which ends
a pause at once.

The guard runs guard_process.py as a script (`python -I -S guard_process.py FD`): builtin
modules only, no package import, so it starts in a few milliseconds and holds about 3 MiB of
its own memory. It ignores the terminal's and systemd's stop signals: only the daemon's end
ends it (or SIGKILL). On a clean shutdown the daemon stops its services first and then closes
the socket, so there is nothing left to kill. If the guard dies, the daemon starts a new one
on its next spawn and hands it every live service again (see OrphanGuard.ready).

With a cgroup per service (cgroup.py) the guard is given the daemon instance's cgroup and
moves itself into its own leaf there; when the daemon dies it writes cgroup.kill of every
other cgroup of the instance (each service's, and the daemon's own leaf, where nothing but
the daemon and services not yet placed in their own should be), waits for them to empty, and
removes the subtree. There is no window: a service is in its cgroup or in the daemon's leaf
from its first instruction, and the guard exists before it. At a clean shutdown the daemon
tells it `stopping` first, and it removes each service's cgroup once it has emptied, in
parallel with the daemon.

Without cgroups, the window: a service's pidfd reaches the guard once the daemon runs again
after the exec (usually microseconds; up to a scheduler time slice on a loaded machine). A
daemon SIGKILLed inside it leaves that one service running; see docs/operator-guide.md.
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_PID = struct.Struct("=i")
STOPPING = b"stopping"  # (guard_process.py has its own copy: it imports nothing of ours)
_GUARD_SCRIPT = str(Path(__file__).with_name("guard_process.py"))


class Guarded(Protocol):
    """A spawned service process: its pid, and a pidfd while it is unreaped (else < 0)."""

    pid: int

    def pidfd(self) -> int: ...


class OrphanGuard:
    """The daemon's side. Event-loop thread only (no locking)."""

    def __init__(self, python: str = sys.executable, cgroup: str | None = None) -> None:
        self._python = python
        # The daemon instance's cgroup (cgroup.py): the guard kills every cgroup under it.
        self.cgroup = cgroup
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # Live services by pid, to hand to a restarted guard; they drop out when collected.
        self._guarded: weakref.WeakValueDictionary[int, Guarded] = weakref.WeakValueDictionary()
        self.starts = 0  # guard processes started (a restart means one died)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ready(self) -> bool:
        """A guard is running: already, or started now (a restart after the guard died gets
        every live service handed over again). False if none can be run."""
        if self._running():
            return True
        self.close()
        try:
            self._start()
        except OSError as exc:
            log.warning("orphan guard cannot start error=%s", exc.strerror or exc)
            self.close()
            return False
        if self.starts > 1:
            log.warning("orphan guard restarted guard_pid=%s services=%d", self.pid,
                        len(self._guarded))
        for child in list(self._guarded.values()):
            if (fd := child.pidfd()) >= 0:  # else already reaped: nothing to guard
                self._send(child.pid, fd)
        return True

    def register(self, pid: int, pidfd: int) -> bool:
        """Hand a just-spawned service process to the guard, first thing after its exec."""
        if self._running() and self._send(pid, pidfd):
            return True
        return self.ready() and self._send(pid, pidfd)  # it died meanwhile: start another

    def stopping(self) -> None:
        """The daemon's shutdown has begun (cgroup mode): the guard removes each service's
        cgroup as soon as it is empty, in its own process, while the daemon still stops
        the others (1,000 rmdirs, ~50 ms, after the last exit were a daemon worker
        thread's, competing with the event loop for the GIL). It still kills everything
        when the daemon's end closes."""
        if self.cgroup is None or not self._running():
            return
        assert self._sock is not None
        try:
            self._sock.send(STOPPING)
        except OSError:
            pass  # then the daemon removes them all at the end, as without a guard

    def track(self, child: Guarded) -> None:
        """Remember a registered child, to hand it to a guard that replaces a dead one."""
        self._guarded[child.pid] = child

    def close(self) -> None:
        """Close our end (the guard then exits, killing whatever is still registered) and
        reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _running(self) -> bool:
        return self._sock is not None and self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [self._python, "-I", "-S", _GUARD_SCRIPT, str(theirs.fileno()),
                 *([self.cgroup] if self.cgroup else [])],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self.starts += 1

    def _send(self, pid: int, pidfd: int) -> bool:
        assert self._sock is not None
        try:
            # Blocking, but the guard only ever reads; its buffer holds thousands of these.
            socket.send_fds(self._sock, [_PID.pack(pid)], [pidfd])
            return True
        except OSError:
            return False
