"""Stopping many services at once (shutdown, a reload's stops): one signalling pass and one
kill timer for a whole dependency level, instead of a pass and a timer task per service.

Each runner still applies its own StopRequested and decides what to signal (its cgroup, or
its group and tree); with a batch it hands the signal to the batch instead of sending it, and
its `stop_timeout` to the batch's one timer instead of a task of its own. The stopper hands
its runners over a chunk at a time and sends each chunk's signals (`send_queued`) before
stopping the next, so that the first exits are handled while the last signals go out; once
`flush()`ed, a batch sends at once (a SIGKILL when a stop times out, leftovers after an
exit), as a runner without a batch does.

`stop_levels` orders a set of services for stopping: dependents first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping

import anyio

log = logging.getLogger(__name__)

Send = Callable[[], object]  # one runner's signal, as the runner would send it now
# Signals sent between two looks at the event loop's other work. Sending them from a worker
# thread was no faster (each kill gives the GIL up, and the loop, busy with the first exits,
# keeps it up to a switch interval), and on the loop a child cannot be reaped between the
# runner's decision and its signal.
CHUNK = 50


class StopBatch:
    """Signals and kill timers of one batch of stopping services. Event-loop thread only."""

    def __init__(self, swept: bool = False) -> None:
        # A sweep of every descendant follows (the daemon's shutdown, as subreaper): what a
        # stopped service may have left outside its cgroup or tree need not be looked for
        # service by service.
        self.swept = swept
        self._pending: list[tuple[str, Send]] = []
        self._signalled: set[str] = set()  # services whose signals went out
        self._flushed = False
        # Kill timers: key (a runner) -> (deadline, what to call when it passes).
        self._timers: dict[object, tuple[float, Callable[[], object]]] = {}
        self._timers_changed = anyio.Event()

    def __repr__(self) -> str:
        return (f"<StopBatch pending={len(self._pending)} flushed={self._flushed} "
                f"timers={len(self._timers)} swept={self.swept}>")

    def signal(self, name: str, send: Send) -> bool:
        """Queue `send` for the flush; False once flushed (the caller sends it itself)."""
        if self._flushed:
            return False
        self._pending.append((name, send))
        return True

    async def send_queued(self, chunk: int = CHUNK) -> None:
        """Send the signals queued so far, `chunk` at a time, letting the event loop handle
        the first exits between chunks. The caller may queue more (the next runners' stops)
        and send again: the first services exit while the last are still being stopped,
        instead of after every stop is applied (1,000: ~20 ms)."""
        pending, self._pending = self._pending, []
        self._signalled.update(name for name, _ in pending)
        for start in range(0, len(pending), chunk):
            _send_all(pending[start:start + chunk])
            await anyio.lowlevel.checkpoint()

    async def flush(self, chunk: int = CHUNK) -> None:
        """Send every queued signal (as `send_queued`); from now on the runners send their
        own (a SIGKILL after stop_timeout, leftovers after an exit)."""
        await self.send_queued(chunk)
        self._flushed = True
        if self._signalled:
            log.info("signal services=%d (stop_signal of each)", len(self._signalled))

    def start_timer(self, key: object, delay: float, fire: Callable[[], object]) -> None:
        """Call `fire` in `delay` seconds unless cancelled (replaces `key`'s timer)."""
        self._timers[key] = (anyio.current_time() + delay, fire)
        self._timers_changed.set()

    def cancel_timer(self, key: object) -> None:
        self._timers.pop(key, None)

    async def run_timers(self) -> None:
        """Fire the kill timers as they pass; runs until cancelled (the level is done)."""
        while True:
            now = anyio.current_time()
            for key, (deadline, fire) in list(self._timers.items()):
                if deadline <= now:
                    del self._timers[key]
                    fire()
            nearest = min((d for d, _ in self._timers.values()), default=math.inf)
            changed = self._timers_changed
            with anyio.CancelScope(deadline=nearest):
                await changed.wait()
            if changed is self._timers_changed:
                self._timers_changed = anyio.Event()


def _send_all(pending: list[tuple[str, Send]]) -> None:
    for name, send in pending:
        try:
            send()
        except Exception:  # noqa: BLE001 - one service's failure never skips the others
            log.exception("cannot signal service=%s", name)


def stop_levels(names: Iterable[str], depends_on: Mapping[str, Collection[str]]
                ) -> list[list[str]]:
    """`names` in stop order: a level holds the services whose dependents (among `names`)
    are all in earlier levels. A cycle (refused by the config) would end up in one last
    level rather than never stopping."""
    left = list(dict.fromkeys(names))
    wanted = set(left)
    dependents: dict[str, set[str]] = {n: set() for n in left}
    for name in left:
        for dep in depends_on.get(name, ()):
            if dep in wanted and dep != name:
                dependents[dep].add(name)
    levels: list[list[str]] = []
    done: set[str] = set()
    while left:
        level = [n for n in left if dependents[n] <= done]
        if not level:
            level = left
        levels.append(level)
        done.update(level)
        taken = set(level)
        left = [n for n in left if n not in taken]
    return levels
