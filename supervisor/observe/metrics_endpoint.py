"""/v1/metrics as a WSGI app whose concurrent requests share one render.

Rendering merges every child's families (render.CachingRenderer; tens of milliseconds at 200
services of 50 series each). Twenty scrapers arriving together used to render twenty times
over, competing for the GIL on two cores (p99 about 7 s). Here a request that arrives while an
identical render is in flight waits for it and takes its bytes, so a reader never sees data older
than its own arrival minus one render.

A finished body is also reused by later requests while the `version()` token is the same
objects (render.same_objects, the rule the per-source caches use too): metrics.Catalogue.version
makes it from the clock tick (0.1 s) and from everything whose change an operator acts on at
once (the services' lifecycle snapshots, resource stats, readiness, the loaded config). So a
restart or a readiness change shows in the very next scrape, while the values that move all
the time (uptimes, scraped payloads, which are up to a scrape interval old anyway, the daemon's
own request counters) are at most one tick old. Under 20 concurrent scrapers at 200 services
that took rendering from about 70 to at most 10 times a second.
Only unfiltered bodies are kept (one per format and encoding), so memory stays bounded.
Format negotiation and gzip are prometheus_client's (`choose_encoder`, `gzip_accepted`).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted

from supervisor.observe.render import same_objects

Key = tuple[str, bool, tuple[str, ...]]
# (encoder, content type, ?name[] filter) -> body; see render.CachingRenderer.render
Render = Callable[[Callable[[Any], bytes], str, tuple[str, ...]], bytes]


Version = Callable[[], tuple[object, ...]]


class SharedRenderMetricsApp:
    def __init__(self, render: Render, version: Version | None = None) -> None:
        self.render = render
        self.version = version
        self._lock = threading.Lock()
        self._inflight: dict[Key, Future[bytes]] = {}
        self._recent: dict[Key, tuple[tuple[object, ...], bytes]] = {}
        self.renders = 0  # how many times the body was actually built (for tests and benches)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        compress = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        names = tuple(sorted(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", [])))
        body = self._shared((content_type, compress, names), encoder)
        # The body depends on both negotiations: caches must key on them.
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Vary", "Accept, Accept-Encoding")]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    def _shared(self, key: Key, encoder: Callable[[Any], bytes]) -> bytes:
        # Taken before rendering: the body kept with it is at least as new as the token.
        version = self.version() if self.version is not None and not key[2] else None
        if version is not None:
            recent = self._recent.get(key)
            if recent is not None and same_objects(recent[0], version):
                return recent[1]
        with self._lock:
            future = self._inflight.get(key)
            owner = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if not owner:
            return future.result()
        try:
            body = self.render(encoder, key[0], key[2])
            if key[1]:
                body = gzip.compress(body, compresslevel=6)
            self.renders += 1
            if version is not None:
                self._recent[key] = (version, body)
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._inflight[key]
