"""Drain a child's stdout/stderr continuously into the daemon's log, tagged with the service.

A child blocks once 64 KiB of its output is unread, so each pipe is read as soon as it is
readable, whatever the log does with it. Memory is bounded: a line longer than MAX_LINE (a 1 MB
line without a newline, say) is logged in MAX_LINE pieces, below journald's 48 KiB line limit.

Priorities, as systemd gives its own units' output: a line that starts with a syslog prefix
`<N>` (sd-daemon.h's SD_ERR is "<3>") has priority N, and the prefix is stripped; other lines
have their stream's priority (`stdout_priority`, `stderr_priority`). A Python traceback
without a prefix is at least `err`.

Entries: continuation lines (indented lines, a traceback's frames, exception line and chained
tracebacks, Java's `Caused by:`) that follow within GROUP_WINDOW join the line before them, so
a traceback is one journal entry. An entry holds at most MAX_ENTRY_LINES lines and
MAX_ENTRY_BYTES bytes; a line waits at most GROUP_WINDOW for its continuation.
"""

from __future__ import annotations

import logging
import os
import re
from typing import NamedTuple

import anyio

from supervisor.logs.setup import level_of_priority

MAX_LINE = 16 * 1024
READ_SIZE = 64 * 1024
GROUP_WINDOW = 0.05
# At most this many reads (1 MiB) of what is left in the pipe once draining ends.
FINAL_READS = 16
MAX_ENTRY_LINES = 256
MAX_ENTRY_BYTES = 64 * 1024
ERR = 3

log = logging.getLogger("supervisor.output")

_PREFIX = re.compile(r"<(\d{1,3})>")
TRACEBACK = "Traceback (most recent call last):"
_NONE: list[Entry] = []  # returned, never mutated
_CHAIN = ("During handling of the above exception, another exception occurred:",
          "The above exception was the direct cause of the following exception:")


class LineSplitter:
    """Bytes in, complete (bounded) lines out; pure, so it is tested without pipes."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        lines: list[bytes] = []
        while True:
            newline = self._partial.find(b"\n", 0, self.max_line + 1)
            if newline >= 0:
                lines.append(bytes(self._partial[:newline]))
                del self._partial[: newline + 1]
            elif len(self._partial) >= self.max_line:
                lines.append(bytes(self._partial[: self.max_line]))
                del self._partial[: self.max_line]
            else:
                return lines

    def flush(self) -> list[bytes]:
        rest, self._partial = bytes(self._partial), bytearray()
        return [rest] if rest else []


def split_priority(line: str) -> tuple[int | None, str]:
    """`<N>text` -> (N's priority, text); systemd reads facility*8+priority, up to <191>."""
    if not line.startswith("<"):
        return None, line
    m = _PREFIX.match(line)
    if m is None or int(m.group(1)) > 191:
        return None, line
    return int(m.group(1)) & 7, line[m.end():]


class Entry(NamedTuple):  # a NamedTuple: built once per output line, so cheaper than a dataclass
    priority: int
    lines: tuple[str, ...]


class EntryGrouper:
    """Lines in, entries out: continuation lines join the entry before them. Pure; the caller
    decides when too much time has passed (`flush`)."""

    def __init__(self, default_priority: int, max_lines: int = MAX_ENTRY_LINES,
                 max_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.default_priority = default_priority
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._priority = default_priority
        self._explicit = False
        self._lines: list[str] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        return bool(self._lines)

    def feed(self, raw: str) -> list[Entry]:
        priority, line = split_priority(raw)
        if self._lines and priority is None and self._continues(line) and (
                len(self._lines) < self.max_lines
                and self._size + len(line) + 1 <= self.max_bytes):
            self._lines.append(line)
            self._size += len(line) + 1
            return _NONE
        done = self.flush()
        self._explicit = priority is not None
        self._priority = self.default_priority if priority is None else priority
        self._lines = [line]
        self._size = len(line)
        return done

    def flush(self) -> list[Entry]:
        if not self._lines:
            return []
        priority = self._priority
        if not self._explicit and self._lines[0].startswith(TRACEBACK):
            priority = min(priority, ERR)
        entry = Entry(priority, tuple(self._lines))
        self._lines, self._size = [], 0
        return [entry]

    def _continues(self, line: str) -> bool:
        if line[:1] in (" ", "\t") or line.startswith("Caused by: "):
            return True
        if not self._lines[0].startswith(TRACEBACK):
            return False
        # In a traceback: the exception line after the frames, and chained tracebacks.
        previous = self._lines[-1]
        return (previous[:1] in (" ", "\t") or line == "" or line in _CHAIN
                or line.startswith(TRACEBACK) or previous == "")


async def drain(fd: int, service: str, stream: str, priority: int = 6,
                pid: int | None = None) -> None:
    """Read `fd` until EOF, logging each entry; closes `fd`. Never raises on read errors."""
    splitter = LineSplitter()
    grouper = EntryGrouper(priority)
    tag = service if stream == "stdout" else f"{service}:{stream}"
    fields = {"SUPERVISOR_SERVICE": service, "SUPERVISOR_STREAM": stream,
              "SYSLOG_IDENTIFIER": service}
    if pid is not None:
        fields["SYSLOG_PID"] = str(pid)
    at_eof = False
    try:
        while True:
            if grouper.pending:
                # Hold the last entry briefly: its continuation may be on its way.
                with anyio.move_on_after(GROUP_WINDOW) as scope:
                    await anyio.wait_readable(fd)
                if scope.cancelled_caught:
                    _emit(tag, fields, grouper.flush())
                    continue
            else:
                await anyio.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                at_eof = True
                break
            for line in splitter.feed(data):
                done = grouper.feed(_text(line))
                if done:
                    _emit(tag, fields, done)
    finally:
        # Also when cancelled (shutdown right after a crash): what the child wrote before it
        # died may still sit unread in the pipe, and its last words are what an operator needs.
        # Read what is there without waiting, bounded, then log everything. (Not after EOF:
        # nothing can follow it, and at shutdown that read was one more system call per pipe.)
        for _ in range(0 if at_eof else FINAL_READS):
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:  # BlockingIOError: nothing more is waiting
                break
            if not data:
                break
            for line in splitter.feed(data):
                _emit(tag, fields, grouper.feed(_text(line)))
        for line in splitter.flush():
            _emit(tag, fields, grouper.feed(_text(line)))
        _emit(tag, fields, grouper.flush())
        os.close(fd)


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def _emit(tag: str, fields: dict[str, str], entries: list[Entry]) -> None:
    for entry in entries:
        level = level_of_priority(entry.priority)
        if log.isEnabledFor(level):
            log.log(level, "[%s] %s", tag, "\n".join(entry.lines),
                    extra={"child_tag": tag, "child_lines": entry.lines,
                           "syslog_priority": entry.priority, "journal_fields": fields})
