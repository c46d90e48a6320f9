"""A bare reference supervisor, the floor for startup and shutdown on this machine:
`python bench/bare_supervisor.py N` spawns N `sleep` children as ours does (new session,
stdout/stderr pipes, no other work) and, on SIGTERM, signals them, reaps them and exits."""

import signal
import subprocess
import sys

SLEEP = ["sleep", "100000"]  # systems.SLEEP (not imported: its imports would be charged here)


def main() -> None:
    n = int(sys.argv[1])
    children = [subprocess.Popen(SLEEP, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
                for _ in range(n)]

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
