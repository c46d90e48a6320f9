"""Spawning and reaping: exact exit codes and signals, clean signal state, bounded line output."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import anyio
import pytest

from supervisor.core.errors import SpawnError
from supervisor.process import spawn as spawn_module
from supervisor.process.guard import OrphanGuard
from supervisor.process.output import drain

pytestmark = pytest.mark.anyio


GUARD: list[OrphanGuard] = []  # the orphan guard of the current test, in "guard" mode


@pytest.fixture(autouse=True, params=["guard", "setpriv", "preexec_fn"])
def orphans_handled_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                       ) -> Iterator[str]:
    """Every test runs with each way of not leaving orphans: the guard process (the daemon's
    default), and PR_SET_PDEATHSIG armed by setpriv or by a preexec_fn (the fallbacks)."""
    if request.param == "guard":
        GUARD.append(OrphanGuard())
    elif request.param == "setpriv":
        assert spawn_module.SETPRIV is not None, "util-linux setpriv is expected on this host"
    else:
        monkeypatch.setattr(spawn_module, "SETPRIV", None)
    try:
        yield request.param
    finally:
        while GUARD:
            GUARD.pop().close()


def spawn(argv: list[str], env: Mapping[str, str], cwd: str) -> spawn_module.Child:
    return spawn_module.spawn(argv, env, cwd, GUARD[0] if GUARD else None)

ENV = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/should/not/leak"}


async def run(argv: list[str], env: dict[str, str] | None = None
              ) -> tuple[int | None, int | None, bytes]:
    child = spawn(argv, env or {"PATH": "/usr/bin:/bin"}, "/")
    chunks: list[bytes] = []

    async def collect() -> None:
        while True:
            await anyio.wait_readable(child.stdout)
            try:
                data = os.read(child.stdout, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            chunks.append(data)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            tg.start_soon(drain, child.stderr, "t", "stderr")
            status = await child.wait()
    os.close(child.stdout)
    return status.code, status.signal, b"".join(chunks)


async def test_every_exit_code_is_exact() -> None:
    seen = {}
    for code in range(256):
        seen[code] = (await run(["sh", "-c", f"exit {code}"]))[:2]
    assert seen == {code: (code, None) for code in range(256)}


async def test_killing_signals_are_exact() -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV, signal.SIGUSR1, signal.SIGABRT):
        code, got, _ = await run(["sh", "-c", f"kill -{int(sig)} $$"])
        assert (code, got) == (None, int(sig))


async def test_child_starts_with_clean_signal_state_and_own_session() -> None:
    _, _, out = await run(["sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status; "
                                       "ps -o sid= -o pgid= -o pid= -p $$"])
    fields = dict(line.split(":\t") for line in out.decode().splitlines() if ":" in line)
    assert int(fields["SigBlk"], 16) == 0
    assert int(fields["SigIgn"], 16) == 0
    sid, pgid, pid = out.decode().splitlines()[-1].split()
    assert sid == pgid == pid  # a session and process group of its own


async def test_spawn_failure_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="cannot start '/nonexistent/x'"):
        spawn(["/nonexistent/x"], {}, "/")
    with pytest.raises(SpawnError, match="cannot start 'no-such-program-here'"):
        spawn(["no-such-program-here"], {"PATH": "/usr/bin:/bin"}, "/")
    (tmp_path / "data.txt").write_text("not a program")
    with pytest.raises(SpawnError, match="cannot start './data.txt': Permission denied"):
        spawn(["./data.txt"], {}, str(tmp_path))


async def test_a_child_holds_its_stdio_only() -> None:
    """No fd of the daemon reaches a service (other services' pipes and pidfds, the guard's
    socket), and a service's stdout and stderr are pipes of its own."""
    others = [spawn(["sleep", "30"], {"PATH": "/usr/bin:/bin"}, "/") for _ in range(3)]
    try:
        _, _, out = await run(["sh", "-c", "ls /proc/$$/fd; stat -L -c %F /proc/$$/fd/1 "
                                           "/proc/$$/fd/2"])
    finally:
        for other in others:
            other.signal_group(signal.SIGKILL)
            with anyio.fail_after(10):
                await other.wait()
            os.close(other.stdout)
            os.close(other.stderr)
    lines = out.decode().split()
    assert lines[:3] == ["0", "1", "2"] and lines[3:] == ["fifo", "fifo"], lines


async def test_a_failed_spawn_leaves_no_fd_behind() -> None:
    with pytest.raises(SpawnError):  # the first spawn starts the guard, with its socket
        spawn(["/nonexistent/x"], {}, "/")
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(SpawnError):
            spawn(["/nonexistent/x"], {}, "/")
    assert sorted(os.listdir("/proc/self/fd")) == before


async def test_relative_programs_resolve_against_the_service_cwd(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "hello"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho hello from $0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": "bin:/usr/bin:/bin"}
    child = spawn(["./bin/hello"], env, str(tmp_path))
    assert (await child.wait()).code == 0
    child = spawn(["hello"], env, str(tmp_path))  # a relative PATH entry, as execvp reads it
    assert (await child.wait()).code == 0
    for fd in (child.stdout, child.stderr):
        os.close(fd)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def test_child_is_killed_when_the_forking_thread_ends_only_with_pdeathsig(
        orphans_handled_by: str) -> None:
    """PR_SET_PDEATHSIG follows the thread that forked: with it armed, a child spawned from a
    thread that then exits gets SIGKILL. (The daemon spawns only from its event-loop thread,
    which lives as long as the daemon; a SIGKILLed daemon takes its children along.) The guard
    watches the daemon process, not a thread: there the child lives on."""
    spawned: list[spawn_module.Child] = []

    def spawn_then_end() -> None:
        child = spawn(["sleep", "30"], ENV, "/")
        spawned.append(child)
        # Like the daemon's thread, outlive the exec of setpriv and its prctl (about 1 ms).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _comm(child.pid) != "sleep":
            time.sleep(0.001)

    thread = threading.Thread(target=spawn_then_end)
    thread.start()
    thread.join(10)
    child = spawned[0]
    try:
        with anyio.move_on_after(1.0 if orphans_handled_by == "guard" else 10.0):
            await child.wait()
        died_with_thread = child.status
    finally:
        if child.status is None:
            child.signal_group(signal.SIGKILL)
            await child.wait()
        for fd in (child.stdout, child.stderr):
            os.close(fd)
    if orphans_handled_by == "guard":
        assert died_with_thread is None
    else:
        assert died_with_thread == spawn_module.ExitStatus(None, signal.SIGKILL)


async def test_drain_cancelled_at_shutdown_still_logs_what_the_child_left_in_the_pipe(
        caplog: pytest.LogCaptureFixture) -> None:
    # A service crashes and the daemon is told to stop before the drain task has read the
    # traceback: the last words must still reach the log, not die with the pipe.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.write(write_end, b"Traceback (most recent call last):\n  File \"x\", line 1\n"
                        b"RuntimeError: last words\n")
    os.close(write_end)
    caplog.set_level("INFO", logger="supervisor.output")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await drain(read_end, "crashy", "stderr")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError: last words" in text and "Traceback" in text


def test_out_of_descriptors_is_a_spawn_error_and_leaks_none() -> None:
    """EMFILE while making the output pipes: a SpawnError naming the program (the runner then
    backs off, as for any failed start) with no descriptor left open, not an internal error
    that leaked the first pipe at every retry."""
    code = textwrap.dedent("""
        import os, resource
        from supervisor.core.errors import SpawnError
        from supervisor.process.spawn import spawn
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while len(held) < 100:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for fd in held[-3:]:  # room for one pipe, not two
            os.close(fd)
        before = sorted(os.listdir("/proc/self/fd"))
        try:
            spawn(["sleep", "100"], {"PATH": "/usr/bin:/bin"}, "/")
            print("spawned")
        except SpawnError as exc:
            print("error:", exc)
        print("fds:", "same" if sorted(os.listdir("/proc/self/fd")) == before else "leaked")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "error: cannot start 'sleep': Too many open files" in out.stdout, out.stdout
    assert "fds: same" in out.stdout, out.stdout
