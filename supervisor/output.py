"""Drain a child's stdout/stderr continuously into the daemon's log, tagged with the service.

A child blocks once 64 KiB of its output is unread, so each pipe is read as soon as it is
readable, whatever the log does with it. Memory is bounded: a line longer than MAX_LINE (a 1 MB
line without a newline, say) is logged in MAX_LINE pieces, below journald's 48 KiB line limit.
"""

from __future__ import annotations

import logging
import os

import anyio

MAX_LINE = 16 * 1024
READ_SIZE = 64 * 1024

log = logging.getLogger("supervisor.output")


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


async def drain(fd: int, service: str, stream: str) -> None:
    """Read `fd` until EOF, logging each line; closes `fd`. Never raises on read errors."""
    splitter = LineSplitter()
    tag = service if stream == "stdout" else f"{service}:{stream}"
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
            for line in splitter.feed(data):
                _emit(tag, line)
        for line in splitter.flush():
            _emit(tag, line)
    finally:
        os.close(fd)


def _emit(tag: str, line: bytes) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("[%s] %s", tag, line.decode("utf-8", "replace").rstrip("\r"))
