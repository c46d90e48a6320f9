"""journald's native protocol: one datagram per entry, with fields, as sd_journal_send() does it.

An entry is a list of fields. A value without a newline is sent as `NAME=value\\n`; any other
value as `NAME\\n`, its length as a 64-bit little-endian integer, the bytes, and `\\n`, so
values are binary-safe (a traceback keeps its newlines and stays one entry). An entry too large
for one datagram travels as a sealed memfd passed with SCM_RIGHTS, as systemd's own client
does (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/). Field names are upper-case letters, digits
and underscores, not starting with an underscore (those are journald's trusted fields).

Nothing here blocks: the socket is non-blocking, and `send` returns False when the journal
does not take the entry at once (its queue is full, it is gone), so the caller can fall back
to its stream.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
from collections.abc import Iterable

DEFAULT_SOCKET = "/run/systemd/journal/socket"
# Tests and containers that mount the journal's socket elsewhere point the daemon at it.
SOCKET_ENV = "SUPERVISOR_JOURNAL_SOCKET"
MAX_FIELD_NAME = 64
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]*")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def valid_field_name(name: str) -> bool:
    return len(name) <= MAX_FIELD_NAME and _FIELD_NAME.fullmatch(name) is not None


def encode(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """The native protocol's serialization of one entry. ValueError for a bad field name."""
    out = bytearray()
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(f"invalid journal field name {name!r}")
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """Parse one entry back into fields (what journald does; used by tests and tools)."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = newline + 1
        else:
            name = line
            size = int.from_bytes(data[newline + 1:newline + 9], "little")
            start = newline + 9
            value = data[start:start + size]
            if len(value) != size or data[start + size:start + size + 1] != b"\n":
                raise ValueError("truncated binary field")
            pos = start + size + 1
        fields.append((name.decode("ascii"), value))
    return fields


class JournalSocket:
    """A non-blocking datagram socket to journald's native socket at `path`."""

    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def __repr__(self) -> str:
        return f"JournalSocket(path={self.path!r})"

    def send(self, fields: Iterable[tuple[str, str | bytes]]) -> bool:
        """Send one entry; False if the journal did not take it (full, gone, refused)."""
        payload = encode(fields)
        try:
            self._sock.sendto(payload, self.path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
        return self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> bool:
        try:
            fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (OSError, AttributeError):
            return False
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [fd]))], 0, self.path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
