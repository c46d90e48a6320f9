"""What the four stand-ins share: argv, dependency links with bounded backoff, a tiny ASGI
router, metric families without `_created`, and serving on uvicorn until SIGTERM.

The stand-ins are separate programs run by the supervisor; they use asyncio directly (asyncpg
and redis.asyncio need it). They import `supervisor.observe.instrument` and `supervisor.core.redact`, which
`pip install .` provides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

import uvicorn
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.asgi import make_asgi_app
from prometheus_client.metrics_core import Metric

from supervisor.observe.instrument import MetricsMiddleware
from supervisor.core.redact import redact_text, redact_url, url_secrets

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STREAM = "standin:events"
MAX_BODY = 64 * 1024

T = TypeVar("T")
Scope = dict[str, Any]
Handler = Callable[[Scope, Callable[[], Awaitable[Any]], "Reply"], Awaitable[None]]


# -- argv -------------------------------------------------------------------------------------

def parser(name: str, port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=name)
    p.add_argument("--listen", default=f"127.0.0.1:{port}",
                   help="host:port for /metrics, /v1/health and /v1/ready")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    p.add_argument("--retry-max", type=float, default=5.0,
                   help="cap, in seconds, of the reconnect backoff to PostgreSQL and Redis")
    return p


def add_database(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or
                   DEFAULT_DATABASE_URL)


def add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)
    p.add_argument("--stream", default=os.environ.get("EVENTS_STREAM") or DEFAULT_STREAM,
                   help="Redis stream of submitted events (default: $EVENTS_STREAM, else "
                        f"{DEFAULT_STREAM})")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def setup_logging(name: str, level: str) -> None:
    # The supervisor timestamps and labels each line it drains; keep ours short.
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format=f"{name} %(levelname)s %(message)s")
    # httpx logs every request at INFO: the watchdog's polls would flood the journal.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# -- metrics ----------------------------------------------------------------------------------

class Families:
    """prometheus_client metrics on a given registry, minus their `_created` samples (the
    switch for those is process-global; see supervisor.observe.instrument)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._metrics: list[Any] = []
        registry.register(self)

    def add(self, metric: T) -> T:
        self._metrics.append(metric)
        return metric

    def describe(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield from metric.describe()

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


# -- dependencies -----------------------------------------------------------------------------

if sys.version_info >= (3, 12):
    bounded = asyncio.wait_for
else:
    async def bounded(aw: Awaitable[T], seconds: float) -> T:
        """`asyncio.wait_for` without its flaw before 3.12: when the awaited operation completes
        in the same loop iteration as a cancel of the caller, 3.11's wait_for returns the result
        and drops the cancel. A Link's run() then looped on, serve() waited for it forever, and
        the stand-in ignored SIGTERM until its stop_timeout's SIGKILL (1 stop in ~40 under load;
        7% of cancels with a fast ping). `asyncio.timeout` (3.11) awaits in place, so a cancel
        always lands; 3.10 keeps wait_for."""
        if sys.version_info < (3, 11):
            return await asyncio.wait_for(aw, seconds)
        async with asyncio.timeout(seconds):
            return await aw


class Unavailable(Exception):
    """A dependency is down; the caller degrades (503, not ready, retry later)."""


class Link(Generic[T]):
    """One dependency client, (re)connected in the background with capped exponential backoff.

    Users call `get()` (raises Unavailable while down) and `drop()` after an operation failed,
    which closes the client and lets `run()` reconnect. Nothing here ever exits the program.
    """

    def __init__(self, name: str, target: str, connect: Callable[[], Awaitable[T]],
                 close: Callable[[T], Awaitable[None]], ping: Callable[[T], Awaitable[Any]],
                 up: Gauge, *, timeout: float = 2.0, backoff_initial: float = 0.2,
                 backoff_max: float = 5.0, ping_interval: float = 1.0) -> None:
        self.name = name
        self.target = redact_url(target)
        self._secrets = url_secrets(target)
        self._connect, self._close, self._ping = connect, close, ping
        self._up = up.labels(name)
        self._up.set(0)
        self.timeout, self.backoff_initial, self.backoff_max = timeout, backoff_initial, backoff_max
        self.ping_interval = ping_interval
        self.client: T | None = None
        self.error: str | None = "not connected yet"
        self.connected = asyncio.Event()
        self._dropped = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Link {self.name} {self.target} up={self.client is not None}>"

    def describe(self, exc: BaseException) -> str:
        """Exception text safe for logs and HTTP bodies (no credentials)."""
        text = str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {redact_text(text, self._secrets)}"[:300]

    def get(self) -> T:
        if self.client is None:
            raise Unavailable(f"{self.name} unavailable")
        return self.client

    async def drop(self, exc: BaseException) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        self.error = self.describe(exc)
        logger.warning("dependency down name=%s target=%s error=%s", self.name, self.target,
                       self.error)
        self._up.set(0)
        self.connected.clear()
        self._dropped.set()
        await self._close_quietly(client)

    async def _close_quietly(self, client: T) -> None:
        try:
            await bounded(self._close(client), self.timeout)
        except Exception:  # closing a broken client may fail; it is gone either way
            logger.debug("close failed name=%s", self.name, exc_info=True)

    async def run(self) -> None:
        delay = self.backoff_initial
        failures = 0
        while True:
            if self.client is None:
                try:
                    client = await bounded(self._connect(), self.timeout)
                except Exception as exc:
                    failures += 1
                    self.error = self.describe(exc)
                    # Log the first failure and then every tenth: a long outage stays readable.
                    if failures == 1 or failures % 10 == 0:
                        logger.warning("connect failed name=%s target=%s attempt=%d error=%s "
                                       "retry_in=%.1fs", self.name, self.target, failures,
                                       self.error, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                logger.info("connected name=%s target=%s", self.name, self.target)
                self.client, self.error = client, None
                failures, delay = 0, self.backoff_initial
                self._up.set(1)
                self._dropped.clear()
                self.connected.set()
                continue
            try:
                await bounded(self._dropped.wait(), self.ping_interval)
                continue  # dropped by a user: reconnect at once
            except asyncio.TimeoutError:  # TimeoutError's alias on 3.11+, distinct on 3.10
                pass
            client = self.client
            if client is None:
                continue
            try:
                await bounded(self._ping(client), self.timeout)
            except Exception as exc:
                await self.drop(exc)

    async def aclose(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await self._close_quietly(client)


async def wait_connected(links: Sequence[Link[Any]], timeout: float) -> bool:
    """Wait (bounded) until every link is up; False on timeout."""
    try:
        await bounded(asyncio.gather(*(link.connected.wait() for link in links)),
                               timeout)
    except asyncio.TimeoutError:
        return False
    return True


def dependency_gauge(registry: CollectorRegistry) -> Gauge:
    families = Families(registry)
    return families.add(Gauge("standin_dependency_up", "1 while the stand-in holds a working "
                              "connection to the dependency.", ["dependency"], registry=None))


# -- HTTP -------------------------------------------------------------------------------------

class Reply:
    """Sends one complete response on an ASGI `send`."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._send = send

    async def body(self, status: int, body: bytes, content_type: str) -> None:
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type.encode()),
                                      (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body})

    async def json(self, status: int, document: Any) -> None:
        await self.body(status, json.dumps(document, default=str).encode() + b"\n",
                        "application/json")


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # `/v1/events/{id}`: the `endpoint` label
    handler: Handler

    @property
    def regex(self) -> re.Pattern[str]:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        return re.compile(f"^{pattern}$")


ROUTE_KEY = "standin.route"  # where the router leaves the matched template for the middleware


class Router:
    """A bare ASGI app: exact method+template routes, 404/405 otherwise, /metrics built in."""

    def __init__(self, routes: Sequence[Route], registry: CollectorRegistry) -> None:
        self.routes = [(route, route.regex) for route in routes]
        self.metrics_app = make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        path = scope["path"]
        if path == "/metrics" and scope["method"] in ("GET", "HEAD"):
            scope[ROUTE_KEY] = "/metrics"
            await self.metrics_app(scope, receive, send)
            return
        allowed = []
        for route, regex in self.routes:
            match = regex.match(path)
            if match is None:
                continue
            if route.method != scope["method"]:
                allowed.append(route)
                continue
            scope[ROUTE_KEY] = route.template
            scope["path_params"] = match.groupdict()
            await route.handler(scope, receive, Reply(send))
            return
        if allowed:
            scope[ROUTE_KEY] = allowed[0].template
            await Reply(send).json(405, {"error": "method not allowed"})
            return
        await Reply(send).json(404, {"error": "not found"})  # endpoint label: "other"


def instrumented(router: Router, registry: CollectorRegistry) -> MetricsMiddleware:
    return MetricsMiddleware(router, registry, route_resolver=lambda scope: scope.get(ROUTE_KEY))


def query(scope: Scope) -> Mapping[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def read_body(receive: Callable[[], Awaitable[Any]], limit: int = MAX_BODY) -> bytes:
    """The whole request body, or ValueError past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError("body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _unhealthy_on_demand() -> bool:
    """Whether the file named by STANDIN_UNHEALTHY_FILE exists (one stat: never blocks)."""
    path = os.environ.get("STANDIN_UNHEALTHY_FILE")
    return path is not None and path != "" and os.path.exists(path)


def health_routes(links: Sequence[Link[Any]],
                  extra: Callable[[], Mapping[str, Any]] | None = None) -> list[Route]:
    """`/v1/health` (alive: always 200 while serving) and `/v1/ready` (503 while a dependency
    is down)."""

    async def health(scope: Scope, receive: Any, reply: Reply) -> None:
        # A liveness failure on demand (to exercise the supervisor's liveness probe): while
        # the file named by STANDIN_UNHEALTHY_FILE exists, the process says it is not alive.
        if _unhealthy_on_demand():
            await reply.json(503, {"status": "unhealthy", "reason": "STANDIN_UNHEALTHY_FILE"})
            return
        await reply.json(200, {"status": "ok"})

    async def ready(scope: Scope, receive: Any, reply: Reply) -> None:
        deps = {link.name: {"up": link.client is not None, "error": link.error}
                for link in links}
        details = dict(extra()) if extra is not None else {}
        ok = all(d["up"] for d in deps.values()) and details.pop("ready", True)
        await reply.json(200 if ok else 503, {"ready": ok, "dependencies": deps, **details})

    return [Route("GET", "/v1/health", health), Route("GET", "/v1/ready", ready)]


# -- serving ----------------------------------------------------------------------------------

async def serve(app: Any, listen: str, workers: Sequence[Callable[[], Awaitable[None]]],
                closers: Sequence[Callable[[], Awaitable[None]]] = ()) -> int:
    """Serve `app` and run `workers` until SIGTERM or SIGINT; then stop and return 0.

    uvicorn catches SIGTERM itself and, since 0.29, re-raises it once it has shut down, which
    would kill us with the signal. Our own handler, installed first, is the one uvicorn
    restores and re-raises into, so the process exits 0.
    """
    host, port = split_listen(listen)
    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    def on_signal(signum: int, frame: Any) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    tasks = [asyncio.create_task(worker()) for worker in workers]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for close in closers:
            try:
                await bounded(close(), 3)
            except Exception:
                logger.debug("close failed", exc_info=True)
    if not server.started:
        logger.error("could not serve on %s", listen)
        return 1
    logger.info("stopped")
    return 0


def main(run: Callable[[], Awaitable[int]]) -> None:
    sys.exit(asyncio.run(run()))
