"""Log lines: one record per line, journald priority prefix or an ISO timestamp."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from supervisor.logs.setup import configure_logging, stream_is_journal, syslog_priority

ISO_LINE = re.compile(r"^(\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def journal_env_for(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_plain_lines_have_iso_timestamp_name_and_context() -> None:
    out = io.StringIO()
    configure_logging("info", stream=out, environ={})
    logging.getLogger("supervisor.runner").info("spawned service=%s pid=%d", "api", 123)
    logging.getLogger("supervisor.runner").debug("not shown at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    m = ISO_LINE.match(lines[0])
    assert m, lines[0]
    stamp = datetime.fromisoformat(m.group(1))
    assert stamp.tzinfo is not None
    assert abs((datetime.now(stamp.tzinfo) - stamp).total_seconds()) < 60
    assert m.group(2, 3, 4) == ("INFO", "supervisor.runner", "spawned service=api pid=123")


def test_embedded_newlines_and_tracebacks_stay_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("debug", stream=out, environ={})
    log = logging.getLogger("supervisor.test")
    log.warning("first\nsecond\r\nthird")
    try:
        raise RuntimeError("boom\nmore")
    except RuntimeError:
        log.exception("check failed check=%s", "db")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING supervisor.test: first\\nsecond\\r\\nthird")
    assert "check failed check=db\\nTraceback (most recent call last):\\n" in lines[1]
    assert lines[1].endswith("RuntimeError: boom\\nmore")


def test_child_output_keeps_service_prefix() -> None:
    out = io.StringIO()
    configure_logging("info", stream=out, environ={})
    logging.getLogger("supervisor.output").info("[%s] %s", "api", "listening on :8000")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" INFO supervisor.output: [api] listening on :8000")


def test_journal_prefix_when_journal_stream_matches(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        configure_logging("debug", stream=stream, environ=journal_env_for(path))
        log = logging.getLogger("supervisor.daemon")
        log.debug("d")
        log.info("i key=value")
        log.warning("w")
        log.error("e\nmultiline")
        log.critical("c")
    assert path.read_text().splitlines() == [
        "<7>DEBUG supervisor.daemon: d",
        "<6>INFO supervisor.daemon: i key=value",
        "<4>WARNING supervisor.daemon: w",
        "<3>ERROR supervisor.daemon: e\\nmultiline",
        "<2>CRITICAL supervisor.daemon: c",
    ]


def test_journal_stream_of_another_file_means_plain(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    path = tmp_path / "log"
    with open(path, "w") as stream:
        assert not stream_is_journal(stream, journal_env_for(other))
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "1:x"})
        assert not stream_is_journal(stream, {})
        assert stream_is_journal(stream, journal_env_for(path))
        configure_logging("info", stream=stream, environ=journal_env_for(other))
        logging.getLogger("x").info("hello")
    line = path.read_text()
    assert not line.startswith("<")
    assert ISO_LINE.match(line.rstrip("\n"))
    assert not stream_is_journal(io.StringIO(), journal_env_for(path))


def test_real_process_with_journal_stream_on_a_pipe() -> None:
    # What systemd does: stderr is a stream socket/pipe, JOURNAL_STREAM names its dev:ino.
    r, w = os.pipe()
    st = os.fstat(w)
    code = textwrap.dedent(
        """
        import logging
        import supervisor.logs.setup
        from supervisor.logs.setup import configure_logging
        # The stream alone, as without journald's native socket (a host with systemd has one).
        supervisor.logs.setup.DEFAULT_SOCKET = "/nonexistent/journal/socket"
        configure_logging("info")
        logging.getLogger("supervisor.output").info("[api] %s", "line one\\nline two")
        logging.getLogger("supervisor.daemon").warning("stopping reason=%s", "SIGTERM")
        """
    )
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=w, env=env)
    os.close(w)
    with os.fdopen(r) as reader:
        output = reader.read()
    assert proc.wait(timeout=30) == 0
    assert output.splitlines() == [
        "<6>INFO supervisor.output: [api] line one\\nline two",
        "<4>WARNING supervisor.daemon: stopping reason=SIGTERM",
    ]


def test_reconfigure_replaces_own_handler_only() -> None:
    foreign = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(foreign)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging("info", stream=first, environ={})
        configure_logging("warning", stream=second, environ={})
        assert foreign in root.handlers
        logging.getLogger("y").info("dropped at warning")
        logging.getLogger("y").warning("kept")
        assert first.getvalue() == ""
        assert second.getvalue().count("\n") == 1 and "kept" in second.getvalue()
    finally:
        root.removeHandler(foreign)


def test_level_names() -> None:
    out = io.StringIO()
    configure_logging("WARNING", stream=out, environ={})
    assert logging.getLogger().level == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        configure_logging("verbose", stream=out, environ={})


def test_syslog_priorities() -> None:
    assert [syslog_priority(n) for n in (5, 10, 20, 25, 30, 40, 50, 60)] == [
        7,
        7,
        6,
        6,
        4,
        3,
        2,
        2,
    ]
