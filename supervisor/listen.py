"""Bind the HTTP port before anything else, without importing the HTTP stack.

The daemon binds first so that a taken port fails the start before any service is spawned,
but prometheus_client and wsgiref (about 60 ms of imports) are only needed once the services
run; http.serve() takes this socket over.
"""

from __future__ import annotations

import socket

# socketserver's default of 5 drops probes under bursts; a full queue drops a SYN, which the
# client retries only after a second. The kernel caps it at net.core.somaxconn (4096).
BACKLOG = 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)
