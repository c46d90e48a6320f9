"""Start a service's process and wait for its exit, on any anyio backend.

Why not anyio.open_process: it cannot set PR_SET_PDEATHSIG (no preexec hook), and on Python
3.11's asyncio it waits through ThreadedChildWatcher, one thread per live child. Instead:

* `subprocess.Popen` from the event-loop thread (the main thread, which lives as long as the
  daemon: PR_SET_PDEATHSIG fires when the *forking thread* ends, not the process), in a new
  session, with an empty signal mask and PDEATHSIG=SIGKILL, so a SIGKILLed daemon leaves no
  service behind.
* one pidfd per child, awaited with `anyio.wait_readable`, then `waitpid(pid)` for exactly that
  pid: we are the only reaper of our children, so exit codes are exact on both backends, and
  no thread is needed per child.
* stdout/stderr as non-blocking pipes, drained by the caller.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from supervisor.errors import SpawnError

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


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
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = ExitStatus.from_wait_status(wait_status)
                # Tell Popen the child is gone so it never waitpid()s the number again.
                self._popen.returncode = os.waitstatus_to_exitcode(wait_status)
                os.close(self._pidfd)
                self._pidfd = -1
        return self.status

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


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Child:
    """Fork/exec a service in its own session. Raises SpawnError with a one-line reason."""
    parent = os.getpid()

    def in_child() -> None:  # runs between fork and exec: keep it to async-signal-safe calls
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the daemon died before prctl took effect
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=in_child,
            close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    except subprocess.SubprocessError as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from None
    assert popen.stdout is not None and popen.stderr is not None
    stdout, stderr = popen.stdout.fileno(), popen.stderr.fileno()
    # Detach the fds from Popen's file objects: the drainers own and close them.
    stdout, stderr = os.dup(stdout), os.dup(stderr)
    popen.stdout.close()
    popen.stderr.close()
    popen.stdout = popen.stderr = None
    os.set_blocking(stdout, False)
    os.set_blocking(stderr, False)
    pidfd = os.pidfd_open(popen.pid)
    return Child(popen.pid, stdout, stderr, popen, pidfd)


def monotonic_and_wall() -> tuple[float, float]:
    return time.monotonic(), time.time()
