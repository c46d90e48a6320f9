"""journald: the native protocol, priorities of a service's output, one entry per traceback.

A real unix datagram socket stands in for /run/systemd/journal/socket; the daemon is pointed at
it with $SUPERVISOR_JOURNAL_SOCKET, and the test parses what arrives as journald would.
"""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logs.journal import JournalSocket, decode, encode
from supervisor.process.output import EntryGrouper, split_priority
from tests.support import free_port, poll_until

Entry = dict[str, str]


# -- the protocol --------------------------------------------------------------------------------

def test_encoding_is_the_documented_format() -> None:
    assert encode([("MESSAGE", "hello"), ("PRIORITY", "6")]) == b"MESSAGE=hello\nPRIORITY=6\n"
    # A value with a newline: name, newline, 64-bit little-endian length, bytes, newline.
    assert encode([("MESSAGE", "a\nb")]) == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\n"
    # A service cannot forge fields (or a trusted _PID) with newlines in its output.
    forged = encode([("MESSAGE", "x\nPRIORITY=0\n_PID=1"), ("PRIORITY", "6")])
    assert decode(forged) == [("MESSAGE", b"x\nPRIORITY=0\n_PID=1"), ("PRIORITY", b"6")]
    for bad in ("message", "_PID", "", "A-B", "X" * 65, "A=B"):
        with pytest.raises(ValueError):
            encode([(bad, "x")])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True),
                          st.binary(max_size=200)), max_size=8))
def test_any_values_round_trip(fields: list[tuple[str, bytes]]) -> None:
    assert decode(encode(fields)) == fields


class FakeJournal:
    """A datagram socket that reads entries like journald, memfd-passed ones included."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sv-journal-")
        self.path = os.path.join(self.dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.entries: list[Entry] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd_size = array.array("i").itemsize
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(fd_size))
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = array.array("i", payload[:fd_size])[0]
                    with os.fdopen(fd, "rb") as memfd:
                        # The sender's writes left the shared offset at the end; journald
                        # mmaps the file, so read it from the start.
                        memfd.seek(0)
                        data = memfd.read()
            self.entries.append({k: v.decode() for k, v in decode(data)})

    def wait(self, predicate: object, timeout: float = 30.0) -> list[Entry]:
        assert callable(predicate)
        assert poll_until(lambda: any(predicate(e) for e in list(self.entries)), timeout), \
            self.entries
        return [e for e in list(self.entries) if predicate(e)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def journal() -> Iterator[FakeJournal]:
    fake = FakeJournal()
    yield fake
    fake.close()


def test_large_entry_travels_as_a_sealed_memfd(journal: FakeJournal) -> None:
    sender = JournalSocket(journal.path)
    big = "x" * 400_000 + "\nend"  # larger than a datagram may be
    assert sender.send([("MESSAGE", big), ("PRIORITY", "6")])
    (entry,) = journal.wait(lambda e: e.get("PRIORITY") == "6")
    assert entry["MESSAGE"] == big
    sender.close()


def test_send_reports_a_missing_journal(tmp_path: Path) -> None:
    sender = JournalSocket(str(tmp_path / "nobody"))
    assert sender.send([("MESSAGE", "x")]) is False
    sender.close()


# -- priorities and entries, pure ----------------------------------------------------------------

def test_syslog_prefix() -> None:
    assert split_priority("<3>boom") == (3, "boom")
    assert split_priority("<0>x") == (0, "x")
    assert split_priority("<14>user.info") == (6, "user.info")  # facility*8 + priority
    assert split_priority("<192>x") == (None, "<192>x")
    assert split_priority("<a>x") == (None, "<a>x")
    assert split_priority("no prefix <3>") == (None, "no prefix <3>")


TRACEBACK = """\
Traceback (most recent call last):
  File "/srv/api.py", line 9, in <module>
    main()
  File "/srv/api.py", line 5, in main
    raise KeyError("x")
KeyError: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/srv/api.py", line 11, in <module>
    raise RuntimeError("boom")
RuntimeError: boom"""


def feed_all(grouper: EntryGrouper, text: str) -> list[tuple[int, tuple[str, ...]]]:
    out = []
    for line in text.split("\n"):
        out += grouper.feed(line)
    out += grouper.flush()
    return [(e.priority, e.lines) for e in out]


def test_a_traceback_is_one_entry_at_err() -> None:
    text = "starting\n" + TRACEBACK + "\nrestarting"
    entries = feed_all(EntryGrouper(default_priority=4), text)
    assert entries == [
        (4, ("starting",)),
        (3, tuple(TRACEBACK.split("\n"))),
        (4, ("restarting",)),
    ]


def test_prefixed_lines_start_entries_and_keep_their_priority() -> None:
    text = "<6>request ok\n<3>request failed\n  detail of the failure\n<6>next"
    assert feed_all(EntryGrouper(default_priority=4), text) == [
        (6, ("request ok",)),
        (3, ("request failed", "  detail of the failure")),
        (6, ("next",)),
    ]
    # A prefixed traceback keeps the priority it was given.
    assert feed_all(EntryGrouper(6), "<4>" + TRACEBACK)[0][0] == 4


def test_unrelated_lines_stay_separate() -> None:
    text = "GET /a 200\nGET /b 200\nCaused by: java.io.IOException\nGET /c 500"
    assert feed_all(EntryGrouper(6), text) == [
        (6, ("GET /a 200",)),
        (6, ("GET /b 200", "Caused by: java.io.IOException")),
        (6, ("GET /c 500",)),
    ]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=" \tab<3>:\n", max_size=40), max_size=400),
       st.integers(1, 20), st.integers(1, 300))
def test_entries_are_bounded_and_lose_nothing(lines: list[str], max_lines: int,
                                              max_bytes: int) -> None:
    lines = [line.replace("\n", "") for line in lines]
    grouper = EntryGrouper(6, max_lines=max_lines, max_bytes=max_bytes)
    entries = []
    for line in lines:
        entries += grouper.feed(line)
    entries += grouper.flush()
    # Every line arrives, in order (prefixes stripped), and no entry exceeds its bounds
    # (a single line longer than max_bytes is an entry of its own).
    assert [line for e in entries for line in e.lines] == [split_priority(x)[1] for x in lines]
    for e in entries:
        assert len(e.lines) <= max_lines
        assert len(e.lines) == 1 or sum(len(x) + 1 for x in e.lines) - 1 <= max_bytes


# -- the daemon, as an operator runs it ----------------------------------------------------------

API_CODE = """
import sys, time
print("hello from stdout", flush=True)
print("<3>explicit error", flush=True)
sys.stderr.write("plain stderr\\n"); sys.stderr.flush()
def handler():
    raise RuntimeError("boom")
time.sleep(0.3)
handler()
"""
QUIET_CODE = """
import sys, time
sys.stderr.write("quiet stderr\\n"); sys.stderr.flush()
time.sleep(60)
"""


def config(tmp_path: Path) -> Path:
    port = free_port()
    sock_dir = tempfile.mkdtemp(prefix="sv-")
    path = tmp_path / "services.toml"
    path.write_text(textwrap.dedent(f"""
        [supervisor]
        listen = "127.0.0.1:{port}"
        control_socket = "{sock_dir}/control.sock"
        stderr_priority = "err"

        [services.api]
        command = {json.dumps([sys.executable, "-c", API_CODE])}
        restart = "never"

        [services.quiet]
        command = {json.dumps([sys.executable, "-c", QUIET_CODE])}
        stderr_priority = "notice"
    """))
    return path


def run_daemon(path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                            env=env, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err


@pytest.mark.slow
def test_daemon_sends_entries_with_fields_and_priorities(tmp_path: Path,
                                                         journal: FakeJournal) -> None:
    env = {**os.environ, "SUPERVISOR_JOURNAL_SOCKET": journal.path}
    proc = run_daemon(config(tmp_path), env)
    try:
        journal.wait(lambda e: "RuntimeError: boom" in e.get("MESSAGE", ""))
        journal.wait(lambda e: e.get("MESSAGE") == "quiet stderr")
        journal.wait(lambda e: e.get("MESSAGE", "").startswith("supervisor.runner: exited "
                                                                 "service=api"))
    finally:
        err = stop(proc)
    api = [e for e in journal.entries if e.get("SUPERVISOR_SERVICE") == "api"]
    by_message = {e["MESSAGE"]: e for e in api}
    hello = by_message["hello from stdout"]
    assert hello["PRIORITY"] == "6" and hello["SUPERVISOR_STREAM"] == "stdout"
    assert hello["SYSLOG_IDENTIFIER"] == "api" and hello["SYSLOG_PID"].isdigit()
    assert by_message["explicit error"]["PRIORITY"] == "3"  # <3> kept, prefix stripped
    assert by_message["plain stderr"]["PRIORITY"] == "3"  # [supervisor] stderr_priority
    assert by_message["plain stderr"]["SUPERVISOR_STREAM"] == "stderr"
    (traceback,) = [e for e in api if "Traceback" in e["MESSAGE"]]
    assert traceback["MESSAGE"].startswith("Traceback (most recent call last):\n")
    assert traceback["MESSAGE"].endswith("RuntimeError: boom")
    assert "line 7, in handler\n" in traceback["MESSAGE"] and traceback["PRIORITY"] == "3"
    # journalctl SUPERVISOR_SERVICE=api -p err: the error, the stderr line and the traceback.
    assert sorted(e["MESSAGE"][:20] for e in api if int(e["PRIORITY"]) <= 3) == sorted(
        ["explicit error", "plain stderr", "Traceback (most rece"])
    (quiet,) = [e for e in journal.entries if e.get("SUPERVISOR_SERVICE") == "quiet"]
    assert quiet["PRIORITY"] == "5"  # the service's own stderr_priority
    # The daemon's own records: identifier "supervisor", priorities from their levels.
    own = [e for e in journal.entries if e.get("SYSLOG_IDENTIFIER") == "supervisor"]
    spawned = [e for e in own if "spawned service=api" in e["MESSAGE"]]
    exited = [e for e in own if "exited service=api" in e["MESSAGE"]]
    assert spawned and spawned[0]["PRIORITY"] == "6" and spawned[0]["LOGGER"]
    assert exited and exited[0]["PRIORITY"] == "4"
    assert all("SUPERVISOR_SERVICE" not in e for e in own)
    # Everything went to the journal; nothing was left on stderr.
    assert "hello from stdout" not in err and "spawned" not in err


@pytest.mark.slow
def test_without_a_journal_lines_stay_as_they_were(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPERVISOR_JOURNAL_SOCKET", "JOURNAL_STREAM")}
    proc = run_daemon(config(tmp_path), env)
    lines: list[str] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "exited service=api" in line:
            break
    rest = stop(proc)
    lines += rest.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d"

    def find(pattern: str) -> list[str]:
        return [x for x in lines if re.fullmatch(stamp + " " + pattern, x)]

    assert find(r"INFO supervisor\.output: \[api\] hello from stdout")
    assert find(r"ERROR supervisor\.output: \[api\] explicit error")
    assert find(r"ERROR supervisor\.output: \[api:stderr\] plain stderr")
    assert find(r"INFO supervisor\.output: \[quiet:stderr\] quiet stderr")  # notice
    # The traceback: one timestamped line per line it had, each tagged.
    assert find(r"ERROR supervisor\.output: \[api:stderr\] Traceback \(most recent call last\):")
    assert find(r"ERROR supervisor\.output: \[api:stderr\]   File .*")
    assert find(r"ERROR supervisor\.output: \[api:stderr\] RuntimeError: boom")


# -- configuration -------------------------------------------------------------------------------

def test_priorities_config_defaults_overrides_and_errors(tmp_path: Path) -> None:
    from supervisor.config import load_config
    from supervisor.core.errors import ConfigError

    path = tmp_path / "services.toml"
    path.write_text(textwrap.dedent("""
        [supervisor]
        stdout_priority = "notice"
        [services.a]
        command = ["sleep", "1"]
        [services.b]
        command = ["sleep", "1"]
        stderr_priority = "err"
        stdout_priority = 7
    """))
    services = load_config(path, {"PATH": "/usr/bin:/bin"}).services
    assert (services["a"].stdout_priority, services["a"].stderr_priority) == (5, 4)
    assert (services["b"].stdout_priority, services["b"].stderr_priority) == (7, 3)
    bad = ['"loud"', "8", "-1", "true", "nan", '"3\\u0000"', "[3]", '"err "']
    path.write_text("[services.a]\ncommand = [\"sleep\", \"1\"]\n" + "".join(
        f"[services.s{i}]\ncommand = [\"sleep\", \"1\"]\nstderr_priority = {v}\n"
        for i, v in enumerate(bad)) + "[supervisor]\nstdout_priority = \"verbose\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"PATH": "/usr/bin:/bin"})
    found = info.value.problems
    for i in range(len(bad)):
        assert any(p.startswith(f"services.s{i}.stderr_priority: ") for p in found), (bad[i], found)
    assert any(p.startswith("supervisor.stdout_priority: unknown syslog priority") for p in found)


# -- the daemon's own records and the stream fallback --------------------------------------------

def test_own_records_with_a_traceback_are_one_entry(journal: FakeJournal) -> None:
    import logging

    from supervisor.logs.setup import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging("info", environ={}, journal_socket=journal.path)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("supervisor.checks.probes").exception("check failed check=%s", "db")
        logging.getLogger("supervisor.checks.probes").debug("not at info")
        (entry,) = journal.wait(lambda e: "check failed" in e.get("MESSAGE", ""))
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    assert entry["MESSAGE"].startswith("supervisor.checks.probes: check failed check=db\nTraceback")
    assert entry["MESSAGE"].endswith("RuntimeError: boom")
    assert entry["PRIORITY"] == "3" and entry["SYSLOG_IDENTIFIER"] == "supervisor"
    assert entry["LOGGER"] == "supervisor.checks.probes" and entry["CODE_FUNC"]
    assert not [e for e in journal.entries if "not at info" in e.get("MESSAGE", "")]


def test_journal_stream_without_socket_prefixes_each_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from supervisor.logs import setup as logsetup
    from supervisor.logs.setup import configure_logging
    from supervisor.process.output import Entry as OutputEntry
    from supervisor.process.output import _emit

    monkeypatch.setattr(logsetup, "DEFAULT_SOCKET", str(tmp_path / "no-journal-socket"))
    path = tmp_path / "journal"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with open(path, "w") as stream:
            st = os.fstat(stream.fileno())
            configure_logging("info", stream=stream,
                              environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
            _emit("api:stderr", {"SUPERVISOR_SERVICE": "api"},
                  [OutputEntry(3, ("Traceback (most recent call last):", "  File x",
                                   "ValueError: <6>not a prefix"))])
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    assert path.read_text().splitlines() == [
        "<3>ERROR supervisor.output: [api:stderr] Traceback (most recent call last):",
        "<3>ERROR supervisor.output: [api:stderr]   File x",
        "<3>ERROR supervisor.output: [api:stderr] ValueError: <6>not a prefix",
    ]
