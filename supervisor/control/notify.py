"""The systemd notification protocol (sd_notify), spoken directly: no libsystemd needed.

One datagram per message to `$NOTIFY_SOCKET` (a filesystem path, or an abstract socket name
written with a leading `@`). Sending never raises: a supervisor must not fall over because
systemd stopped listening. The watchdog is pinged from the event loop itself, so a wedged loop
stops pinging and systemd restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import anyio

logger = logging.getLogger(__name__)

def _monotonic_usec() -> int:
    # systemd compares MONOTONIC_USEC against its own CLOCK_MONOTONIC reading.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(value: object) -> str:
    # Each field is one `KEY=value` line in the datagram; a newline would start a new field.
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify messages to one socket address; stateless apart from failure logging."""

    def __init__(
        self, address: str, *, monotonic_usec: Callable[[], int] = _monotonic_usec
    ) -> None:
        if address.startswith("@"):
            # Abstract namespace: the kernel name starts with a NUL byte instead of the `@`.
            self._sockaddr: str | bytes = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._sockaddr = address
        else:
            raise ValueError(f"unsupported NOTIFY_SOCKET address {address!r}")
        self.address = address
        self._monotonic_usec = monotonic_usec
        self._failing = False
        self.sent = 0
        self.failures = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """A Notifier for `$NOTIFY_SOCKET`, or None when not run by systemd (or unusable)."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            return cls(address)
        except ValueError as exc:
            # e.g. a vsock: address, which systemd only uses inside VMs.
            logger.warning("sd_notify disabled: %s", exc)
            return None

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, sent={self.sent}, failures={self.failures})"

    def send(self, **fields: object) -> bool:
        """Send `KEY=value` fields in one datagram; True if the kernel accepted it."""
        for key in fields:
            if not key or not key.replace("_", "").isalnum() or not key.isupper():
                raise ValueError(f"invalid sd_notify field name {key!r}")
        payload = "".join(f"{k}={_one_line(v)}\n" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # MSG_DONTWAIT: a full receive queue must never block the event loop; a lost
                # notification is better than a stalled daemon.
                sock.sendto(payload, socket.MSG_DONTWAIT, self._sockaddr)
        except OSError as exc:
            self.failures += 1
            if not self._failing:
                # Log the first failure of a streak only: the watchdog would otherwise log
                # every few seconds for as long as the socket is gone.
                logger.warning(
                    "sd_notify failed address=%s error=%s", self.address, exc.strerror or exc
                )
                self._failing = True
            return False
        if self._failing:
            logger.info("sd_notify recovered address=%s", self.address)
            self._failing = False
        self.sent += 1
        return True

    # The verbs return None (the daemon's Notifier protocol); `send` reports success, and
    # `sent` / `failures` count outcomes.
    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.send(READY=1)
        else:
            self.send(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tie READY=1 to this reload.
        self.send(RELOADING=1, MONOTONIC_USEC=self._monotonic_usec())

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None if not requested.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a process that merely
    inherited the variables (pid differs) must not ping.
    """
    text = environ.get("WATCHDOG_USEC", "")
    if not text:
        return None
    try:
        usec = int(text)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC")
        return None
    if usec <= 0:
        return None
    wanted = environ.get("WATCHDOG_PID", "")
    if wanted:
        try:
            if int(wanted) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            logger.warning("ignoring malformed WATCHDOG_PID")
            return None
    return usec / 1_000_000 / 2


class WatchdogPinger(Protocol):
    def watchdog(self) -> object: ...


class Notifications(WatchdogPinger, Protocol):
    """What the daemon tells its service manager (a Notifier, or a test's recorder)."""

    def ready(self) -> object: ...
    def status(self, text: str) -> object: ...
    def reloading(self) -> object: ...
    def stopping(self) -> object: ...


async def watchdog_loop(notifier: WatchdogPinger, interval: float) -> None:
    """Ping WATCHDOG=1 every `interval` seconds until cancelled.

    Runs as an ordinary task on the event loop on purpose: if the loop is blocked the pings
    stop, which is exactly what the watchdog is there to detect. A thread would keep pinging.
    """
    if interval <= 0:
        raise ValueError("watchdog interval must be positive")
    while True:
        notifier.watchdog()
        await anyio.sleep(interval)


# STATUS= follows state changes, at most once per this many seconds (1000 services flapping
# send 5 datagrams a second, not thousands).
STATUS_MIN_INTERVAL = 0.2


class Announcer:
    """What the daemon tells its service manager, under two rules: after STOPPING=1 nothing
    but STOPPING (READY=1 or RELOADING=1 then would be a lie), and STATUS= only when its text
    changed, at most once per STATUS_MIN_INTERVAL while states change."""

    def __init__(self, notifier: Notifications | None,
                 status_text: Callable[[], str]) -> None:
        self.notifier = notifier
        self._status_text = status_text
        self._stopping_sent = False
        self._last_status: str | None = None
        self._changed: anyio.Event | None = None  # made by follow(): needs the running loop

    def send(self, what: Literal["ready", "reloading", "stopping"]) -> None:
        if what == "stopping":
            self._stopping_sent = True
        elif self._stopping_sent:
            return
        if self.notifier is not None:
            getattr(self.notifier, what)()

    def status(self) -> None:
        if self.notifier is not None:
            text = self._status_text()
            if text != self._last_status:
                self._last_status = text
                self.notifier.status(text)

    def state_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def follow(self) -> None:
        """STATUS= follows state changes within STATUS_MIN_INTERVAL, and no more often."""
        self._changed = anyio.Event()
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()  # before sending: a change from now on counts again
            self.status()
            await anyio.sleep(STATUS_MIN_INTERVAL)
