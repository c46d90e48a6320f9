"""Parsing, relabelling, and the merge /v1/metrics serves (through render.CachingRenderer, the
only one): one family per name, conflicts, the deny-list, promtool."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import DEFAULT_DENY_METRICS
from supervisor.observe.denylist import DenyList
from supervisor.observe.families import (
    NO_HELP,
    ExpositionError,
    SeriesLimitExceeded,
    parse_exposition,
    relabel,
)
from supervisor.observe.instrument import HttpMetrics
from tests.support import promtool_ok, served

CONSTITUTIONAL = """\
# HELP constitutional_breach_count Breaches.
# TYPE constitutional_breach_count gauge
constitutional_breach_count 3
# TYPE halt_state gauge
halt_state 1
# TYPE dissent_health_ratio gauge
dissent_health_ratio 0.5
# TYPE witness_coverage_percent gauge
witness_coverage_percent 99
# TYPE override_frequency gauge
override_frequency 2
# TYPE foo_breach_count_total counter
foo_breach_count_total 7
# TYPE my_halt_state_seconds histogram
my_halt_state_seconds_bucket{le="1.0"} 1
my_halt_state_seconds_bucket{le="+Inf"} 1
my_halt_state_seconds_sum 0.5
my_halt_state_seconds_count 1
# HELP queue_depth Jobs waiting.
# TYPE queue_depth gauge
queue_depth 4
"""


class Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def render(families: Iterable[Metric]) -> str:
    registry = CollectorRegistry()
    registry.register(Families(families))
    return generate_latest(registry).decode()




def child_text(requests: int, service_label: str | None = None) -> str:
    """What a real service on the instrumentation module exposes."""
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    for i in range(requests):
        metrics.observe("GET", "/v1/events/{id}", 200, 0.02 * (i + 1))
    metrics.observe("GET", "/v1/events/{id}", 404, 0.003)
    if service_label is not None:
        Gauge("jobs", "Jobs by owner.", ["service"], registry=registry).labels(
            service_label).set(2)
    return generate_latest(registry).decode()


def test_deny_list_globs_and_suffixes() -> None:
    deny = DenyList(DEFAULT_DENY_METRICS)
    for name in ("constitutional_breach_count", "halt_state", "halt_state_total",
                 "dissent_health_ratio", "witness_coverage_percent_bucket",
                 "override_frequency_created", "foo_breach_count_total", "x_halt_state_y",
                 "my_dissent_health_count"):
        assert deny.denies(name), name
    for name in ("http_requests_total", "queue_depth", "halt", "breach", "state_halt"):
        assert not deny.denies(name), name
    # Every text is normalised (case, separators) and an entry matches anywhere in it.
    for name in ("HALT_STATE", "halt:state", "halt__state", "haltstate", "Halt-State",
                 "U__halt__state", "constitutional_breaches_total", "x_Constitutional"):
        assert deny.denies(name), name
    custom = DenyList(("secret_*", "exact_name"))
    assert custom.denies("secret_sauce_total") and custom.denies("exact_name_sum")
    assert not custom.denies("exact_name_other") and not custom.denies("my_secret")
    # ... but case and separators never matter.
    assert custom.denies("Secret_x") and custom.denies("EXACT:NAME_total")
    assert custom.denies("exact__name") and not custom.denies("exact")
    # Unit suffixes fall away on both sides: an entry's and a text's.
    assert DenyList(("dissent_health_ratio",)).denies("Dissent:Health")
    assert DenyList(("dissent_health",)).denies("dissent_health_ratio_total")
    assert not DenyList(()).denies("halt_state")
    assert "halt_state" in repr(deny)


def test_parse_rejects_garbage_and_cuts_absurd_payloads_whole() -> None:
    families = parse_exposition(child_text(2), max_series=100)
    assert {f.name for f in families} == {"http_request_duration_seconds", "http_requests",
                                          "http_requests_failed"}
    for garbage in ("<html><body>Not Found</body></html>", "hello world", "{{{"):
        with pytest.raises(ExpositionError, match="not metrics text"):
            parse_exposition(garbage, 100)
    huge = "".join(f'# TYPE g{i} gauge\ng{i}{{a="{j}"}} 1\n' for i in range(30) for j in range(1))
    assert len(parse_exposition(huge, 30)) == 30
    with pytest.raises(SeriesLimitExceeded) as caught:
        parse_exposition(huge, 29)
    assert caught.value.seen == 30 and caught.value.limit == 29
    # Names promtool and older Prometheus reject are skipped, not fatal.
    assert [f.name for f in parse_exposition('{"my.metric"} 1\nok_metric 2\n', 10)] == [
        "ok_metric"]
    assert parse_exposition("", 10) == []


def test_relabel_keeps_childs_own_labels_as_exported() -> None:
    families = parse_exposition(
        '# TYPE jobs gauge\njobs{service="billing",exported_service="x",environment="e"} 1\n'
        'jobs{queue="a"} 2\n', 10)
    (out,) = relabel(families, "api", "production")
    # As Prometheus does: the child's `service` moves to the first free exported_ name.
    assert out.samples[0].labels == {"exported_exported_service": "billing",
                                     "exported_service": "x",
                                     "exported_environment": "e",
                                     "service": "api", "environment": "production"}
    assert out.samples[1].labels == {"queue": "a", "service": "api",
                                     "environment": "production"}
    assert families[0].samples[0].labels["service"] == "billing"  # input untouched


def test_same_family_from_many_sources_is_one_family_and_histograms_stay_histograms() -> None:
    api = relabel(parse_exposition(child_text(3, "billing"), 1000), "api", "prod")
    writer = relabel(parse_exposition(child_text(1), 1000), "event-writer", "prod")
    own = relabel(parse_exposition(child_text(2), 1000), "supervisor", "prod")
    text, _ = served([own, api, writer], DenyList())
    merged = list(text_string_to_metric_families(text))
    names = [f.name for f in merged]
    assert len(names) == len(set(names))
    hist = next(f for f in merged if f.name == "http_request_duration_seconds")
    assert hist.type == "histogram"
    services = {s.labels["service"] for s in hist.samples}
    assert services == {"api", "event-writer", "supervisor"}

    assert text.count("# TYPE http_request_duration_seconds histogram") == 1
    assert text.count("# HELP http_request_duration_seconds ") == 1
    assert text.count("# TYPE http_requests_total counter") == 1
    assert ('http_request_duration_seconds_bucket{endpoint="/v1/events/{id}",environment="prod",'
            'le="0.05",method="GET",service="api",status="200"} 2.0') in text
    assert 'jobs{environment="prod",exported_service="billing",service="api"} 2.0' in text
    promtool_ok(text)


def test_conflicts_first_type_wins_and_clashing_series_names_are_dropped() -> None:
    first = parse_exposition("# HELP temp T.\n# TYPE temp gauge\ntemp 1\n"
                             "# HELP lat L.\n# TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 1\n"
                             "lat_sum 1\nlat_count 1\n", 100)
    second = parse_exposition("# HELP temp_total T2.\n# TYPE temp_total counter\ntemp_total 5\n"
                              "# HELP lat_count C.\n# TYPE lat_count gauge\nlat_count{x=\"1\"} 9\n"
                              "# TYPE fresh gauge\nfresh 1\n", 100)
    text, clashes = served([relabel(first, "a", "e"), relabel(second, "b", "e")], DenyList())
    families = list(text_string_to_metric_families(text))
    kinds = {f.name: f.type for f in families}
    assert kinds == {"temp": "gauge", "lat": "histogram", "fresh": "gauge"}
    # another type for temp; lat_count would collide with the histogram's series
    assert sorted(clashes) == [("s1", "lat_count"), ("s1", "temp")]
    temp = next(f for f in families if f.name == "temp")
    assert [s.labels["service"] for s in temp.samples] == ["a"]
    # A source without HELP gets a placeholder, so promtool's lint stays quiet.
    fresh = next(f for f in families if f.name == "fresh")
    assert fresh.documentation == NO_HELP
    promtool_ok(text)


def test_duplicate_series_keep_the_first() -> None:
    a = parse_exposition("# TYPE up2 gauge\nup2{x=\"1\"} 1\n", 10)
    b = parse_exposition("# TYPE up2 gauge\nup2{x=\"1\"} 0\nup2{x=\"2\"} 0\n", 10)
    text, _ = served([a, b], DenyList())
    (family,) = text_string_to_metric_families(text)
    assert [(s.labels["x"], s.value) for s in family.samples] == [("1", 1), ("2", 0)]


def test_fr52_constitutional_metrics_never_leave() -> None:
    registry = CollectorRegistry()
    Counter("override_frequency", "Own metric the daemon must not leak either.",
            registry=registry).inc()
    Histogram("ok_seconds", "Fine.", registry=registry).observe(1)
    own = [f for f in registry.collect()]
    child = relabel(parse_exposition(CONSTITUTIONAL, 100), "api", "prod")
    text, _ = served([own, child], DenyList(DEFAULT_DENY_METRICS))
    for banned in ("constitutional_breach_count", "halt_state", "dissent_health",
                   "witness_coverage", "override_frequency", "breach_count"):
        assert banned not in text
    assert 'queue_depth{environment="prod",service="api"} 4.0' in text
    assert "ok_seconds_bucket" in text
    assert {f.name for f in text_string_to_metric_families(text)} == {
        "queue_depth", "ok_seconds", "ok_seconds_created"}
    promtool_ok(text)


def test_operator_patterns_extend_the_defaults() -> None:
    child = parse_exposition(CONSTITUTIONAL, 100)
    deny = DenyList(DEFAULT_DENY_METRICS + ("queue_*",))
    assert served([child], deny)[0] == ""
