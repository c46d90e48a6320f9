"""Log output that fits journald and plain terminals: one record per line, always.

Under systemd, stderr is connected to the journal and `$JOURNAL_STREAM` holds its "dev:ino";
each line then starts with a `<N>` syslog priority, which journald turns into the record's
PRIORITY (and strips), and journald adds its own timestamp. Anywhere else a line starts with
an ISO 8601 timestamp. Only the CLI calls `configure_logging`; modules just log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import TextIO

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
        text = record.getMessage()
        if record.exc_info:
            # Cache like logging.Formatter does, so other handlers don't re-render it.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        body = f"{record.levelname} {record.name}: {escape_line(text)}"
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>{body}"
        stamp = datetime.fromtimestamp(record.created).astimezone()
        return f"{stamp.isoformat(timespec='milliseconds')} {body}"


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


def configure_logging(
    level: str,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send every record at `level` or above to `stream` (default stderr), one line each.

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
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journal=stream_is_journal(stream, environ)))
    setattr(handler, _OWNED, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OWNED, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler
