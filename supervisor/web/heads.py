"""Request heads as bytes: is a head complete, is its request line sane, what does it ask for.

Pure functions over the bytes the listener's acceptor has collected (see http.py); the full
parse stays wsgiref's. Nothing here does I/O.
"""

from __future__ import annotations

import re
from enum import Enum
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; Prometheus sends about 300 bytes
# METHOD SP request-target SP HTTP-version (RFC 9112 section 3); a token, no spaces in the target.
_REQUEST_LINE = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r?")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://", re.ASCII)


class Head(Enum):
    INCOMPLETE = "incomplete"
    COMPLETE = "complete"
    BAD = "bad"  # not an HTTP/1.x request line: answer 400 at once
    TOO_LARGE = "too_large"  # no end within MAX_HEAD_BYTES: 431


def skip_empty_lines(buf: bytearray) -> None:
    """RFC 9112 2.2: a server SHOULD ignore empty lines received before the request line."""
    start = 0
    while start < len(buf) and buf[start] in b"\r\n" and start < 64:
        start += 1
    if start:
        del buf[:start]


def head_state(buf: bytes | bytearray, searched: int = 0) -> tuple[Head, int]:
    """The state of the head collected so far and, when complete, its length in bytes.

    `searched` is how many bytes an earlier call already searched for the end, so a head that
    arrives a byte at a time is scanned once, not once per byte."""
    line_end = buf.find(b"\n", 0, MAX_HEAD_BYTES)
    if line_end < 0:
        return (Head.TOO_LARGE if len(buf) >= MAX_HEAD_BYTES else Head.INCOMPLETE), 0
    if not _REQUEST_LINE.fullmatch(bytes(buf[:line_end])):
        return Head.BAD, 0
    begin = max(line_end, searched - 3)
    ends = [i for i in (buf.find(b"\n\r\n", begin), buf.find(b"\n\n", begin)) if i >= 0]
    if ends:
        end = min(ends)
        length = end + (3 if buf[end + 1:end + 2] == b"\r" else 2)
        if length <= MAX_HEAD_BYTES:
            return Head.COMPLETE, length
        return Head.TOO_LARGE, 0
    return (Head.TOO_LARGE if len(buf) >= MAX_HEAD_BYTES else Head.INCOMPLETE), 0


def origin_form(target: str) -> str:
    """`http://host/v1/metrics?x=1` -> `/v1/metrics?x=1` (RFC 9112 3.2.2: a server must
    accept the absolute form); an origin-form target is returned as it is."""
    if not _ABSOLUTE.match(target):
        return target
    parts = urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def request_path(head: bytes) -> str:
    """The path (no query) a complete, valid head asks for, in origin form."""
    target = head.split(b" ", 2)[1].decode("latin-1")
    return origin_form(target).split("?", 1)[0]


def header(head: bytes, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case) in a complete head, or None."""
    for line in head.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def simple_response(status: int, extra: bytes = b"") -> bytes:
    """A complete response that closes the connection, for answers given before any handler."""
    reason = _REASONS[status]
    body = f"{reason}\n".encode()
    return ((f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra
            + b"\r\n" + body)
