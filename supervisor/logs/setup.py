"""Log output that fits journald and plain terminals.

Under systemd, stderr is connected to the journal and `$JOURNAL_STREAM` holds its "dev:ino".
When journald's native socket is there too, every record is sent as one journal entry with
fields (PRIORITY, SYSLOG_IDENTIFIER, and for a service's output SUPERVISOR_SERVICE,
SUPERVISOR_STREAM, SYSLOG_PID), the way systemd logs for its own units; multi-line messages
stay one entry. Without the socket each line starts with a `<N>` syslog priority, which
journald turns into the record's PRIORITY (and strips). Anywhere else a line starts with an
ISO 8601 timestamp. Both line formats keep one record per line (a service's output: one line
per line it wrote). Only the CLI calls `configure_logging`; modules just log.

Records of a service's output carry `child_tag`, `child_lines`, `syslog_priority` and
`journal_fields` (see supervisor.process.output).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import TextIO

from supervisor.logs.journal import DEFAULT_SOCKET, SOCKET_ENV, JournalSocket

# Handlers we install carry this attribute, so reconfiguring replaces them (and only them).
_OWNED = "_supervisor_logsetup"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (sd-daemon.h): 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


_LEVEL_OF_PRIORITY = (logging.CRITICAL, logging.CRITICAL, logging.CRITICAL, logging.ERROR,
                      logging.WARNING, logging.INFO, logging.INFO, logging.DEBUG)


def level_of_priority(priority: int) -> int:
    """syslog priority 0-7 -> the Python level that logs it (0-2 critical ... 7 debug)."""
    return _LEVEL_OF_PRIORITY[priority]


def record_priority(record: logging.LogRecord) -> int:
    explicit = getattr(record, "syslog_priority", None)
    return explicit if isinstance(explicit, int) else syslog_priority(record.levelno)


def escape_line(text: str) -> str:
    r"""Make `text` one line: CR/LF become the two-character escapes `\r` / `\n`.

    journald splits records at newlines, so an unescaped traceback or a child's multi-line
    output would arrive as many unrelated records with the wrong priority.
    """
    return text.replace("\r", "\\r").replace("\n", "\\n")


class LineFormatter(logging.Formatter):
    """`<prefix>LEVEL logger: message` on a single line, exception text included (escaped)."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        lines = getattr(record, "child_lines", None)
        if lines is not None:
            # A service's output: one line per line it wrote, each tagged, as before grouping.
            tag = getattr(record, "child_tag", "?")
            return "\n".join(self._line(record, f"[{tag}] {escape_line(line)}")
                             for line in lines)
        return self._line(record, escape_line(self.text(record)))

    def text(self, record: logging.LogRecord) -> str:
        """The message with exception and stack text, newlines kept."""
        text = record.getMessage()
        if record.exc_info:
            # Cache like logging.Formatter does, so other handlers don't re-render it.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text

    def _line(self, record: logging.LogRecord, message: str) -> str:
        body = f"{record.levelname} {record.name}: {message}"
        if self.journal:
            return f"<{record_priority(record)}>{body}"
        stamp = datetime.fromtimestamp(record.created).astimezone()
        return f"{stamp.isoformat(timespec='milliseconds')} {body}"


class JournalHandler(logging.Handler):
    """One native journal entry per record; the stream's line when the journal refuses it."""

    def __init__(self, journal: JournalSocket, fallback: logging.Handler,
                 identifier: str = "supervisor") -> None:
        super().__init__()
        self.journal = journal
        self.fallback = fallback
        self.identifier = identifier
        self.text = LineFormatter(journal=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
        except Exception:
            self.handleError(record)
            return
        if not self.journal.send(fields):
            self.fallback.handle(record)

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        lines = getattr(record, "child_lines", None)
        if lines is not None:
            message = "\n".join(lines)
        else:
            message = f"{record.name}: {self.text.text(record)}"
        fields = [("MESSAGE", message), ("PRIORITY", str(record_priority(record))),
                  ("SYSLOG_IDENTIFIER", self.identifier)]
        if lines is None:
            fields += [("LOGGER", record.name), ("CODE_FILE", record.pathname),
                       ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName)]
        extra = getattr(record, "journal_fields", None)
        if isinstance(extra, Mapping):
            # Later fields of the same name win in journalctl's display; drop ours instead.
            names = set(extra)
            fields = [f for f in fields if f[0] not in names]
            fields += [(str(k), str(v)) for k, v in extra.items()]
        return fields

    def close(self) -> None:
        self.journal.close()
        self.fallback.close()
        super().close()


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `stream` is the journald stream systemd described in `$JOURNAL_STREAM`.

    Comparing device and inode (as sd_journal_stream_fd's docs recommend) tells a redirected
    stderr, e.g. `supervisor run 2>file` inside the unit, from the journal itself.
    """
    value = environ.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # StringIO and friends have no fileno (io.UnsupportedOperation is an OSError).
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_socket_path(stream: TextIO, environ: Mapping[str, str]) -> str | None:
    """Where to send native journal entries, or None for lines on `stream`.

    `$SUPERVISOR_JOURNAL_SOCKET` names a socket explicitly; otherwise the journal's own socket,
    when `stream` is the journal (so a daemon run from a terminal keeps writing there).
    """
    explicit = environ.get(SOCKET_ENV, "")
    if explicit:
        return explicit
    if stream_is_journal(stream, environ) and os.path.exists(DEFAULT_SOCKET):
        return DEFAULT_SOCKET
    return None


def configure_logging(
    level: str,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    journal_socket: str | None = None,
) -> logging.Handler:
    """Send every record at `level` or above to the journal (see `journal_socket_path`; the
    `journal_socket` argument overrides it) or to `stream` (default stderr), one line each.

    Replaces a handler installed by an earlier call, leaves foreign handlers alone, and
    returns the new handler. ValueError for an unknown level name.
    """
    try:
        levelno = LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r} (expected one of {', '.join(LEVELS)})"
        ) from None
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    lines = logging.StreamHandler(stream)
    lines.setFormatter(LineFormatter(journal=stream_is_journal(stream, environ)))
    handler: logging.Handler = lines
    socket_path = journal_socket or journal_socket_path(stream, environ)
    if socket_path is not None:
        handler = JournalHandler(JournalSocket(socket_path), fallback=lines)
    setattr(handler, _OWNED, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OWNED, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler
