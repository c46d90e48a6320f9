"""Signal receivers that never lose a signal, on both backends.

asyncio (and anyio's `open_signal_receiver` on it) dispatches a handler added with
`loop.add_signal_handler` from the signal numbers that the C-level handler writes into a
socket pair. A burst of SIGCHLD -- hundreds of services exiting while the loop is busy --
fills that pair, and the numbers written after it are dropped: measured here, a SIGTERM sent
after ~300 SIGCHLDs within one busy loop iteration was never dispatched, so the daemon would
have ignored `systemctl stop` until systemd's SIGKILL. Trio records every signal in its
Python-level handler and uses the wakeup fd only to wake up, so it loses none; on asyncio this
module does the same (tests/test_signals.py shows both).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio

# Not imported here: on trio the daemon never needs asyncio before its services are spawned
# (asyncio and the ssl it pulls in: ~14 ms of a startup).
if TYPE_CHECKING:
    import asyncio


@contextmanager
def signal_receiver(*signums: signal.Signals) -> Iterator[AsyncIterator[int]]:
    """Like `anyio.open_signal_receiver`: iterate the signals received (each pending signal
    number once; repeats of one still pending coalesce, as the kernel coalesces them). Main
    thread only."""
    loop = _running_asyncio_loop()
    if loop is None:  # trio: its own receiver already loses nothing
        with anyio.open_signal_receiver(*signums) as received:
            yield received
        return
    hub = _Hub.for_loop(loop)
    receiver = _Receiver(signums)
    hub.add(receiver)
    try:
        yield receiver
    finally:
        hub.remove(receiver)


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop; None on trio. A loop that runs has imported asyncio."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()  # type: ignore[no-any-return]
    except RuntimeError:
        return None


class _Receiver:
    def __init__(self, signums: Iterable[int]) -> None:
        self.signums = frozenset(signums)
        self.pending: dict[int, None] = {}  # an ordered set
        self.wake = anyio.Event()

    def deliver(self, signum: int) -> None:
        self.pending[signum] = None
        self.wake.set()

    def __aiter__(self) -> _Receiver:
        return self

    async def __anext__(self) -> int:
        while not self.pending:
            await self.wake.wait()
            self.wake = anyio.Event()
        signum = next(iter(self.pending))
        del self.pending[signum]
        return signum


class _Hub:
    """One per event loop: the Python-level handlers (which run for every signal, whatever
    happened to the wakeup fd's bytes) say which signals arrived; a wakeup fd of our own, never
    read for content, only wakes the loop when a signal lands while it waits in epoll."""

    _by_loop: dict[asyncio.AbstractEventLoop, _Hub] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> _Hub:
        hub = cls._by_loop.get(loop)
        if hub is None:
            hub = cls._by_loop[loop] = cls(loop)
        return hub

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.receivers: list[_Receiver] = []
        self.previous: dict[int, Any] = {}  # signum -> the handler we replaced
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        loop.add_reader(self.reader.fileno(), self._drain)
        self.previous_wakeup = signal.set_wakeup_fd(self.writer.fileno(),
                                                    warn_on_full_buffer=False)

    def add(self, receiver: _Receiver) -> None:
        for signum in receiver.signums - self.previous.keys():
            self.previous[signum] = signal.signal(signum, self._handler)
        self.receivers.append(receiver)

    def remove(self, receiver: _Receiver) -> None:
        self.receivers.remove(receiver)
        wanted = {s for r in self.receivers for s in r.signums}
        for signum in list(self.previous.keys() - wanted):
            signal.signal(signum, self.previous.pop(signum))
        if not self.receivers:
            self._close()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # The main thread, between two bytecodes of whatever runs: append only (thread-safe),
        # the delivery itself runs as a callback of the loop.
        self.loop.call_soon_threadsafe(self._deliver, signum)

    def _deliver(self, signum: int) -> None:
        for receiver in self.receivers:
            if signum in receiver.signums:
                receiver.deliver(signum)

    def _drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _close(self) -> None:
        signal.set_wakeup_fd(self.previous_wakeup)
        self.loop.remove_reader(self.reader.fileno())
        self.reader.close()
        self.writer.close()
        del self._by_loop[self.loop]
