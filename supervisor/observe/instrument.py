"""Request latency and error metrics for HTTP services: ASGI middleware and a WSGI wrapper.

A service imports this module, builds its own `CollectorRegistry`, wraps its app and serves that
registry on its metrics endpoint. Recorded families (all labels bounded):

- `http_request_duration_seconds{method,endpoint,status}`: histogram, buckets `DURATION_BUCKETS`
  (1 ms to 10 s) unless `buckets=` says otherwise;
- `http_requests_total{method,endpoint,status}`;
- `http_requests_failed_total{method,endpoint,status,error_type}` for every status >= 400.

Label bounds. `endpoint` is a route template, never the raw path: Starlette/FastAPI's matched
route (`scope["route"]`, prefixed by the templates of enclosing Mounts), else what
`route_resolver(scope)` returns, else `OTHER`. Distinct endpoint values are capped at
`max_endpoints` (later new values become `OTHER`) so even a careless resolver cannot explode
cardinality. `method` is one of `METHODS` or `other`; `status` is the 3-digit code sent;
`error_type` is one of `ERROR_TYPES`.

Outcomes. A request is recorded exactly once, when its last body chunk has been handed to the
server (so streaming responses and anything the app does before it finishes count), or when the
app returns or raises. An exception before the response started counts as status 500
(`exception`, or `timeout` for TimeoutError) and propagates. A client that disconnects before the
response completes counts as status 499 (`client_disconnect`, nginx's convention) - also when
that surfaces as an exception (e.g. Starlette's ClientDisconnect); a different exception raised
after the response started counts as 500 `exception`. An exception that follows a complete
5xx answer (Starlette's ServerErrorMiddleware sends its 500 page, then re-raises: the case
when this middleware wraps a Starlette or FastAPI app from outside) labels that answer
`exception` or `timeout` too; one that follows a complete non-5xx answer (a failed background
task) leaves the status the client got.

`_created` series: prometheus_client's switch (`disable_created_metrics()`) is process-global,
so instead the metrics are built unregistered and `HttpMetrics` - the collector registered on
the given registry - drops their `_created` samples. Nothing here touches global state.
Recording takes only prometheus_client's per-value locks (microseconds, never I/O).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

# 1 ms to 10 s: fast services answer in well under 10 ms, where the first bucket used to be,
# and a quantile interpolated inside one wide bucket says nothing (p50 5 ms for 0.7 ms).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                     "TRACE"})
ERROR_TYPES = ("client_error", "not_found", "timeout", "client_disconnect", "server_error",
               "exception")
OTHER = "other"
CLIENT_CLOSED = 499  # nginx's "client closed request": no status reached the client
DEFAULT_MAX_ENDPOINTS = 200

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def error_type_of(status: int) -> str | None:
    """The `error_type` label for a status, or None when it is not a failure."""
    if status < 400:
        return None
    if status == 404:
        return "not_found"
    if status in (408, 504):
        return "timeout"
    if status == CLIENT_CLOSED:
        return "client_disconnect"
    return "client_error" if status < 500 else "server_error"


class HttpMetrics:
    """The three request families on one registry; a collector, so it owns its exposition."""

    def __init__(self, registry: CollectorRegistry,
                 max_endpoints: int = DEFAULT_MAX_ENDPOINTS, *,
                 buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        labels = ("method", "endpoint", "status")
        # registry=None: these objects are read only through collect() below.
        self._duration = Histogram("http_request_duration_seconds",
                                   "Time from request start to the last response byte handed "
                                   "to the server.", labels, buckets=checked_buckets(buckets),
                                   registry=None)
        self._total = Counter("http_requests", "HTTP requests completed.", labels, registry=None)
        self._failed = Counter("http_requests_failed",
                               "HTTP requests that ended with a 4xx or 5xx status.",
                               labels + ("error_type",), registry=None)
        self._max_endpoints = max_endpoints
        self._endpoints: set[str] = {OTHER}
        self._lock = threading.Lock()  # guards _endpoints: ASGI loop and WSGI threads share us
        registry.register(self)

    def endpoint_label(self, endpoint: str | None) -> str:
        if not endpoint:
            return OTHER
        if endpoint in self._endpoints:  # set membership is atomic; the lock is for growth
            return endpoint
        with self._lock:
            if len(self._endpoints) >= self._max_endpoints + 1:
                return OTHER
            self._endpoints.add(endpoint)
        return endpoint

    def observe(self, method: str, endpoint: str | None, status: int, seconds: float,
                error_type: str | None = None) -> None:
        method_label = method.upper() if method.upper() in METHODS else OTHER
        endpoint_label = self.endpoint_label(endpoint)
        status_label = str(status) if 100 <= status <= 999 else OTHER
        self._duration.labels(method_label, endpoint_label, status_label).observe(max(0.0, seconds))
        self._total.labels(method_label, endpoint_label, status_label).inc()
        error = error_type or error_type_of(status)
        if error is not None:
            self._failed.labels(method_label, endpoint_label, status_label, error).inc()

    def describe(self) -> Iterable[Metric]:
        # Lets the registry detect name clashes at register() time.
        for metric in (self._duration, self._total, self._failed):
            yield from metric.describe()

    def collect(self) -> Iterator[Metric]:
        for metric in (self._duration, self._total, self._failed):
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


def checked_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    """Histogram upper bounds: finite, positive, strictly increasing (+Inf is added)."""
    try:
        bounds = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise ValueError(f"buckets must be numbers, got {buckets!r}") from None
    if not bounds or not all(math.isfinite(b) and b > 0 for b in bounds) or any(
            a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"buckets must be finite, positive and increasing, got {bounds!r}")
    return bounds


def _metrics_for(registry: CollectorRegistry | HttpMetrics, max_endpoints: int,
                 buckets: Sequence[float]) -> HttpMetrics:
    if isinstance(registry, HttpMetrics):
        return registry
    return HttpMetrics(registry, max_endpoints, buckets=buckets)


def starlette_endpoint(scope: Scope, entry_root_path: str = "") -> str | None:
    """The full route template Starlette matched, or None (no route matched, or not Starlette).

    Starlette's Router stores the matched route in `scope["route"]`; inside a Mount that is
    the inner route, whose template is relative, so enclosing Mount templates are prepended by
    walking the top router again (only when `root_path` shows a Mount was entered).
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return None
    if scope.get("root_path", "") == entry_root_path:
        return template
    prefix = _mount_prefix(scope.get("router"), scope.get("path", ""), entry_root_path, route)
    return None if prefix is None else prefix + template


def _mount_prefix(router: Any, path: str, entry_root_path: str, leaf: Any) -> str | None:
    remaining = path[len(entry_root_path):] if path.startswith(entry_root_path) else path
    routes = getattr(router, "routes", None)
    prefix: str = ""
    for _depth in range(16):  # bounded: mounts nest only a few levels in practice
        if not routes:
            return None
        for candidate in routes:
            if candidate is leaf:
                return prefix
            mount_path = getattr(candidate, "path", None)
            regex = getattr(candidate, "path_regex", None)
            if not hasattr(candidate, "routes") or regex is None or mount_path is None:
                continue
            match = regex.match(remaining)
            if match and "path" in match.groupdict():
                prefix += str(mount_path)
                remaining = "/" + match.group("path")
                routes = candidate.routes
                break
        else:
            return None
        if leaf in routes:
            return prefix
    return None


class MetricsMiddleware:
    """Pure ASGI middleware; works under any ASGI server and with any ASGI framework.

    `registry` may be a CollectorRegistry (the families are registered on it) or an existing
    `HttpMetrics`, so an ASGI app and a WSGI app can share one set of families. `buckets`
    (seconds) applies when the families are built here.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry | HttpMetrics,
                 route_resolver: Callable[[Scope], str | None] | None = None, *,
                 max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
                 buckets: Sequence[float] = DURATION_BUCKETS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.app = app
        self.metrics = _metrics_for(registry, max_endpoints, buckets)
        self.route_resolver = route_resolver
        self.clock = clock

    def endpoint(self, scope: Scope, entry_root_path: str) -> str | None:
        try:
            found = starlette_endpoint(scope, entry_root_path)
            if found is None and self.route_resolver is not None:
                found = self.route_resolver(scope)
        except Exception:  # a broken resolver must not fail the request it measures
            logger.exception("route resolver failed")
            return None
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        entry_root_path = scope.get("root_path", "")
        state: dict[str, Any] = {"status": None, "done": False, "disconnected": False,
                                 "completed": None}

        def record(status: int, error_type: str | None = None,
                   seconds: float | None = None) -> None:
            if state["done"]:
                return
            state["done"] = True
            took = self.clock() - start if seconds is None else seconds
            self.metrics.observe(scope.get("method", ""), self.endpoint(scope, entry_root_path),
                                 status, took, error_type)

        async def receive_wrapper() -> Message:
            message: Message = await receive()
            if message.get("type") == "http.disconnect" and state["completed"] is None:
                state["disconnected"] = True
            return message

        async def send_wrapper(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                state["status"] = int(message["status"])
            try:
                await send(message)
            except OSError:
                # ASGI 2.4: send() raises OSError once the client has gone.
                state["disconnected"] = True
                raise
            if ((kind == "http.response.body" and not message.get("more_body", False))
                    or kind == "http.response.pathsend"):
                # Timed now; recorded when the app returns or raises, since an exception
                # that follows an error page (Starlette's ServerErrorMiddleware sends its 500,
                # then re-raises) is what that 500 was about.
                state["completed"] = (state["status"] or 500, self.clock() - start)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            completed = state["completed"]
            if completed is not None:
                status, took = completed
                if status >= 500 and isinstance(exc, Exception):
                    record(status, _exception_type(exc), took)
                else:  # the client got its whole answer; a later failure does not change it
                    record(status, None, took)
            elif state["disconnected"]:
                record(CLIENT_CLOSED)
            elif isinstance(exc, Exception):
                record(500, _exception_type(exc))
            else:
                # Cancellation (server shutdown): nothing was answered; not the app's error.
                record(CLIENT_CLOSED)
            raise
        if state["completed"] is not None:
            record(state["completed"][0], None, state["completed"][1])
        elif state["disconnected"]:
            record(CLIENT_CLOSED)
        elif state["status"] is None:
            record(500, "server_error")  # the server answers 500 for an app that sent nothing
        else:
            record(state["status"])


def _exception_type(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else "exception"


# -- WSGI ---------------------------------------------------------------------------------------

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def instrument_wsgi(app: WSGIApp, registry: CollectorRegistry | HttpMetrics,
                    endpoint_of: Callable[[Mapping[str, Any]], str | None], *,
                    max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
                    buckets: Sequence[float] = DURATION_BUCKETS,
                    clock: Callable[[], float] = time.perf_counter) -> WSGIApp:
    """Wrap a WSGI app; a request is recorded when the server closes the response iterable."""
    metrics = _metrics_for(registry, max_endpoints, buckets)

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start = clock()
        status: list[int] = []
        method = str(environ.get("REQUEST_METHOD", ""))

        def endpoint() -> str | None:
            try:
                return endpoint_of(environ)
            except Exception:
                logger.exception("endpoint_of failed")
                return None

        def start_response_wrapper(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            try:
                status.append(int(status_line.split(" ", 1)[0]))
            except ValueError:
                status.append(500)
            return start_response(status_line, headers, exc_info)

        try:
            body = app(environ, start_response_wrapper)
        except Exception as exc:
            metrics.observe(method, endpoint(), 500, clock() - start,
                            "timeout" if isinstance(exc, TimeoutError) else "exception")
            raise
        return _TimedBody(body, lambda code, error: metrics.observe(
            method, endpoint(), code if code is not None else (status[-1] if status else 500),
            clock() - start, error))

    return wrapped


class _TimedBody:
    """Response iterable that records once, on close() (PEP 3333: servers always call it)."""

    def __init__(self, body: Iterable[bytes],
                 record: Callable[[int | None, str | None], None]) -> None:
        self._body = body
        self._record = record
        self._failed: tuple[int, str] | None = None
        self._complete = False
        self._recorded = False

    def __len__(self) -> int:
        # wsgiref sets Content-Length for a one-block body it can len(); a generator body
        # raises TypeError here, which wsgiref expects.
        return len(self._body)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except Exception as exc:
            self._failed = (500, "timeout" if isinstance(exc, TimeoutError) else "exception")
            raise
        self._complete = True

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if not self._recorded:
                self._recorded = True
                if self._failed is not None:
                    self._record(*self._failed)
                elif not self._complete:
                    # Closed before the body was all sent: the server failed to write, which
                    # means the client went away.
                    self._record(CLIENT_CLOSED, "client_disconnect")
                else:
                    self._record(None, None)
