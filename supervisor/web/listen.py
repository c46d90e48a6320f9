"""Bind the HTTP port before anything else, without importing the HTTP stack.

The daemon binds first so that a taken port fails the start before any service is spawned,
but prometheus_client and wsgiref (about 60 ms of imports) are only needed once the services
run; http.serve() takes this socket over.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

# socketserver's default of 5 drops probes under bursts; a full queue drops a SYN, which the
# client retries only after a second. The kernel caps it at net.core.somaxconn (4096).
BACKLOG = 1024

log = logging.getLogger("supervisor.daemon")  # operators know these lines by that name


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def exposure_warning(host: str, port: int, web_config: Any) -> str | None:
    """What to tell the operator when the port is reachable from other hosts unprotected
    (`web_config`: a webconfig.WebConfig or None)."""
    if is_loopback(host) or (web_config is not None and (web_config.tls or web_config.users)):
        return None
    return (f"listen address {host_port(host, port)} is not loopback and no "
            "web_config_file is set: metrics and status (pids, config path) are served to "
            "anyone who can reach it, without TLS or authentication")


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url(host: str, port: int, web_config: Any) -> str:
    """Where a client on this host reaches the daemon (a wildcard address as loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    scheme = "https" if web_config is not None and web_config.tls else "http"
    return f"{scheme}://{host_port(host, port)}"


def log_listening(host: str, port: int, web_config: Any) -> None:
    scheme = "https" if web_config is not None and web_config.tls else "http"
    log.info("listening address=%s://%s/v1/metrics", scheme, host_port(host, port))
    if web_config is not None:
        log.info("web config path=%s tls=%s client_auth=%s basic_auth_users=%d",
                 web_config.path, "on" if web_config.tls else "off",
                 web_config.client_auth_type, len(web_config.users))
