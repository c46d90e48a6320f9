"""The background scraper against real HTTP children on loopback, on both backends."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric

from supervisor.config import DEFAULT_DENY_METRICS
from supervisor.observe.denylist import DenyList
from supervisor.observe.families import relabel
from supervisor.observe.instrument import HttpMetrics
from supervisor.observe.scraper import Scraper, ScrapeResult, Target, scrape_families
from tests.support import LOAD_SLACK, promtool_ok
from tests.support import served as merged_text

pytestmark = pytest.mark.anyio


def instrumented_child_text() -> bytes:
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    for seconds in (0.004, 0.03, 0.2, 0.7):
        metrics.observe("GET", "/v1/events/{id}", 200, seconds)
    metrics.observe("POST", "/v1/events", 503, 0.01)
    for name in ("constitutional_breach_count", "halt_state", "dissent_health_ratio",
                 "witness_coverage_percent", "override_frequency"):
        Gauge(name, "Must never leave the host.", registry=registry).set(1)
    registry.register(_Static([_counter("foo_breach_count", 3)]))
    return generate_latest(registry)


def _counter(name: str, value: float) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, "Also constitutional.", value=value)


class _Static:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class Child(ThreadingHTTPServer):
    """A tiny metrics endpoint whose behaviour a test can switch at any time."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "good"
        self.release = threading.Event()  # frees sleeping handlers at teardown
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/metrics"


class _Handler(BaseHTTPRequestHandler):
    server: Child

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.server.hits += 1
        mode = self.server.mode
        if mode == "slow":
            self.server.release.wait(10)  # far past any scrape timeout in these tests
            return
        if mode == "error":
            self.reply(500, b"oops")
        elif mode == "garbage":
            self.reply(200, b"<html><body>Welcome to nginx!</body></html>", "text/html")
        elif mode == "huge":
            self.reply(200, b"".join(b"g_%d 1\n" % i for i in range(500)))
        elif mode == "trickle":
            # Headers at once, then a body that never finishes in time.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"# TYPE a gauge\n")
            self.wfile.flush()
            self.server.release.wait(10)
        elif mode == "chunked-big":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = b"# HELP x padding padding padding padding padding padding\n" * 100
            try:
                for _ in range(200):  # 1.1 MB total, no Content-Length
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the scraper hung up at its cap, as it should
        else:
            self.reply(200, instrumented_child_text(),
                       "text/plain; version=0.0.4; charset=utf-8")

    def reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def children(*modes: str) -> Iterator[list[Child]]:
    servers = []
    threads = []
    try:
        for mode in modes:
            server = Child()
            server.mode = mode
            thread = threading.Thread(target=server.serve_forever,
                                      kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            servers.append(server)
            threads.append(thread)
        yield servers
    finally:
        for server in servers:
            server.release.set()
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


# Bound and never listening, for the whole session: a connection to it is refused, and no
# other process can take the port meanwhile (a port merely found free could be).
_DEAD = socket.socket()
_DEAD.bind(("127.0.0.1", 0))


def dead_url() -> str:
    """A loopback port nothing listens on: connection refused."""
    return f"http://127.0.0.1:{_DEAD.getsockname()[1]}/metrics"


async def wait_until(scraper: Scraper, condition: Any, limit: float = 20.0) -> dict[str, Any]:
    with anyio.fail_after(limit):
        while True:
            snap = dict(scraper.snapshot())
            if condition(snap):
                return snap
            await anyio.sleep(0.02)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def render(families: list[Metric]) -> str:
    registry = CollectorRegistry()
    registry.register(_Static(families))
    return generate_latest(registry).decode()




async def test_bad_children_never_delay_or_break_the_good_one() -> None:
    with children("good", "slow", "garbage", "error", "trickle") as (good, slow, garbage, err,
                                                                      trickle):
        # The slow and trickling children time out after 5 s: far enough from the good
        # child's first scrape that a loaded machine's seconds cannot blur the two.
        targets = {"api": (good.url, 2.0), "slow": (slow.url, 5.0), "dead": (dead_url(), 0.6),
                   "garbage": (garbage.url, 0.6), "error": (err.url, 0.6),
                   "trickle": Target(trickle.url, 5.0)}
        scraper = Scraper(targets, interval=0.2, max_series=1000)
        async with anyio.create_task_group() as tg:
            began = time.monotonic()
            await tg.start(scraper.run)
            snap = await wait_until(scraper, lambda s: "api" in s)
            # Waiting for the slow and the trickling child would take their 5 s timeouts; the
            # good one alone takes milliseconds idle, a second or two on a loaded machine.
            assert time.monotonic() - began < 1.0 + LOAD_SLACK, \
                "the good child waited for the slow ones"
            assert snap["api"].ok and snap["api"].samples > 0
            # Two good rounds while the slow child still hangs in its first.
            await wait_until(scraper, lambda s: good.hits >= 3)
            assert "slow" not in scraper.snapshot()

            snap = await wait_until(scraper, lambda s: set(s) == set(targets), limit=20)
            thread_snap = await anyio.to_thread.run_sync(scraper.snapshot)
            assert set(thread_snap) == set(targets)
            tg.cancel_scope.cancel()

    assert snap["api"].ok and snap["api"].error is None
    assert snap["slow"].error == "timeout after 5s" and not snap["slow"].ok
    assert snap["trickle"].error == "timeout after 5s"
    assert 4.95 <= snap["slow"].duration_seconds < 5.0 + LOAD_SLACK
    assert snap["dead"].error == "ConnectError"
    assert snap["garbage"].error is not None and snap["garbage"].error.startswith(
        "not metrics text")
    assert snap["error"].error == "HTTP 500"
    for name in ("slow", "dead", "garbage", "error", "trickle"):
        assert snap[name].families == () and snap[name].samples == 0
        assert "127.0.0.1" not in (snap[name].error or "")

    text = render(scrape_families(snap, "prod"))
    assert 'service_scrape_up{environment="prod",service="api"} 1.0' in text
    assert 'service_scrape_up{environment="prod",service="dead"} 0.0' in text
    assert "service_scrape_duration_seconds{" in text
    promtool_ok(text)


async def test_stale_data_is_dropped_at_read_time() -> None:
    clock = FakeClock()
    with children("good") as (child,):
        scraper = Scraper({"api": (child.url, 1.0)}, interval=0.1, max_series=1000,
                          clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            snap = await wait_until(scraper, lambda s: "api" in s and s["api"].ok)
            good_at = snap["api"].good_at
            assert snap["api"].stale_after == pytest.approx(3 * 0.1 + 1.0)

            # The child starts failing: up goes to 0 but the last good copy is still served.
            child.mode = "error"
            snap = await wait_until(scraper, lambda s: not s["api"].ok)
            assert snap["api"].families and snap["api"].good_at == good_at
            assert snap["api"].error == "HTTP 500"

            clock.advance(1.31)  # past 3 * interval + timeout since the good scrape
            snap = dict(scraper.snapshot())
            assert snap["api"].families == () and not snap["api"].ok

            # It recovers: fresh data again.
            child.mode = "good"
            await wait_until(scraper, lambda s: s["api"].ok and s["api"].families)
            tg.cancel_scope.cancel()

        # Scraper stopped: once the last attempt is too old, the service reads as down.
        assert scraper.snapshot()["api"].ok
        clock.advance(1.31)
        stopped = scraper.snapshot()["api"]
        assert not stopped.ok and stopped.families == ()
        # The same object on every read while nothing changes: /v1/metrics keys its cache by it.
        assert scraper.snapshot()["api"] is stopped


async def test_absurd_payloads_are_cut_and_reported() -> None:
    with children("huge", "chunked-big", "good") as (huge, big, good):
        scraper = Scraper({"huge": (huge.url, 2.0), "big": (big.url, 2.0),
                           "api": (good.url, 2.0)},
                          interval=0.2, max_series=100, max_bytes=64 * 1024)
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            snap = await wait_until(scraper, lambda s: len(s) == 3)
            tg.cancel_scope.cancel()
    assert snap["huge"].limited and snap["huge"].samples > 100
    assert snap["huge"].error == "more than 100 samples" and snap["huge"].families == ()
    assert snap["big"].limited and snap["big"].error == "body larger than 65536 bytes"
    assert not snap["api"].limited and snap["api"].ok
    text = render(scrape_families(snap, "e"))
    assert 'service_scrape_limit_exceeded{environment="e",service="huge"} 1.0' in text
    assert 'service_scrape_limit_exceeded{environment="e",service="api"} 0.0' in text


async def test_set_targets_adds_and_removes_while_running() -> None:
    with children("good", "good") as (one, two):
        scraper = Scraper({"one": (one.url, 1.0)}, interval=0.1)
        assert "running=False" in repr(scraper)
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            await wait_until(scraper, lambda s: "one" in s)
            scraper.set_targets({"two": (two.url, 1.0)})
            assert "one" not in scraper.snapshot()
            await wait_until(scraper, lambda s: "two" in s and s["two"].ok)
            hits = one.hits
            await wait_until(scraper, lambda s: two.hits >= 3)
            assert one.hits == hits  # the removed target is no longer fetched
            assert set(scraper.snapshot()) == {"two"}
            tg.cancel_scope.cancel()


async def test_fr52_scrape_merge_render_drops_constitutional_metrics() -> None:
    with children("good") as (child,):
        scraper = Scraper({"api": (child.url, 1.0)}, interval=0.2)
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            snap = await wait_until(scraper, lambda s: "api" in s and s["api"].ok)
            tg.cancel_scope.cancel()
    raw = "\n".join(f.name for f in snap["api"].families)
    assert "halt_state" in raw and "foo_breach_count" in raw  # the child did expose them
    # ... and the scraper screened them out of what may be served, counted.
    served = "\n".join(f.name for f in snap["api"].served())
    assert "halt_state" not in served and "foo_breach_count" not in served
    assert {d.family for d in snap["api"].drops if d.reason == "denied"} >= {
        "halt_state", "foo_breach_count"}
    assert scraper.ledger.counts()["api"]["denied"] >= 6

    # The daemon's own request metrics share family names with api's: one family each.
    own_registry = CollectorRegistry()
    HttpMetrics(own_registry).observe("GET", "/v1/metrics", 200, 0.002)
    sources = [relabel(own_registry.collect(), "supervisor", "prod")]
    sources += [relabel(snap[service].families, service, "prod") for service in sorted(snap)]
    sources.append(scrape_families(snap, "prod"))
    text, _ = merged_text(sources, DenyList(DEFAULT_DENY_METRICS))
    for banned in ("constitutional_breach_count", "halt_state", "dissent_health_ratio",
                   "witness_coverage_percent", "override_frequency", "breach_count"):
        assert banned not in text, banned
    assert text.count("# TYPE http_request_duration_seconds histogram") == 1
    assert ('http_request_duration_seconds_bucket{endpoint="/v1/events/{id}",environment="prod",'
            'le="0.25",method="GET",service="api",status="200"} 3.0') in text
    assert 'service="supervisor"' in text
    assert "_created" not in text
    promtool_ok(text)


def test_scrape_result_is_frozen() -> None:
    result = ScrapeResult("api", True, 0.1, (), 1.0)
    with pytest.raises(AttributeError):
        result.ok = False  # type: ignore[misc]


async def test_targets_spread_over_the_interval_after_the_first_scrape() -> None:
    """All targets are scraped at once at start; then each keeps its own random phase."""
    phases = iter([0.0, 0.9])
    with children("good", "good") as (early, late):
        scraper = Scraper({"early": (early.url, 1.0), "late": (late.url, 1.0)}, interval=1.0,
                          rng=lambda: next(phases))
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            await wait_until(scraper, lambda s: early.hits >= 1 and late.hits >= 1)
            await wait_until(scraper, lambda s: early.hits >= 2)
            # early's second scrape came one interval after the first; late's waits 0.9 more.
            assert late.hits == 1
            await wait_until(scraper, lambda s: late.hits >= 2)
            assert early.hits == 2
            tg.cancel_scope.cancel()


class KeepAliveServer:
    """HTTP/1.1 with a keep-alive timeout, losing the race on every reuse: a request that
    arrives once the connection has been idle for most of the timeout finds it closed
    unanswered, as uvicorn's timer firing with the request in flight does (`RemoteProtocolError`
    on about 5% of scrapes when the scrape interval equals the timeout)."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.answered = self.dropped = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        body = b"# TYPE g gauge\ng 1\n"
        answered_at: float | None = None
        with conn:
            buffer = b""
            while not self.stopping.is_set():
                conn.settimeout(self.keepalive if answered_at is not None else 5.0)
                try:
                    data = conn.recv(65536)
                except (TimeoutError, OSError):
                    return  # idle for the whole keep-alive timeout: close
                if not data:
                    return
                if answered_at is not None and not buffer and (
                        time.monotonic() - answered_at >= 0.75 * self.keepalive):
                    self.dropped += 1  # the timer "fired" as the request came in
                    return
                buffer += data
                if b"\r\n\r\n" in buffer:
                    buffer = b""
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    self.answered += 1
                    answered_at = time.monotonic()

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        self.sock.close()


async def test_keep_alive_equal_to_the_interval_never_fails_a_scrape() -> None:
    """The service closes idle connections after exactly the scrape interval and loses the
    race on every reuse: each such scrape is retried once on a new connection, so none fails
    and nothing is logged."""
    interval = 0.25
    server = KeepAliveServer(keepalive=interval)
    rounds = 12
    try:
        scraper = Scraper({}, interval)
        target = Target(server.url, 2.0)
        results = []
        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            began = anyio.current_time()
            for i in range(rounds):
                await anyio.sleep_until(began + i * interval)  # fixed rate, as the scraper's
                results.append(await scraper.scrape_once("svc", target))
            tg.cancel_scope.cancel()
    finally:
        server.close()
    assert [r.error for r in results if not r.ok] == []
    assert server.answered == rounds
    assert server.dropped > 0  # the race was provoked, not dodged


async def test_scrape_state_changes_are_logged_once_each(
        caplog: pytest.LogCaptureFixture) -> None:
    """Going down is logged at WARNING with the reason, coming back at INFO, and nothing is
    logged for the scrapes in between; the very first scrape failing (a service not
    listening yet) is only INFO, a second failure in a row the WARNING."""
    caplog.set_level(logging.DEBUG, logger="supervisor.observe.scraper")

    def logged() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == "supervisor.observe.scraper" and r.levelno >= logging.INFO]

    with children("error") as (child,):
        scraper = Scraper({"svc": (child.url, 2.0)}, 60.0)  # scrapes driven by poke() only

        async def scrapes(count: int, ok: bool) -> None:
            for _ in range(count):
                before = scraper.snapshot().get("svc")
                scraper.poke("svc")
                snap = await wait_until(scraper, functools.partial(
                    lambda s, old: s.get("svc") is not old, old=before))
                assert snap["svc"].ok is ok

        async with anyio.create_task_group() as tg:
            await tg.start(scraper.run)
            await wait_until(scraper, lambda s: "svc" in s)  # the first scrape is at once
            first = (logging.INFO, "scrape not answering yet service=svc error=HTTP 500")
            assert logged() == [first]
            await scrapes(3, ok=False)
            down = (logging.WARNING, "scrape failing service=svc error=HTTP 500")
            assert logged() == [first, down]
            child.mode = "good"
            await scrapes(3, ok=True)
            child.mode = "error"
            await scrapes(3, ok=False)
            tg.cancel_scope.cancel()
    assert logged() == [first, down, (logging.INFO, "scrape recovered service=svc"), down]
