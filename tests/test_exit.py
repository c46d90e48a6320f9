"""How `supervisor run` ends once it has stopped: without the interpreter's teardown (freeing
every object of every runner one by one took 20-30 ms of a shutdown at 1,000 services), but
with what the teardown would have done that matters: atexit handlers, log records and
standard streams flushed, the exit code."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import service, write_config

# The program as `python -m supervisor` runs it, plus two witnesses: an atexit handler (must
# run) and an object whose __del__ only the interpreter's teardown would call (must not).
WRAPPER = """
import atexit, sys
import supervisor.cli as cli
atexit.register(lambda: print("atexit ran", flush=True))
class Witness:
    def __del__(self):
        print("teardown ran", flush=True)
cli.witness = Witness()
sys.argv = ["supervisor", *sys.argv[1:]]
sys.exit(cli.main())
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_exits_without_teardown_but_flushed(tmp_path: Path, backend: str) -> None:
    path = write_config(tmp_path, service("api", "import time; time.sleep(1000)",
                                          start_seconds=0), supervisor='cgroups = "off"\n')
    out = tmp_path / "out.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "run", "--config", str(path),
                                 "--backend", backend], stdout=sink, stderr=sink,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "spawned service=api" not in out.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = out.read_text(errors="replace")
    lines = text.splitlines()
    assert "atexit ran" in lines
    assert "teardown ran" not in text
    assert any(line.endswith(" stopped") for line in lines), text  # the last record, flushed
    assert "exited service=api" in text
