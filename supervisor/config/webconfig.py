"""The Prometheus exporter-toolkit web configuration file (node_exporter's `--web.config.file`).

Parsed as the toolkit parses it (github.com/prometheus/exporter-toolkit, web/tls_config.go):
strict YAML (unknown and duplicate keys are errors), relative file paths resolved against the
web config file's directory, TLS enabled as soon as any TLS key is set (then a certificate and
a key are required), a client CA only with a client certificate policy, bcrypt hashes checked
at load. Every problem is collected with its key path; passwords and keys never appear in it.

The toolkit's Go-only settings are mapped to OpenSSL where Python's ssl allows it; where it
does not (`RequireAnyClientCert`: accept any client certificate without verifying it; a
`curve_preferences` list of more than one curve) the file is refused with a message that says
so, rather than silently serving something weaker or different.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_FILE_BYTES = 1024 * 1024
CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's tls.CipherSuites() (the secure ones) by IANA name -> OpenSSL name. The TLS 1.3 suites
# are accepted and, as in Go, not configurable.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}
# The toolkit's allowed response headers and, where it restricts them, their values.
EXTRA_HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (), "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"), "X-XSS-Protection": (),
    "Content-Security-Policy": ()}
_TLS_KEYS = {"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
             "client_ca_file", "cipher_suites", "curve_preferences", "min_version",
             "max_version", "prefer_server_cipher_suites", "client_allowed_sans"}
_BCRYPT = re.compile(r"\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WebConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, eq=False)
class WebConfig:
    path: str
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    allowed_sans: tuple[str, ...] | None = None
    users: Mapping[str, str] = field(default_factory=dict, repr=False)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_interval: float = 0.0  # seconds between requests; 0: no rate limit
    rate_burst: int = 0
    stamp: tuple[tuple[str, int, int, int], ...] = ()  # the files read, as file_stamp() saw them


def file_stamp(paths: Iterable[str]) -> tuple[tuple[str, int, int, int], ...]:
    """(path, inode, size, mtime) of each file, following symlinks (Kubernetes secrets are
    swapped by symlink); a missing file reads as zeros."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((path, 0, 0, 0))
    return tuple(out)


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web config file; WebConfigError lists every problem."""
    try:
        # Non-blocking open and a regular-file check: a FIFO or /dev/zero must not hang or
        # exhaust the daemon; node_exporter's files are a few KiB.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise WebConfigError(["not a regular file"])
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise WebConfigError([f"larger than {MAX_FILE_BYTES // 1024} KiB"])
        text = data.decode("utf-8")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "invalid path")
        raise WebConfigError([f"cannot read file: {reason}"]) from None
    return parse_web_config(text, path)


def parse_web_config(text: str, path: str) -> WebConfig:
    import yaml

    try:
        data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise WebConfigError([f"YAML syntax error: {problem}{where}"]) from None
    return _Parser(path).parse({} if data is None else data)


@functools.cache
def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys, as Go's yaml.UnmarshalStrict does."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # a list or mapping as a key
                    raise yaml.constructor.ConstructorError(
                        None, None, "a key must be a scalar", key_node.start_mark) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return dict(super().construct_mapping(node, deep=deep))

    return StrictLoader


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.problems: list[str] = []
        self.files: list[str] = []  # the certificate, key and CA files named

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"expected a mapping, got {_kind(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.problem(where, f"keys must be strings, got {_kind(key)}")
            elif allowed is not None and key not in allowed:
                self.problem(f"{where}.{key}" if where else key,
                             f"unknown key (expected one of {', '.join(sorted(allowed))})")
            else:
                out[key] = item
        return out

    def string(self, data: dict[str, Any], key: str, where: str) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.problem(f"{where}.{key}", f"expected a string, got {_kind(value)}")
            return ""
        return value

    def strings(self, data: dict[str, Any], key: str, where: str) -> list[str] | None:
        if key not in data or data[key] is None:
            return None
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{where}.{key}", "expected a list of strings")
            return None
        return value

    def file(self, data: dict[str, Any], key: str, where: str) -> str:
        value = self.string(data, key, where)
        path = os.path.join(self.base, value) if value and not os.path.isabs(value) else value
        if path:
            self.files.append(path)
        return path

    def parse(self, data: Any) -> WebConfig:
        top = self.mapping(data, "", {"tls_server_config", "http_server_config", "rate_limit",
                                      "basic_auth_users"})
        users = self.users(top.get("basic_auth_users"))
        headers = self.headers(self.mapping(top.get("http_server_config"),
                                            "http_server_config", {"http2", "headers"}))
        interval, burst = self.rate_limit(self.mapping(top.get("rate_limit"), "rate_limit",
                                                       {"interval", "burst"}))
        tls_data = self.mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS)
        context, auth_type, sans = self.tls(tls_data)
        if self.problems:
            raise WebConfigError(self.problems)
        return WebConfig(self.path, context, auth_type, sans, users, headers, interval, burst,
                         file_stamp([self.path, *self.files]))

    def users(self, value: Any) -> dict[str, str]:
        users: dict[str, str] = {}
        for user, hashed in self.mapping(value, "basic_auth_users", None).items():
            where = f"basic_auth_users.{user}"
            if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
                self.problem(where, "expected a bcrypt hash ($2y$10$... as htpasswd -B makes)")
                continue
            users[user] = hashed
        return users

    def headers(self, data: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        if "http2" in data and not isinstance(data["http2"], bool):
            self.problem("http_server_config.http2", "expected true or false")
        out: list[tuple[str, str]] = []
        where = "http_server_config.headers"
        for name, value in self.mapping(data.get("headers"), where, None).items():
            if name not in EXTRA_HEADERS:
                self.problem(f"{where}.{name}", "this HTTP header can not be configured "
                             f"(allowed: {', '.join(EXTRA_HEADERS)})")
            elif not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                self.problem(f"{where}.{name}", "expected a one-line string")
            elif EXTRA_HEADERS[name] and value not in EXTRA_HEADERS[name]:
                self.problem(f"{where}.{name}",
                             f"expected one of {', '.join(EXTRA_HEADERS[name])}")
            elif value:
                out.append((name, value))
        return tuple(out)

    def rate_limit(self, data: dict[str, Any]) -> tuple[float, int]:
        interval = 0.0
        raw = data.get("interval")
        if raw is not None and raw != 0:
            if not isinstance(raw, str) or not _DURATION.fullmatch(raw):
                self.problem("rate_limit.interval", "expected a duration such as 1s or 100ms")
            else:
                interval = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(raw))
        burst = data.get("burst", 0)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            self.problem("rate_limit.burst", "expected an integer >= 0")
            burst = 0
        return interval, int(burst)

    def tls(self, data: dict[str, Any]
            ) -> tuple[ssl.SSLContext | None, str, tuple[str, ...] | None]:
        where = "tls_server_config"
        cert_file = self.file(data, "cert_file", where)
        key_file = self.file(data, "key_file", where)
        ca_file = self.file(data, "client_ca_file", where)
        cert, key, ca_text = (self.string(data, k, where) for k in ("cert", "key", "client_ca"))
        auth_type = self.string(data, "client_auth_type", where)
        san_list = self.strings(data, "client_allowed_sans", where)
        sans = tuple(san_list) if san_list is not None else None
        # Typed like Go's struct fields: checked whether or not TLS ends up enabled.
        curves = self.strings(data, "curve_preferences", where) or []
        for curve in curves:
            if curve not in CURVES:
                self.problem(f"{where}.curve_preferences", f"unknown curve: {curve[:80]}")
        versions = [self.version(data, k) for k in ("min_version", "max_version")]
        if (versions[0] or ssl.TLSVersion.TLSv1_2) > (versions[1] or ssl.TLSVersion.TLSv1_3):
            self.problem(f"{where}.max_version", "lower than min_version")
        prefer = data.get("prefer_server_cipher_suites", True)
        if not isinstance(prefer, bool):
            self.problem(f"{where}.prefer_server_cipher_suites", "expected true or false")
        ciphers = self.ciphers(self.strings(data, "cipher_suites", where))
        enabled = any((cert_file, key_file, ca_file, cert, key, ca_text, auth_type))
        if not enabled:
            return None, "NoClientCert", None
        if len(curves) > 1:
            self.problem(f"{where}.curve_preferences", "Python's ssl can restrict the curves "
                         "to one, not order several: list one curve, or none for OpenSSL's "
                         "defaults")
        if auth_type == "RequireClientCert":  # the toolkit's old spelling
            auth_type = "RequireAnyClientCert"
        auth_type = auth_type or "NoClientCert"
        if auth_type not in CLIENT_AUTH_TYPES:
            self.problem(f"{where}.client_auth_type",
                         f"invalid value (expected one of {', '.join(CLIENT_AUTH_TYPES)})")
            return None, auth_type, sans
        if auth_type == "RequireAnyClientCert":
            self.problem(f"{where}.client_auth_type", "RequireAnyClientCert (any client "
                         "certificate, unverified) is not supported: Python's ssl verifies "
                         "every client certificate it asks for; use RequireAndVerifyClientCert "
                         "with client_ca_file")
        if (ca_file or ca_text) and auth_type == "NoClientCert":
            self.problem(f"{where}.client_auth_type", "client CA's have been configured "
                         "without a Client Auth Policy (set client_auth_type)")
        if cert_file and cert:
            self.problem(f"{where}.cert", "set cert or cert_file, not both")
        if key_file and key:
            self.problem(f"{where}.key", "set key or key_file, not both")
        for name, path in (("cert_file", cert_file), ("key_file", key_file),
                           ("client_ca_file", ca_file)):
            if path and not os.path.isfile(path):
                self.problem(f"{where}.{name}", f"cannot read {path}")
        if not cert_file and not cert:
            self.problem(where, "missing one of cert or cert_file")
        if not key_file and not key:
            self.problem(where, "missing one of key or key_file")
        if self.problems:
            return None, auth_type, sans
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = versions[0] or ssl.TLSVersion.TLSv1_2
        context.maximum_version = versions[1] or ssl.TLSVersion.TLSv1_3
        if prefer is not False:
            context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if len(curves) == 1:
            context.set_ecdh_curve(CURVES[curves[0]])
        if ciphers:
            try:
                context.set_ciphers(":".join(ciphers))
            except ssl.SSLError:
                self.problem(f"{where}.cipher_suites", "none of these suites is available")
        self.load_pair(context, cert_file, cert, key_file, key)
        if auth_type != "NoClientCert" and auth_type != "RequestClientCert":
            context.verify_mode = (ssl.CERT_REQUIRED if auth_type == "RequireAndVerifyClientCert"
                                   else ssl.CERT_OPTIONAL)
            try:
                if ca_file:
                    context.load_verify_locations(cafile=ca_file)
                elif ca_text:
                    context.load_verify_locations(cadata=ca_text)
                else:  # Go verifies against the system roots when no client CA is given
                    context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
            except (OSError, ValueError) as exc:
                key_name = "client_ca_file" if ca_file else "client_ca"
                self.problem(f"{where}.{key_name}", f"cannot load: {_reason(exc)}")
        # RequestClientCert asks for a certificate and ignores it: access is the same as with
        # NoClientCert, which is what Python can do (it cannot ask without verifying).
        return (None if self.problems else context), auth_type, sans

    def version(self, data: dict[str, Any], key: str) -> ssl.TLSVersion | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value not in TLS_VERSIONS:
            self.problem(f"tls_server_config.{key}",
                         f"unknown TLS version (expected one of {', '.join(TLS_VERSIONS)})")
            return None
        return TLS_VERSIONS[value]

    def ciphers(self, names: list[str] | None) -> list[str]:
        out: list[str] = []
        for name in names or []:
            if name not in CIPHER_SUITES:
                self.problem("tls_server_config.cipher_suites", f"unknown cipher: {name[:80]}")
            elif CIPHER_SUITES[name] is not None:
                out.append(str(CIPHER_SUITES[name]))
        return out

    def load_pair(self, context: ssl.SSLContext, cert_file: str, cert: str, key_file: str,
                  key: str) -> None:
        where = "tls_server_config"
        with tempfile.TemporaryDirectory(prefix="sv-tls-") as scratch:
            # load_cert_chain reads files only: inline PEM goes through a private scratch file.
            if not cert_file:
                cert_file = os.path.join(scratch, "cert.pem")
                _write_private(cert_file, cert)
            if not key_file:
                key_file = os.path.join(scratch, "key.pem")
                _write_private(key_file, key)
            try:
                # An encrypted key would make OpenSSL prompt on the terminal; Go's
                # X509KeyPair does not take one either.
                context.load_cert_chain(cert_file, key_file, password=_no_password)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.problem(where, f"failed to load the certificate and key: {_reason(exc)}")


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; key_file must hold an unencrypted key")


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ValueError) and str(exc):
        return str(exc)
    return type(exc).__name__


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
