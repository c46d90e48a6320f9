"""The caching renderer writes exactly what merging every family and encoding the result would
(tests/merge_oracle.py, a plain uncached merge), in both exposition formats, and reuses a
source's text only as its cache policy allows."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from supervisor.config import DEFAULT_DENY_METRICS
from supervisor.observe.denylist import DenyList
from supervisor.observe.families import parse_exposition, relabel
from supervisor.observe.render import CachingRenderer, Source, Ticker, always, clocked, keyed
from tests.merge_oracle import merge_families
from tests.support import promtool_ok

TEXT = "text/plain;version=0.0.4"
OPENMETRICS = "application/openmetrics-text;version=1.0.0"

CHILD = """\
# HELP http_requests Requests.
# TYPE http_requests counter
http_requests_total{route="/a"} 3
http_requests_total{route="/b"} 4
# TYPE queue_depth gauge
queue_depth{queue="q1"} 2
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.1"} 1
latency_seconds_bucket{le="+Inf"} 2
latency_seconds_sum 0.3
latency_seconds_count 2
# TYPE halt_state gauge
halt_state 1
# TYPE odd_label gauge
odd_label{service="inner",path="a\\\\b\\"c\\nd"} 5
"""

# A child that clashes with the first: another type for queue_depth, a gauge named like the
# histogram's _count series, and the first child's own series again (a duplicate).
CLASH = """\
# TYPE queue_depth counter
queue_depth_total 1
# TYPE latency_seconds_count gauge
latency_seconds_count 9
# HELP extra Extra.
# TYPE extra gauge
extra 1
extra 1
"""


class Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def own_registry(kind: str = "x") -> CollectorRegistry:
    """prometheus_client's own metrics: counters and histograms with `_created` series."""
    registry = CollectorRegistry()
    Counter("own_events", "Events.", ["kind"], registry=registry).labels(kind).inc(2)
    Histogram("own_latency_seconds", "Own latency.", registry=registry).observe(0.2)
    return registry


def sources(own: CollectorRegistry, children: dict[str, str]) -> list[Source]:
    parsed = {name: tuple(parse_exposition(text)) for name, text in children.items()}
    more = own_registry("y")  # the same families, another service: one block of _created
    out = [always("own", lambda: relabel(own.collect(), "supervisor", "prod")),
           always("more", lambda: relabel(more.collect(), "sidecar", "prod"))]
    for name, families in parsed.items():
        out.append(keyed("service:" + name,
                         lambda f=families, n=name: relabel(f, n, "prod"),  # type: ignore[misc]
                         families))
    # A second, uncached copy of api's families: every series is a duplicate of api's.
    api = parsed["api"]
    out.append(always("again", lambda: relabel(api, "api", "prod")))
    return out


def reference(srcs: list[Source], accept: str, deny: DenyList,
              names: tuple[str, ...] = ()) -> bytes:
    encoder, _ = choose_encoder(accept)
    merged = merge_families([list(s.families()) for s in srcs], deny)
    if names:
        merged = [f for f in merged
                  if f.name in names or any(s.name in names for s in f.samples)]
    return encoder(Families(merged))


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
@pytest.mark.parametrize("names", [(), ("queue_depth", "own_events_total", "latency_seconds")])
def test_output_is_exactly_the_merged_encoding(accept: str, names: tuple[str, ...]) -> None:
    own = own_registry()
    srcs = sources(own, {"api": CHILD, "writer": CHILD, "clash": CLASH})
    deny = DenyList(DEFAULT_DENY_METRICS)
    renderer = CachingRenderer(lambda: srcs, lambda: deny)
    encoder, content_type = choose_encoder(accept)
    expected = reference(srcs, accept, deny, names)
    for _ in range(2):  # cold, then from cache
        assert renderer.render(encoder, content_type, names) == expected
    text = expected.decode()
    if not names:
        assert "halt_state" not in text  # FR52: the deny-list still applies
        assert 'latency_seconds_count{environment="prod",service="clash"}' not in text
        if accept == TEXT:
            promtool_ok(text)


def test_a_source_is_rebuilt_only_when_its_key_changes() -> None:
    own = own_registry()
    children = {"api": CHILD, "writer": CHILD}
    srcs = sources(own, children)
    renderer = CachingRenderer(lambda: srcs, DenyList)
    encoder, content_type = choose_encoder(TEXT)
    renderer.render(encoder, content_type)
    first = renderer.prepared
    assert first == len(srcs)
    renderer.render(encoder, content_type)
    # Only the three unkeyed sources were prepared again.
    assert renderer.prepared - first == 3
    # writer scraped again: a new payload object, so its families are rebuilt and re-encoded.
    new_writer = tuple(parse_exposition(CHILD.replace("queue_depth{queue=\"q1\"} 2",
                                                      "queue_depth{queue=\"q1\"} 7")))
    srcs[3] = keyed("service:writer", lambda: relabel(new_writer, "writer", "prod"), new_writer)
    before = renderer.prepared
    body = renderer.render(encoder, content_type).decode()
    assert renderer.prepared - before == 4
    assert 'queue_depth{environment="prod",queue="q1",service="writer"} 7.0' in body
    assert 'queue_depth{environment="prod",queue="q1",service="api"} 2.0' in body


def test_changing_values_of_unkeyed_sources_show_at_once() -> None:
    own = own_registry()
    srcs = sources(own, {"api": CHILD})
    renderer = CachingRenderer(lambda: srcs, DenyList)
    encoder, content_type = choose_encoder(TEXT)
    assert 'own_events_total{environment="prod",kind="x",service="supervisor"} 2.0' in \
        renderer.render(encoder, content_type).decode()
    own_counter = own._names_to_collectors["own_events"]
    own_counter.labels("x").inc()  # type: ignore[attr-defined]
    assert 'own_events_total{environment="prod",kind="x",service="supervisor"} 3.0' in \
        renderer.render(encoder, content_type).decode()


def test_a_clock_keyed_source_is_rebuilt_once_per_tick() -> None:
    ticker = Ticker(0.25)
    clock = [100.0]
    builds: list[float] = []

    def uptime(now: float) -> list[Metric]:
        builds.append(now)
        metric = Metric("uptime_seconds", "Uptime.", "gauge")
        metric.add_sample("uptime_seconds", {"service": "api"}, now - 40.0)
        return [metric]

    renderer = CachingRenderer(lambda: [clocked("live", uptime)], DenyList, clock=ticker,
                               monotonic=lambda: clock[0])
    encoder, content_type = choose_encoder(TEXT)
    for now in (100.0, 100.1, 100.2):  # one tick: one build, the first value
        clock[0] = now
        assert b'uptime_seconds{service="api"} 60.0' in renderer.render(encoder, content_type)
    clock[0] = 100.3  # the next tick shows the clock's value at once
    assert b'uptime_seconds{service="api"} 60.3' in renderer.render(encoder, content_type)
    assert builds == [100.0, 100.3]


def test_a_changed_help_text_is_written_for_the_family() -> None:
    docs = ["First help."]

    def family() -> list[Metric]:
        metric = Metric("queue_depth", docs[0], "gauge")
        metric.add_sample("queue_depth", {"service": "api"}, 1.0)
        return [metric]

    renderer = CachingRenderer(lambda: [always("api", family)], DenyList)
    for accept in (TEXT, OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        docs[0] = "First help."
        assert b"# HELP queue_depth First help.\n" in renderer.render(encoder, content_type)
        docs[0] = "Second help."
        assert b"# HELP queue_depth Second help.\n" in renderer.render(encoder, content_type)
