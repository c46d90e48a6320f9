"""Keep credentials out of anything a human or a scraper can read.

Check targets (DSNs, URLs) may carry a password in the userinfo part or in the query string
(`?password=...`). Every text derived from a target or from a client library's exception goes
through `redact_url` / `redact_text` before it reaches a log line, an HTTP body or a metric.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query-string keys that libpq, asyncpg and redis-py accept as credentials.
_SECRET_KEYS = frozenset({"password", "pass", "pwd", "passwd", "sslpassword", "token"})
# A last resort for text that is not a parseable URL: `scheme://user:secret@`.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)")


def redact_url(url: str) -> str:
    """`postgresql://u:pw@h/db?password=x` -> `postgresql://u:***@h/db?password=***`.

    Text that is not a URL (e.g. `host:port`) is returned unchanged; a URL that cannot be
    parsed is masked by pattern rather than passed through.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{hostinfo}" if sep else f"{userinfo}@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(key.lower() in _SECRET_KEYS for key, _ in pairs):
                query = urlencode([(k, MASK if k.lower() in _SECRET_KEYS else v)
                                   for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return _USERINFO.sub(lambda m: m.group("head") + MASK, url)


def url_secrets(url: str) -> tuple[str, ...]:
    """Every form in which `url`'s credentials could surface in an error message."""
    found: set[str] = set()
    if "://" in url:
        try:
            parts = urlsplit(url)
            netloc = parts.netloc
            if "@" in netloc:
                userinfo = netloc.rpartition("@")[0]
                _user, sep, password = userinfo.partition(":")
                if sep and password:
                    found.update({password, unquote(password)})
            for key, value in parse_qsl(parts.query, keep_blank_values=True):
                if key.lower() in _SECRET_KEYS and value:
                    found.add(value)
        except ValueError:
            pass
        for match in _USERINFO.finditer(url):
            secret = url[match.end("head"):match.end()]
            if secret:
                found.update({secret, unquote(secret)})
    # Longest first so a secret that contains another is masked whole.
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace each non-empty secret in `text` with `***`, then mask any URL userinfo left."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _USERINFO.sub(lambda m: m.group("head") + MASK, text)
