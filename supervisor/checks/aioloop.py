"""One dedicated asyncio event loop in a daemon thread, usable from any anyio backend.

Why: asyncpg and redis.asyncio only run on an asyncio loop, but the daemon may run on trio.
Rather than two code paths (native on asyncio, bridged on trio), every asyncio-only client
runs on this one loop, whatever the daemon's backend: one design, tested on both.

How a call crosses over, without blocking the caller's loop or parking a worker thread:

1. `run(factory, timeout)` asks the bridge loop (`call_soon_threadsafe`) to start a task
   running `wait_for(factory(), timeout)`.
2. A done-callback on that task runs in the bridge thread and
   only *schedules* `event.set` on the caller's loop through the caller's native, non-blocking
   thread-safe entry point (`loop.call_soon_threadsafe` on asyncio,
   `TrioToken.run_sync_soon` on trio), found through `anyio.lowlevel.current_token()`.
   Nothing ever blocks the bridge thread waiting on the caller, so neither loop can stall the
   other, and a pending call costs a task and an event, not a thread.
3. The caller awaits the anyio Event under its own deadline (timeout + a small grace), so the
   call is bounded even if the bridge loop is wedged. If the caller is cancelled or its
   deadline passes, it asks the bridge loop to cancel the task; clients close their sockets in
   their own `finally` blocks, on the loop that owns them. A cancelled caller waits (shielded,
   bounded) until the task has really finished, so no bridge work outlives the task group
   that started it. (`run_coroutine_threadsafe` is not used: its future reports "cancelled"
   at once, before the task has unwound.)

`factory` is a zero-argument callable that returns the coroutine; it is called on the bridge
loop, so client objects (connections, pools) are created on the loop they belong to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Extra time the caller grants the bridge after `timeout` before giving up on its own: the
# bridge's wait_for normally fires first, and cancelling a connect takes a few milliseconds.
CALLER_GRACE = 0.05
# How long a cancelled caller waits (shielded) for the bridge task to unwind.
CANCEL_GRACE = 0.5
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


class BridgeStoppedError(RuntimeError):
    """`run()` was called while the asyncio thread is not running."""


class AsyncioThread:
    """Owns one asyncio loop running forever in a daemon thread until `stop()`."""

    def __init__(self, name: str = "asyncio-bridge") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<AsyncioThread {self._name} {state}>"

    @property
    def running(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge loop (for tests and introspection); never run blocking code on it."""
        if self._loop is None:
            raise BridgeStoppedError("asyncio bridge is not running")
        return self._loop

    def start(self) -> AsyncioThread:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("AsyncioThread already started")
            loop = asyncio.new_event_loop()
            started = threading.Event()
            thread = threading.Thread(target=self._main, args=(loop, started),
                                      name=self._name, daemon=True)
            thread.start()
            if not started.wait(START_TIMEOUT):
                raise RuntimeError("asyncio bridge thread did not start")
            self._loop, self._thread = loop, thread
        logger.debug("bridge started name=%s", self._name)
        return self

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def stop(self) -> None:
        """Cancel what is still pending on the loop, let it unwind, stop and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if loop.is_running():
            # Give cancelled client coroutines a chance to close their sockets cleanly.
            drained = asyncio.run_coroutine_threadsafe(_cancel_all(), loop)
            try:
                drained.result(STOP_TIMEOUT)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                logger.warning("bridge stop: pending tasks did not finish in %ss", STOP_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            logger.warning("bridge stop: thread %s did not exit", self._name)
        logger.debug("bridge stopped name=%s", self._name)

    def __enter__(self) -> AsyncioThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def run(self, coro_factory: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run `coro_factory()` on the bridge loop, bounded by `timeout` seconds.

        Returns its result or raises its exception; raises the builtin `TimeoutError` when
        the bound passes and `BridgeStoppedError` when the bridge is not running. Callable
        from asyncio or trio. If the caller is cancelled, the bridge task is cancelled and
        awaited (shielded, at most `CANCEL_GRACE`), so no work outlives its caller.
        """
        loop = self._loop
        if loop is None or not loop.is_running():
            raise BridgeStoppedError("asyncio bridge is not running")
        call = _Call(loop, _threadsafe_scheduler(), anyio.Event())
        try:
            loop.call_soon_threadsafe(call.submit, coro_factory, timeout)
        except RuntimeError:  # the loop closed in between
            raise BridgeStoppedError("asyncio bridge is not running") from None
        try:
            with anyio.move_on_after(timeout + CALLER_GRACE):
                await call.done.wait()
        except BaseException:
            # Cancelled from outside: let the client unwind (close its socket) before we go.
            call.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE):
                await call.done.wait()
            raise
        if not call.done.is_set():
            call.cancel()  # the bridge loop is wedged; do not wait for it
            raise TimeoutError(f"timed out after {timeout:g}s")
        if call.error is not None:
            raise call.error
        if call.cancelled:
            raise BridgeStoppedError("asyncio bridge stopped during the call")
        return call.result  # type: ignore[no-any-return]


class _Call:
    """One crossing. `task`, `result`, `error` are written on the bridge thread only; the
    caller reads them after `done` is set, which happens-after those writes."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 schedule: Callable[[Callable[[], object]], object], done: anyio.Event) -> None:
        self.loop = loop
        self.schedule = schedule
        self.done = done
        self.task: asyncio.Task[Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._cancel_requested = False

    def submit(self, coro_factory: Callable[[], Awaitable[Any]], timeout: float) -> None:
        if self._cancel_requested:
            self.cancelled = True
            self._wake()
            return
        self.task = self.loop.create_task(_bounded(coro_factory, timeout))
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.cancelled = True
        elif task.exception() is not None:
            self.error = task.exception()
        else:
            self.result = task.result()
        self._wake()

    def _wake(self) -> None:
        try:
            self.schedule(self.done.set)
        except RuntimeError:
            # The caller's loop already finished (trio.RunFinishedError is a RuntimeError,
            # as is asyncio's "Event loop is closed"): nobody is waiting any more.
            pass

    def cancel(self) -> None:
        """Ask the bridge loop to cancel the task; safe from any thread, never blocks."""

        def on_loop() -> None:
            self._cancel_requested = True
            if self.task is not None:
                self.task.cancel()

        try:
            self.loop.call_soon_threadsafe(on_loop)
        except RuntimeError:
            pass  # bridge loop closed: the task is gone with it


async def _bounded(coro_factory: Callable[[], Awaitable[T]], timeout: float) -> T:
    try:
        return await asyncio.wait_for(coro_factory(), timeout)
    except asyncio.TimeoutError:
        # Python 3.10's asyncio.TimeoutError is not the builtin; callers catch the builtin.
        raise TimeoutError(f"timed out after {timeout:g}s") from None


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_TIMEOUT)


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], object]:
    """The caller loop's non-blocking "call this soon, from any thread" entry point."""
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.call_soon_threadsafe
    run_sync_soon = getattr(native, "run_sync_soon", None)  # trio.lowlevel.TrioToken
    if run_sync_soon is None:
        raise RuntimeError(f"unsupported event loop token {type(native).__name__}")
    return run_sync_soon  # type: ignore[no-any-return]
