"""Spawning and reaping: exact exit codes and signals, clean signal state, bounded line output."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from supervisor.output import LineSplitter, drain
from supervisor.spawn import spawn

pytestmark = pytest.mark.anyio

ENV = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/should/not/leak"}


async def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int | None, int | None, bytes]:
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


async def test_spawn_failure_is_a_clear_error() -> None:
    from supervisor.errors import SpawnError

    with pytest.raises(SpawnError, match="cannot start '/nonexistent/x'"):
        spawn(["/nonexistent/x"], {}, "/")


def test_line_splitter_bounds_long_lines() -> None:
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b"abc\ndef") == [b"abc"]
    assert splitter.feed(b"g" * 25) == [b"defggggggg", b"gggggggggg"]
    assert splitter.flush() == [b"g" * 8]
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b"x" * 25) == [b"x" * 10, b"x" * 10]
    assert splitter.feed(b"yy\nz") == [b"xxxxxyy"]
    assert splitter.flush() == [b"z"]
    assert splitter.flush() == []
