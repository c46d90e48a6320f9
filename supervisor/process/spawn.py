"""Start a service's process and wait for its exit, on any anyio backend.

Why not anyio.open_process: on Python 3.11's asyncio it waits through ThreadedChildWatcher,
one thread per live child, and it offers no way to keep a SIGKILLed daemon from leaving its
services running. Instead:

* `subprocess.Popen` from the event-loop thread, in a new session, with no preexec_fn, so that
  CPython vfork()s (a fork() of the whole daemon, page tables and all, took 4.3 ms per spawn
  with 200 services; vfork about 0.6 ms).
* No orphans: the daemon's orphan guard (guard.py) gets a pidfd for each child right after
  the spawn and kills every service's group if the daemon dies. Without a guard (it cannot
  start), PR_SET_PDEATHSIG=SIGKILL is armed instead, by exec'ing util-linux
  `setpriv --pdeathsig KILL --` in front of the command (a second exec: about 1 ms more per
  spawn), or by a preexec_fn when setpriv is missing. PDEATHSIG fires when the *forking
  thread* ends, hence spawning only from the event-loop thread, which lives as long as the
  daemon. The signal mask is inherited from that thread, which blocks nothing.
* one pidfd per child, awaited with `anyio.wait_readable`, then `waitpid(pid)` for exactly that
  pid: we are the only reaper of our children, so exit codes are exact on both backends, and
  no thread is needed per child.
* stdout/stderr as non-blocking pipes, drained by the caller.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from supervisor.core.errors import SpawnError
from supervisor.process.guard import OrphanGuard

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


# Resolved once: the daemon's PATH at startup, not each service's.
SETPRIV: str | None = shutil.which("setpriv")


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of PID 1."""
    return bool(_prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status), None)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exit status {self.code}"


@dataclass
class Child:
    """A live child we own. Its pid is signalled only until it has been reaped."""

    pid: int
    stdout: int
    stderr: int
    _popen: subprocess.Popen[bytes] = field(repr=False)
    _pidfd: int = field(repr=False)
    status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        """Wait for the exit and reap. Cancel-safe: the child stays owned and unreaped."""
        while self.status is None:
            await anyio.wait_readable(self._pidfd)
            # WNOHANG, and only once the pidfd says the child has exited: never blocks.
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222
            if pid == self.pid:
                self.status = ExitStatus.from_wait_status(wait_status)
                # Tell Popen the child is gone so it never waitpid()s the number again.
                self._popen.returncode = os.waitstatus_to_exitcode(wait_status)
                os.close(self._pidfd)
                self._pidfd = -1
        return self.status

    def pidfd(self) -> int:
        """The pidfd while the child is unreaped, else -1."""
        return self._pidfd

    def signal_group(self, sig: int) -> bool:
        """Signal the child's whole process group. After the leader is reaped the group id stays
        reserved by the kernel while any member lives, so this still reaches leftovers."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def close_if_unreaped(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str,
          guard: OrphanGuard | None = None) -> Child:
    """Fork/exec a service in its own session. Raises SpawnError with a one-line reason.

    With a `guard`, the child is exec'd directly and handed to the guard; without one (or if
    the guard cannot run), PR_SET_PDEATHSIG is armed through setpriv or a preexec_fn."""
    if guard is not None and guard.ready():
        return _popen(list(argv), env, cwd, None, argv[0], guard)
    if SETPRIV is not None:
        # setpriv would report a missing program only as its own exit status 127: check here
        # so that the operator gets the reason and the service is not restarted in a loop.
        _check_executable(argv[0], env, cwd)
        command = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        preexec = None
    else:
        command, preexec = list(argv), _pdeathsig_in_child(os.getpid())
    return _popen(command, env, cwd, preexec, argv[0])


def _popen(command: list[str], env: Mapping[str, str], cwd: str,
           preexec: Callable[[], None] | None, program: str,
           guard: OrphanGuard | None = None) -> Child:
    # Our own pipes, not Popen's PIPE: Popen would wrap each read end in a file object that
    # we would only dup and close again (~30 us of a spawn). Close-on-exec: no child inherits
    # a read end, or a write end but through its own stdout/stderr (Popen dup2()s them).
    pipes = _pipes(program)
    stdout, stdout_end, stderr, stderr_end = pipes
    try:
        popen = subprocess.Popen(
            command,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout_end,
            stderr=stderr_end,
            start_new_session=True,
            preexec_fn=preexec,
            close_fds=True,
        )
    except OSError as exc:
        _close_all(pipes)
        raise SpawnError(f"cannot start {program!r}: {exc.strerror or exc}") from None
    except subprocess.SubprocessError as exc:
        _close_all(pipes)
        raise SpawnError(f"cannot start {program!r}: {exc}") from None
    except BaseException:
        _close_all(pipes)
        raise
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as exc:  # out of descriptors: it runs, but could be neither watched nor
        # guarded, nor stopped safely later (signals need the pidfd's proof it is ours). End
        # it now, while it is our unreaped child, rather than leave it running unwatched.
        _end_unwatched(popen)
        _close_all(pipes)
        raise SpawnError(f"cannot start {program!r}: {exc.strerror or exc}") from None
    if guard is not None and not guard.register(popen.pid, pidfd):
        # First thing after the exec: until the guard has the pidfd, a daemon killed now
        # would leave this service running.
        log.warning("no orphan guard for service_pid=%d", popen.pid)
    _close_all([stdout_end, stderr_end])  # the child's now; EOF once it and its heirs are gone
    os.set_blocking(stdout, False)
    os.set_blocking(stderr, False)
    child = Child(popen.pid, stdout, stderr, popen, pidfd)
    if guard is not None:
        guard.track(child)
    return child


def _pipes(program: str) -> list[int]:
    """Two close-on-exec pipes (stdout's, stderr's: read end, write end each), or SpawnError
    (out of descriptors) with none left open."""
    pipes: list[int] = []
    try:
        for _ in range(2):
            pipes.extend(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        _close_all(pipes)
        raise SpawnError(f"cannot start {program!r}: {exc.strerror or exc}") from None
    return pipes


def _end_unwatched(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child we cannot watch, with its group, and reap it (it is ours until then,
    so the pid is still the one we spawned; SIGKILL is final, so the wait is short)."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except OSError:
        popen.kill()
    popen.wait()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _check_executable(program: str, env: Mapping[str, str], cwd: str) -> None:
    """Fail as execvp() in the child would, naming the program."""
    if "/" in program:
        path = os.path.join(cwd, program)
        if not os.path.exists(path):
            raise SpawnError(f"cannot start {program!r}: No such file or directory")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise SpawnError(f"cannot start {program!r}: Permission denied")
        return
    search = env.get("PATH", os.defpath)
    # which() resolves relative PATH entries against our cwd; the child's is `cwd`.
    search = os.pathsep.join(os.path.join(cwd, d) for d in search.split(os.pathsep))
    if shutil.which(program, path=search) is None:
        raise SpawnError(f"cannot start {program!r}: not found on PATH")


def _pdeathsig_in_child(parent: int) -> Callable[[], None]:
    def in_child() -> None:  # runs between fork and exec: keep it to async-signal-safe calls
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the daemon died before prctl took effect
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    return in_child


def monotonic_and_wall() -> tuple[float, float]:
    return time.monotonic(), time.time()
