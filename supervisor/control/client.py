"""`supervisor status`: one row per service, then readiness; exit codes as `systemctl status`
(0 every service running, 3 some service not running, 4 daemon unreachable)."""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 3, 4
DEFAULT_CONFIG = "services.toml"
# Anything a status document can hold that render() or the exit code could trip over.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


class NotFound(Exception):
    """No way to find the daemon's address; the message says what was tried."""


@dataclass(frozen=True)
class HttpAuth:
    """How to reach a protected HTTP port: a CA for its certificate, a client certificate for
    mTLS, basic-auth credentials. Credentials come from a file or the environment, never from
    the command line (where `ps` shows them), and are never printed."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    basic_auth_file: str | None = None


def show_status(url: str | None, config_path: str | None, as_json: bool,
                environ: Mapping[str, str] | None = None, *, socket_path: str | None = None,
                auth: HttpAuth | None = None) -> int:
    """The control socket first (same host, no HTTP credentials needed), unless a URL is given
    (--url, $SUPERVISOR_URL); HTTP otherwise, or when no trusted socket answers."""
    env = os.environ if environ is None else environ
    socket_note = ""
    if not url and not env.get("SUPERVISOR_URL"):
        code, socket_note = _through_socket(socket_path, config_path, env, as_json)
        if code is not None:
            return code
    try:
        url = find_url(url, config_path, env)
    except NotFound as exc:
        print(f"supervisor: cannot find the daemon: {exc}{socket_note}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return _through_http(url, as_json, env, auth or HttpAuth(), socket_note)


def _through_socket(socket_path: str | None, config_path: str | None, env: Mapping[str, str],
                    as_json: bool) -> tuple[int | None, str]:
    """(exit code, "") when the control socket answered; (None, why not) to fall back to HTTP.
    An explicit --socket has no fallback."""
    from supervisor.control import server as control
    if socket_path:
        path = socket_path
    elif config_path is not None:
        path = control.socket_path_for(config_path)
    else:
        path = control.default_socket_path(env)
    try:
        response = control.request(path, "status", timeout=5.0)
    except control.UntrustedSocket as exc:
        why = str(exc)
    except OSError as exc:
        why = f"control socket {path}: {exc.strerror or type(exc).__name__}"
    except (ValueError, RecursionError) as exc:  # a trusted daemon, a broken answer
        print(f"supervisor: the daemon at {path} sent a malformed answer: {_short(exc)}",
              file=sys.stderr)
        return EXIT_UNREACHABLE, ""
    else:
        if response.get("ok") and "status" in response:
            return _emit(response["status"], path, None, as_json), ""
        # A daemon from before the status command: ask its HTTP port.
        why = f"control socket {path}: {_short(ValueError(response.get('error', '?')))}"
    if socket_path:
        print(f"supervisor: cannot reach the daemon: {why}", file=sys.stderr)
        return EXIT_UNREACHABLE, ""
    return None, f" (and {why})"


def _through_http(url: str, as_json: bool, env: Mapping[str, str], auth: HttpAuth,
                  socket_note: str) -> int:
    import httpx

    from supervisor.core.redact import Redactor, url_secrets

    redactor = Redactor(url_secrets(url))  # a URL may carry basic-auth credentials
    shown = redactor.redact(url)
    try:
        credentials = _credentials(auth, env)
        verify = _tls_context(auth, env)
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"supervisor: {_short(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if credentials is not None:
        redactor = Redactor((*redactor.secrets, credentials[1]))
    try:
        with httpx.Client(timeout=5.0, trust_env=not _is_loopback(url), verify=verify,
                          auth=credentials) as client:
            response = client.get(url.rstrip("/") + "/v1/status")
        if response.status_code in (401, 403):
            print(f"supervisor: the daemon at {shown} refused the request "
                  f"(HTTP {response.status_code}): {_auth_hint(credentials)}{socket_note}",
                  file=sys.stderr)
            return EXIT_UNREACHABLE
        response.raise_for_status()
    except httpx.RemoteProtocolError as exc:  # a truncated body, or no HTTP at all
        print(f"supervisor: the daemon at {shown} sent a malformed answer: "
              f"{redactor.redact(_short(exc))}{_tls_hint(exc, url, auth, env)}{socket_note}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, ssl.SSLError, OSError) as exc:
        print(f"supervisor: cannot reach the daemon at {shown}: "
              f"{redactor.redact(_short(exc))}{_tls_hint(exc, url, auth, env)}{socket_note}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        document = response.json()
    except (ValueError, RecursionError) as exc:
        print(f"supervisor: the daemon at {shown} sent a malformed status document: "
              f"{redactor.redact(_short(exc))}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return _emit(document, shown, redactor, as_json)


def _emit(document: Any, shown: str, redactor: Any, as_json: bool) -> int:
    """Print the document (table or --json) and return the exit code: the same whichever way
    it came."""
    try:
        services = _services(document)
        text = render(document)  # also for --json: a document it cannot show is malformed
        if as_json:
            text = json.dumps(document, indent=2, sort_keys=True)
    except (*_MALFORMED, RecursionError) as exc:
        message = _short(exc) if redactor is None else redactor.redact(_short(exc))
        print(f"supervisor: the daemon at {shown} sent a malformed status document: "
              f"{message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(text)
    all_running = all(s.get("state") == "running" for s in services)
    return EXIT_OK if all_running else EXIT_NOT_RUNNING


def _credentials(auth: HttpAuth, env: Mapping[str, str]) -> tuple[str, str] | None:
    """`user:password` from --basic-auth-file / $SUPERVISOR_BASIC_AUTH_FILE (first line), else
    $SUPERVISOR_BASIC_AUTH; None without any. Errors never quote the file's content."""
    path = auth.basic_auth_file or env.get("SUPERVISOR_BASIC_AUTH_FILE")
    if path:
        try:
            with open(path, "rb") as handle:
                raw = handle.read(4096)
        except OSError as exc:
            raise ValueError(f"basic auth file {path}: {exc.strerror or exc}") from None
        try:
            line = raw.decode().splitlines()[0] if raw.strip() else ""
        except UnicodeDecodeError:
            line = ""
        where = f"basic auth file {path}"
    else:
        line = env.get("SUPERVISOR_BASIC_AUTH", "")
        if not line:
            return None
        where = "$SUPERVISOR_BASIC_AUTH"
    user, sep, password = line.rstrip("\r\n").partition(":")
    if not sep or not user:
        raise ValueError(f"{where}: expected one line user:password")
    return user, password


def _tls_context(auth: HttpAuth, env: Mapping[str, str]) -> ssl.SSLContext | bool:
    cacert = auth.cacert or env.get("SUPERVISOR_CACERT")
    cert = auth.cert or env.get("SUPERVISOR_CERT")
    key = auth.key or env.get("SUPERVISOR_KEY")
    if not cacert and not cert:
        return True
    try:
        context = ssl.create_default_context(cafile=cacert or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--cacert {cacert}: {_short(exc)}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--cert {cert}: {_short(exc)}") from None
    return context


def _auth_hint(credentials: tuple[str, str] | None) -> str:
    if credentials is not None:
        return f"the credentials of user {credentials[0]!r} were refused"
    return ("the port requires credentials (web_config_file). Run `supervisor status` on the "
            "daemon's host as its user or root, which uses the control socket, or give "
            "user:password in a file (--basic-auth-file, $SUPERVISOR_BASIC_AUTH_FILE) or "
            "in $SUPERVISOR_BASIC_AUTH")


def _tls_hint(exc: BaseException, url: str, auth: HttpAuth, env: Mapping[str, str]) -> str:
    if not url.lower().startswith("https:"):
        return ""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ("; its TLS certificate is not trusted: give its CA with --cacert FILE "
                "($SUPERVISOR_CACERT)")
    if not (auth.cert or env.get("SUPERVISOR_CERT")):
        return ("; if the port requires a client certificate (mTLS), give --cert FILE "
                "[--key FILE], or run `supervisor status` on the daemon's host as its user, "
                "which uses the control socket")
    return ""


def find_url(url: str | None, config_path: str | None, environ: Mapping[str, str]) -> str:
    """`--url`, then `$SUPERVISOR_URL`, then the status file the daemon keeps in its runtime
    directory (the control socket's), and only then the config file's `listen`."""
    from supervisor.control import rundir
    from supervisor.control.server import socket_path_for

    if url:
        return url
    if environ.get("SUPERVISOR_URL"):
        return environ["SUPERVISOR_URL"]
    if config_path is None:
        directory = rundir.default_directory(environ)
    else:
        directory = str(Path(socket_path_for(config_path)).parent)
    found = rundir.read_status_file(directory)
    if found is not None and _alive(found.get("pid")):
        return str(found["url"])
    path = config_path or DEFAULT_CONFIG
    try:
        return _listen_url(path, environ)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotFound(f"no --url, no $SUPERVISOR_URL, no daemon status file in {directory}, "
                       f"and {path}: {_short(exc)}") from None


def _listen_url(path: str, environ: Mapping[str, str]) -> str:
    """The `[supervisor] listen` of `path`; reads only that key, so a file being edited
    elsewhere (invalid as a whole) still tells where the daemon is."""
    from supervisor.config import load_toml_file
    from supervisor.core.datatypes import interpolate, parse_listen
    from supervisor.web.listen import url as listen_url

    listen = load_toml_file(path).get("supervisor", {}).get("listen", "127.0.0.1:9464")
    if not isinstance(listen, str):
        raise ValueError("[supervisor] listen is not a string")
    host, port = parse_listen(interpolate(listen, environ))
    return listen_url(host, port, None)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _is_loopback(url: str) -> bool:
    """Proxy variables are for leaving the host; the daemon on loopback is reached directly."""
    import httpx

    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _services(document: Any) -> list[dict[str, Any]]:
    if not isinstance(document, dict):
        raise TypeError(f"expected a JSON object, got {type(document).__name__}")
    services = document.get("services", [])
    if not isinstance(services, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("state"), str) for s in services):
        raise TypeError("services: expected a list of objects with a name and a state")
    return services


def render(document: dict[str, Any]) -> str:
    now = document.get("time") or time.time()
    rows: list[tuple[str, ...]] = [
        ("SERVICE", "STATE", "PID", "READY", "UPTIME", "STARTS", "LAST EXIT", "NEXT START",
         "SCRAPE")]
    for s in document.get("services", []):
        rows.append((
            s["name"],
            s["state"],
            str(s["pid"] or "-"),
            _ready(s),
            _duration(s.get("uptime_seconds") or 0) if s.get("pid") else "-",
            str(s.get("starts", 0)),
            _last_exit(s.get("last_exit"), now),
            _duration(s["next_start_in_seconds"]) if s.get("next_start_in_seconds") is not None
            else "-",
            # No process, nothing to scrape: a stale failure would read as a fault.
            _scrape(s.get("scrape")) if s.get("pid") else "-",
        ))
    if any(s.get("cgroup") for s in document.get("services", [])):
        rows = [(*row, "CGROUP" if i == 0 else str(document["services"][i - 1].get("cgroup")
                                                       or "-"))
                for i, row in enumerate(rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for s in document.get("services", []):
        if s.get("state") == "waiting" and s.get("waiting_for"):
            lines.append(f"{s['name']}: waiting for {s['waiting_for']}")
        elif s.get("state") == "fatal" and s.get("last_error"):
            lines.append(f"{s['name']}: fatal: {s['last_error']}")
        elif s.get("ready") is False and s.get("state") == "running":
            probe = (s.get("probes") or {}).get("readiness") or {}
            error = probe.get("last_error") if isinstance(probe, dict) else None
            lines.append(f"{s['name']}: not ready" + (f": {error}" if error else ""))
    daemon = document.get("daemon")
    warnings = daemon.get("warnings") if isinstance(daemon, dict) else None
    for warning in warnings if isinstance(warnings, list) else []:
        lines.append(f"WARNING: {warning}")
    readiness = document.get("readiness")
    if readiness is not None:
        lines.append("")
        lines.append(f"readiness: {readiness.get('status', '?')}")
        for name, check in sorted(readiness.get("checks", {}).items()):
            mark = "ok  " if check.get("healthy") else "FAIL"
            detail = f"{check.get('latency_ms', 0):.1f} ms"
            if check.get("error"):
                detail += f"  {check['error']}"
            lines.append(f"  {mark} {name:<16} {detail}")
    return "\n".join(lines)


def _ready(s: dict[str, Any]) -> str:
    """yes/no (by the readiness probe; without one, whether it is running); "-" from a daemon
    that does not report readiness."""
    ready = s.get("ready")
    return "-" if ready is None else ("yes" if ready else "no")


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s"


def _last_exit(last: dict[str, Any] | None, now: float) -> str:
    if not last:
        return "-"
    what = f"signal {last['signal']}" if last.get("signal") else f"code {last.get('code')}"
    if last.get("reason") == "spawn_error":
        what = "spawn error"
    elif last.get("reason") == "liveness":
        what += " (liveness)"  # restarted by a failed liveness or startup probe
    ago = f" {_duration(max(0.0, now - last['at']))} ago" if last.get("at") else ""
    return f"{what}{ago}"


def _scrape(scrape: dict[str, Any] | None) -> str:
    if not scrape:
        return "-"
    text = "ok" if scrape.get("ok") else "failing"
    dropping = sum((scrape.get("dropping_families") or {}).values())
    if dropping:
        # A service whose metric families are being kept out of /v1/metrics must show.
        text += f", {dropping} families dropped"
    return text


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
