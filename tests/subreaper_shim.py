"""Run a command as the child of a subreaper and account for every descendant left behind.

PID 1 here reaps nothing, so a test that kills the supervisor needs its own subreaper. Prints
`pid <daemon pid>` at start; when the daemon has exited and `--linger` seconds have passed,
prints `exit <code>` and `leftover <pids...>` (descendants still alive, which it then kills;
the linger ends early once no descendant is left),
reaping everything that re-parented here.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> int:
    linger = float(sys.argv[1])
    command = sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    daemon = subprocess.Popen(command)
    print(f"pid {daemon.pid}", flush=True)
    code = daemon.wait()
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline:
        reap()
        if not children():  # nothing left that could still need the linger
            break
        time.sleep(0.05)
    reap()
    leftover = sorted(children())
    print(f"exit {code}", flush=True)
    print("leftover " + " ".join(map(str, leftover)), flush=True)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    reap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
