"""Keep credentials out of anything a human or a scraper can read.

Secrets are masked *by value*, never by parsing the text they appear in: a URL whose password
holds an unencoded `/`, `#`, `?` or `@` does not parse, and the parser's own message then
carries the password (`invalid literal for int() with base 10: '<password>'`). So the secrets
are extracted from each configured DSN and URL without relying on a successful parse (every
place where the user information could end, and the pieces a parser could cut the password
into), in the forms they may surface in (as written, percent-decoded and -encoded, repr- and
JSON-escaped), and every string that leaves the daemon (log records, /v1/ready, /v1/status,
control replies) has each of them replaced with `***`.

`url_problem` says why a DSN or URL would not parse the same way in every client, without
quoting it, so that check-config can reject it by key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

MASK = "***"
# Query-string keys that libpq, asyncpg and redis-py accept as credentials.
_SECRET_KEYS = ("password", "pass", "pwd", "passwd", "sslpassword", "token")
_QUERY_SECRET = re.compile(r"(?:^|[?&;])(?:" + "|".join(_SECRET_KEYS) + r")=([^&;]*)", re.I)
# A last resort for text that is not from the config: `scheme://user:secret@`.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)")
# Pieces of a password shorter than this are not masked on their own: masking "ab" would
# shred every message, and a fragment that short says little about the whole.
MIN_FRAGMENT = 4
_DELIMITERS = re.compile(r"[/?#@:=&;,+\s]")
_SUB_DELIMS = "!$&'()*+,;="
_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")  # only non-ASCII encoded


def url_secrets(url: str) -> tuple[str, ...]:
    """Every form in which `url`'s credentials could surface in a message; longest first."""
    whole: set[str] = set()  # the password itself, whatever its length
    pieces: set[str] = set()  # what a confused parser may have cut it into
    _scheme, sep, rest = url.partition("://")
    if sep:
        netloc_end = len(rest)
        for stop in "/?#":
            index = rest.find(stop)
            if index >= 0:
                netloc_end = min(netloc_end, index)
        ends = {rest.rfind("@", 0, netloc_end), rest.rfind("@")}  # as parsers do; as meant
        for end in ends:
            if end > 0:
                _user, colon, password = rest[:end].partition(":")
                if colon and password:
                    whole.add(password)
                    pieces.update(_pieces(password))
    for match in _QUERY_SECRET.finditer(url):
        value = match.group(1)
        if value:
            whole.update({value, value.partition("#")[0]} - {""})
            pieces.update(_pieces(value))
    found: set[str] = set()
    for secret in whole:
        found.update(_forms(secret))
    for piece in pieces:
        found.update(f for f in _forms(piece) if len(f) >= MIN_FRAGMENT)
    found.discard("")
    return tuple(sorted(found, key=len, reverse=True))


def _pieces(secret: str) -> set[str]:
    """Prefixes, suffixes and segments of `secret` around each URL delimiter in it."""
    out: set[str] = set()
    for match in _DELIMITERS.finditer(secret):
        out.add(secret[:match.start()])
        out.add(secret[match.end():])
    out.update(_DELIMITERS.split(secret))
    return {p for p in out if len(p) >= MIN_FRAGMENT}


def _forms(secret: str) -> set[str]:
    """`secret` as written and decoded, each encoded as strictly as possible and as loosely
    as URL libraries do (httpx keeps the sub-delimiters), each as it appears inside a repr or
    a JSON string."""
    decoded = {secret, unquote(secret), unquote_plus(secret)}
    encoded: set[str] = set()
    for value in decoded:
        encoded.update({value, quote(value, safe=""), quote_plus(value, safe=""), quote(value),
                        quote(value, safe=_SUB_DELIMS + ":@/?"), quote(value, safe=_SUB_DELIMS),
                        quote(value, safe=_PRINTABLE), quote(value, safe=_PRINTABLE + "%")})
    forms: set[str] = set()
    for value in encoded:
        forms.update({value, repr(value)[1:-1], json.dumps(value)[1:-1],
                      json.dumps(value, ensure_ascii=False)[1:-1]})
    return {f for f in forms if f}


def env_references(text: str) -> tuple[str, ...]:
    """The variable names `${NAME}` / `${NAME:-default}` in `text` (see datatypes.interpolate)."""
    return tuple(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def interpolated_values(raw: str, environ: Mapping[str, str]) -> set[str]:
    """The environment values `raw` takes in when interpolated: secrets by definition."""
    values = {environ.get(name, "") for name in env_references(raw)}
    return {v for v in values if len(v) >= MIN_FRAGMENT}


def url_problem(url: str, *, path_at_ok: bool = False) -> str | None:
    """Why `url` would not parse as intended, or None. Never quotes the URL: it may hold a
    password. `path_at_ok` allows an `@` in the path, query or fragment (HTTP URLs)."""
    hint = ("percent-encode '/', '?', '#', '@', ':' and '%' in the user name and password "
            "(e.g. '/' as %2F)")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return "contains spaces or control characters (percent-encode them)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return f"cannot be parsed as a URL: {hint}"
    after_netloc = url.partition("://")[2][len(parts.netloc):]
    # `user:pa/ss@host` splits as host "user", port "pa" (or a numeric "12" of "12/34"): an
    # '@' after a host that has a ':' is a password cut short, never an HTTP path's '@'.
    if "@" in after_netloc and (not path_at_ok or ":" in parts.netloc):
        return f"has an '@' after the host (in a path, write it as %40): {hint}"
    if "#" in url and not path_at_ok:  # no fragment in a DSN: a '#' cut a password short
        return f"has a '#' (a fragment means nothing here): {hint}"
    userinfo = parts.netloc.rpartition("@")[0]
    if re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        return f"has a '%' that is not a percent-escape in the user information: {hint}"
    return None


def redact_url(url: str) -> str:
    """`url` with its credentials masked (by value: works on URLs that do not parse)."""
    return redact_text(url, url_secrets(url))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace each non-empty secret in `text` with `***`, then mask any URL userinfo left."""
    return Redactor(secrets).redact(text)


class Redactor:
    """Masks a fixed set of secrets (longest first, so one containing another goes whole)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._pattern = (re.compile("|".join(re.escape(s) for s in self.secrets))
                         if self.secrets else None)

    def __repr__(self) -> str:
        return f"<Redactor secrets={len(self.secrets)}>"

    def redact(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        if "://" in text:
            text = _USERINFO.sub(lambda m: m.group("head") + MASK, text)
        return text

    def redact_obj(self, value: Any) -> Any:
        """A JSON-shaped value with every string value redacted. Keys are left alone: they are
        field, service and check names (never secrets), and the document keeps its shape."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_obj(v) for v in value]
        return value


class LogRedactor(logging.Filter):
    """A handler filter: each record's message and exception text, with the secrets masked.

    The daemon swaps `redactor` when a reload brings other secrets.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        if not redactor.secrets:  # nothing to look for: no cost on the log's hot path
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        # Formatted once here; the formatter's getMessage() then has no arguments to apply.
        record.msg, record.args = redactor.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        return True


def config_secrets(targets: Iterable[str], interpolated: Iterable[str] = (),
                   whole: Iterable[str] = ()) -> frozenset[str]:
    """The secrets of a config: every form of each target's credentials, the environment
    values interpolated into them, and `whole` values (dsn_file contents) as they are."""
    found: set[str] = set()
    for target in targets:
        found.update(url_secrets(target))
    for value in interpolated:
        found.update(_forms(value))
    for value in whole:
        if value:
            found.update(_forms(value))
            found.update(url_secrets(value))
    return frozenset(found)
