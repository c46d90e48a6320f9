"""TLS and basic authentication on the listener, from the current web config (config/webconfig.py).

Everything on the port is behind basic auth when users are configured, /v1/health included,
as with the exporter-toolkit (see docs/operator-guide.md for probes). As in the toolkit:
401 with `WWW-Authenticate: Basic` when the credentials are missing or wrong; an unknown user
is checked against a fixed hash so that timing does not tell users apart; bcrypt runs one at
a time and its results are cached (at most CACHE_SIZE entries, keyed by user, hash and
password), so scrapes with the same credentials cost one check, not one per request.

The current config is read per connection (TLS) and per request (auth), so a reload applies
to the next connection. Like the toolkit, which reads the file on every request, changed files
are picked up without a reload: at most once every REFRESH_INTERVAL the web config file and
the certificate, key and CA files it names are stat()ed, and re-read if one changed (rotated
certificates). A file that no longer loads is logged and the last good config stays.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from supervisor.config.webconfig import WebConfig, WebConfigError, file_stamp, load_web_config
from supervisor.web.heads import header

log = logging.getLogger(__name__)
REFRESH_INTERVAL = 1.0  # seconds between checks of the web config's files

CACHE_SIZE = 100
# bcrypt of "fakepassword", the toolkit's: compared for unknown users.
_FAKE_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_UNAUTHORIZED = b"Unauthorized\n"


class WebGate:
    """The listener's view of the web config: TLS context, SAN check, auth, headers."""

    def __init__(self, loaded: Callable[[], WebConfig | None]) -> None:
        self.loaded = loaded  # the config's own (start or last reload)
        self._base: WebConfig | None = None
        self._active: WebConfig | None = None
        self._checked = 0.0
        self._failed_stamp: object = None
        self._refresh_lock = threading.Lock()
        self._cache: dict[tuple[str, str, bytes], bool] = {}
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._rate_lock = threading.Lock()
        self._tokens: float | None = None  # full at the first request, as Go's limiter starts
        self._refilled = time.monotonic()

    def current(self) -> WebConfig | None:
        """The config to apply now: the loaded one, or a newer read of its changed files."""
        base = self.loaded()
        if base is None:
            return None
        now = time.monotonic()
        if base is self._base and now - self._checked < REFRESH_INTERVAL:
            return self._active
        with self._refresh_lock:
            if base is not self._base:  # started, or reloaded: the reload's read wins
                self._base, self._active, self._checked = base, base, now
                return base
            if now - self._checked < REFRESH_INTERVAL:
                return self._active
            self._checked = now
            active = self._active or base
            stamp = file_stamp(path for path, *_ in active.stamp)
            if stamp != active.stamp and stamp != self._failed_stamp:
                try:
                    self._active = load_web_config(active.path)
                    log.info("web config re-read: its files changed path=%s", active.path)
                except WebConfigError as exc:
                    self._failed_stamp = stamp
                    log.error("web config changed but does not load; keeping the last good "
                              "one path=%s problems=%s", active.path, "; ".join(exc.problems))
            return self._active

    # -- TLS (called by the acceptor) -----------------------------------------------------
    def tls_context(self) -> ssl.SSLContext | None:
        config = self.current()
        return None if config is None else config.tls

    def peer_allowed(self, sock: ssl.SSLSocket) -> bool:
        config = self.current()
        if config is None or config.allowed_sans is None:
            return True
        cert = sock.getpeercert()
        if not cert:  # no certificate: only client_auth_type decides
            return config.client_auth_type in ("NoClientCert", "RequestClientCert",
                                               "VerifyClientCertIfGiven")
        entries: Any = cert.get("subjectAltName", ())
        for kind, value in entries:
            if kind == "IP Address":
                value = str(ipaddress.ip_address(value.strip()))
            if value in config.allowed_sans:
                return True
        return False

    def inline_ok(self, head: bytes) -> bool:
        """May the acceptor answer this head itself? Not when it would run bcrypt (tens of
        milliseconds): only with no users, or credentials already cached as good."""
        config = self.current()
        if config is None or (not config.users and not config.rate_interval):
            return True
        if config.rate_interval:
            return False
        credentials = _credentials(header(head, b"authorization"))
        if credentials is None:
            return True  # a 401, at once
        user, password = credentials
        hashed = config.users.get(user)
        key = (user, hashed or "", password)
        return hashed is not None and self._cache.get(key) is True

    # -- authentication -------------------------------------------------------------------
    def authenticated(self, config: WebConfig, authorization: str | None) -> bool:
        if not config.users:
            return True
        credentials = _credentials(authorization.encode("latin-1") if authorization else None)
        if credentials is None:
            return False
        user, password = credentials
        hashed = config.users.get(user)
        key = (user, hashed or "", password)
        with self._cache_lock:
            cached = self._cache.get(key)
        if cached is None:
            import bcrypt

            with self._bcrypt_lock:  # CPU-bound: one at a time, as the toolkit does
                try:
                    ok = bcrypt.checkpw(password, (hashed or "").encode() or _FAKE_HASH)
                except ValueError:
                    ok = False
            cached = ok and hashed is not None
            with self._cache_lock:
                if len(self._cache) >= CACHE_SIZE:
                    for stale in random.sample(list(self._cache), max(1, CACHE_SIZE // 10)):
                        del self._cache[stale]
                self._cache[key] = cached
        return cached and hashed is not None

    def allow_rate(self, config: WebConfig) -> bool:
        """The toolkit's token bucket: one request per `interval`, bursts of `burst`."""
        if not config.rate_interval:
            return True
        with self._rate_lock:
            now = time.monotonic()
            tokens = float(config.rate_burst) if self._tokens is None else self._tokens
            self._tokens = min(float(config.rate_burst),
                               tokens + (now - self._refilled) / config.rate_interval)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def wsgi(self, app: WSGIApp) -> WSGIApp:
        """`app` behind the current config's rate limit, basic auth and extra headers."""

        def protected(environ: dict[str, Any], start_response: Callable[..., Any]
                      ) -> Iterable[bytes]:
            config = self.current()
            if config is None:
                return app(environ, start_response)
            extra = list(config.headers)
            if not self.allow_rate(config):
                return _plain(start_response, "429 Too Many Requests", extra)
            if not self.authenticated(config, environ.get("HTTP_AUTHORIZATION")):
                return _plain(start_response, "401 Unauthorized",
                              [*extra, ("WWW-Authenticate", "Basic")])
            if not extra:
                return app(environ, start_response)

            def with_headers(status: str, headers: list[tuple[str, str]],
                             exc_info: Any = None) -> Any:
                return start_response(status, [*headers, *extra], exc_info)

            return app(environ, with_headers)

        return protected


def _credentials(value: bytes | None) -> tuple[str, bytes] | None:
    """(user, password) from an `Authorization: Basic ...` value, or None if malformed."""
    if not value:
        return None
    scheme, _, encoded = value.strip().partition(b" ")
    if not hmac.compare_digest(scheme.lower(), b"basic") or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


def _plain(start_response: Callable[..., Any], status: str,
           headers: list[tuple[str, str]]) -> list[bytes]:
    body = status.split(" ", 1)[1].encode() + b"\n"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]
