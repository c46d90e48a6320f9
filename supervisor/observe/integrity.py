"""What of a service's scraped families may reach /v1/metrics, and a record of what did not.

`screen` runs once per scraped payload (in the scraper's worker thread, right after parsing),
never per render. A family is dropped whole, with one reason:

- `denied`: the FR52 guard matches it (supervisor/observe/denylist.py);
- `reserved`: it would impersonate a series of Prometheus (`up`, `scrape_*`, `ALERTS`) or of
  the daemon (`service_*`, `dependency_*`, `config_*`, and every name the daemon's own family
  builders expose, derived from those builders rather than listed twice);
- `not_allowed`: strict mode (`allow_metrics`) is on and no glob matches it;
- `invalid`: names Prometheus 2.x would refuse, names with `:` (reserved for recording rules;
  OpenMetrics rewrites them), samples our writers cannot write, or a family that, written as
  OpenMetrics, its strict parser refuses (a histogram without `+Inf`, buckets out of order, a
  count that disagrees with `+Inf`, `le` on `_count`, a negative or NaN counter, samples of one
  series split apart...): the text format's parser takes all of that, so only the round trip
  through prometheus_client's own OpenMetrics writer and parser shows it;
- `limit` (the scraper: a payload over the series or size limit) and `type_clash` (the
  renderer: another source already owns the name with another type or colliding series).

`DropLedger` counts drops per service and reason for `service_scrape_dropped_families_total`
and logs one WARNING per (service, family, reason) the first time, with a bounded memory.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from supervisor.observe.denylist import DenyList, exposed_names
from supervisor.observe.families import Collected
from supervisor.observe.lint import lint_problem

logger = logging.getLogger(__name__)

REASONS = ("denied", "not_allowed", "reserved", "type_clash", "invalid", "limit")
# Prometheus' own series (`up`, `scrape_*`, the alert state it writes) and the daemon's name
# spaces. (Recorded series, `level:metric:operation`, hold colons: those are `invalid`.)
RESERVED_NAMES = frozenset({"up", "alerts", "alerts_for_state"})
RESERVED_PREFIXES = ("scrape_", "service_", "dependency_", "config_")
DROPPED_FAMILY = "service_scrape_dropped_families"
LOG_LIMIT = 1000  # distinct (family, reason) pairs remembered per service for the WARNING lines


# OpenMetrics types the text format writes as another (info `x` as the gauge `x_info`).
# An untyped family becomes a gauge where promtool would accept it as one (the series are the
# same); otherwise it stays `unknown`, which OpenMetrics writes as such and text as `untyped`.
_AS_TEXT = {"info": "gauge", "stateset": "gauge"}


class Drop(NamedTuple):
    family: str
    reason: str
    families: int = 1  # families this drop stands for (a payload cut at the limit: all it had)


def _stored(name: str) -> str:
    """A series name as Prometheus stores it from either of our formats (OpenMetrics writes
    `:` as `_`), case-folded for the comparison."""
    return name.replace(":", "_").casefold()


@functools.cache
def daemon_names() -> frozenset[str]:
    """Every series name the daemon's own families expose, from the builders themselves."""
    from supervisor.checks.readiness import ReadinessSnapshot, collect_families
    from supervisor.observe.metrics import (
        MetricsView,
        config_families,
        live_service_families,
        resource_families,
        service_families,
    )
    from supervisor.observe.scraper import scrape_families

    view = MetricsView("environment", {})
    families = [*service_families(view), *resource_families(view),
                *live_service_families(view, 0.0), *config_families(view),
                *collect_families(ReadinessSnapshot({}, {}), "environment"),
                *scrape_families({}, "environment"), *drop_families({}, "environment")]
    return frozenset(_stored(n) for f in families for n in exposed_names(f))


def is_reserved(family: Metric, names: Iterable[str] | None = None) -> bool:
    own = daemon_names()
    for name in exposed_names(family) if names is None else names:
        stored = _stored(name)
        if stored in RESERVED_NAMES or stored in own or stored.startswith(RESERVED_PREFIXES):
            return True
    return False


@dataclass(frozen=True)
class Policy:
    """How one service's families are screened; compared by value (a changed policy on reload
    restarts that service's scrape loop)."""

    deny: DenyList = field(default_factory=DenyList)
    allow: tuple[str, ...] | None = None  # None: any family (not strict)
    _allow_regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.allow is not None:
            joined = "|".join(f"(?:{fnmatch.translate(g)})" for g in self.allow) or r"(?!)"
            object.__setattr__(self, "_allow_regex", re.compile(joined))

    def allows(self, family: Metric, names: Iterable[str] | None = None) -> bool:
        regex = self._allow_regex
        if regex is None:
            return True
        return any(regex.match(n) or regex.match(n.replace(":", "_"))
                   for n in (exposed_names(family) if names is None else names))

    def judge(self, family: Metric) -> str | None:
        """The reason `family` is dropped, or None if it passes."""
        if self.deny.denies_family(family):
            return "denied"
        names = exposed_names(family)
        if is_reserved(family, names):
            return "reserved"
        if not self.allows(family, names):
            return "not_allowed"
        if ":" in family.name:
            # Colons are for recording rules, never for exporters, and OpenMetrics writes them
            # as `_` in sample names: `a:b` would collide with `a_b` in one format only.
            return "invalid"
        if any(s.native_histogram is not None for s in family.samples):
            return "invalid"  # neither text 0.0.4 nor OpenMetrics 1.0 can write it
        if family.type == "gaugehistogram":
            return "invalid"  # text 0.0.4 has no such type: promtool and Prometheus differ
        if lint_problem(family) is not None:
            return "invalid"  # `promtool check metrics` would fail all of /v1/metrics
        return None


def screen(families: Iterable[Metric], policy: Policy) -> tuple[list[Metric], list[Drop]]:
    """The families that pass `policy` (children's exemplars removed) and that OpenMetrics'
    parser reads back, and the drops."""
    kept, drops = _judged(families, policy)
    kept = _coalesced(kept)
    unreadable = _unreadable_in_openmetrics(kept)
    if unreadable:
        drops.extend(Drop(kept[i].name, "invalid") for i in sorted(unreadable))
        kept = [f for i, f in enumerate(kept) if i not in unreadable]
    return kept, drops


def _judged(families: Iterable[Metric], policy: Policy) -> tuple[list[Metric], list[Drop]]:
    kept: list[Metric] = []
    drops: list[Drop] = []
    for family in families:
        if not family.samples:
            continue  # nothing Prometheus could store (a text parser's TYPE-only leftover)
        reason = policy.judge(family)
        if reason is not None:
            drops.append(Drop(family.name, reason))
            continue
        kind = _AS_TEXT.get(family.type)
        if family.type == "unknown" and lint_problem(_retyped(family, "gauge")) is None:
            kind = "gauge"  # promtool cannot read OpenMetrics' `unknown`; it can a gauge
        if kind is not None or any(s.exemplar is not None for s in family.samples):
            # A child's exemplars would reach Prometheus only through our OpenMetrics output;
            # they carry nothing the daemon needs, so none is passed on. OpenMetrics-only
            # types become what the text format makes of them (the series Prometheus stores
            # are the same), so both our formats say the same and promtool can read both.
            name = family.name + "_info" if family.type == "info" else family.name
            copy = Metric(name, family.documentation, kind or family.type, family.unit)
            copy.samples = [s._replace(exemplar=None) for s in family.samples]
            family = copy
        kept.append(family)
    return kept, drops


def _coalesced(families: list[Metric]) -> list[Metric]:
    """One family per name and type. A child that lists a family twice (the text parser then
    gives two, each valid alone) would otherwise have its series' lines interleaved by the
    renderer, which concatenates them: `x_sum{job="a"}`, `x_count{job="b"}`,
    `x_count{job="a"}`, and OpenMetrics' parser refuses the whole document for that
    ("Invalid metric grouping"). The parts are joined as if written once, each series' samples
    together in the order they came; the round trip then judges the result."""
    first: dict[tuple[str, str], int] = {}
    out: list[Metric] = []
    repeated: set[int] = set()
    for family in families:
        index = first.setdefault((family.name, family.type), len(out))
        if index == len(out):
            out.append(family)
            continue
        if index not in repeated:  # a copy: the scrape's own Metric stays as parsed
            head = out[index]
            out[index] = Metric(head.name, head.documentation, head.type, head.unit)
            out[index].samples = list(head.samples)
            repeated.add(index)
        out[index].samples.extend(family.samples)
    for index in repeated:
        out[index].samples = _by_series(out[index].samples)
    return out


def _by_series(samples: list[Sample]) -> list[Sample]:
    """`samples` with each series' (labels but `le` and `quantile`) together, in first-seen
    order, each keeping its own order (bucket order is the round trip's to judge)."""
    groups: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
    for sample in samples:
        key = tuple(sorted((k, v) for k, v in sample.labels.items()
                           if k not in ("le", "quantile")))
        groups.setdefault(key, []).append(sample)
    return [sample for group in groups.values() for sample in group]


def _reads_back(families: list[Metric]) -> bool:
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    try:
        body = generate_latest(Collected(families))  # type: ignore[no-untyped-call]
        for _ in text_string_to_metric_families(body.decode()):  # type: ignore[no-untyped-call]
            pass
    except Exception:  # noqa: BLE001 - any refusal, whatever the parser raises, is the answer
        return False
    return True


# Types whose samples OpenMetrics constrains beyond one line each: bucket order and `+Inf`,
# `_count` against `+Inf`, integer counts, non-negative and non-NaN counters, info and stateset
# values. A gauge's lines stand alone (the renderer settles duplicates), so the round trip, which
# costs about twice the scrape's own parse, is spent only where it can find something.
_STRUCTURED = frozenset({"counter", "histogram", "gaugehistogram", "summary", "info", "stateset"})


def _unreadable_in_openmetrics(families: list[Metric]) -> set[int]:
    """Indexes of the families that, each written alone as OpenMetrics, its parser refuses.
    Alone, because what families do to each other (a text scrape's `x_created` gauge beside the
    counter `x`, two types for one name) is the renderer's to settle (render.py)."""
    return {i for i, family in enumerate(families)
            if (family.type in _STRUCTURED
                or any(s.timestamp is not None for s in family.samples))
            and not _reads_back([family])}


def _retyped(family: Metric, kind: str) -> Metric:
    copy = Metric(family.name, family.documentation, kind, family.unit)
    copy.samples = family.samples
    return copy


def _printable(name: str, limit: int = 100) -> str:
    text = name.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DropLedger:
    """Counts per service and reason since the daemon started, and what each service's latest
    payload is losing; thread-safe (the scraper records on the event loop, the renderer from
    HTTP threads). `token` is a new object after every change, so a render source keyed by it
    is rebuilt only then."""

    def __init__(self, log_limit: int = LOG_LIMIT) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._current: dict[str, dict[str, int]] = {}
        self._logged: dict[str, set[tuple[str, str]]] = {}
        self._log_limit = log_limit
        self.token: object = object()

    def __repr__(self) -> str:
        total = sum(sum(c.values()) for c in self._counts.values())
        return f"<DropLedger services={len(self._counts)} dropped={total}>"

    def record_scrape(self, service: str, drops: Iterable[Drop]) -> None:
        """A new payload's drops: counted, and from now on what the service is losing."""
        drops = list(drops)
        if not drops and not self._current.get(service):
            return
        with self._lock:
            current: dict[str, int] = {}
            for drop in drops:
                current[drop.reason] = current.get(drop.reason, 0) + drop.families
            self._current = {**self._current, service: current}
        self.record(service, drops, _current=False)

    def record(self, service: str, drops: Iterable[Drop], *, _current: bool = True) -> None:
        """Drops found besides a payload's screening (clashes when merging): counted, and
        added to what the service's latest payload is losing."""
        drops = list(drops)
        if not drops:
            return
        with self._lock:
            if _current:
                current = dict(self._current.get(service, {}))
                for drop in drops:
                    current[drop.reason] = current.get(drop.reason, 0) + drop.families
                self._current = {**self._current, service: current}
            counts = dict(self._counts.get(service, {}))
            logged = self._logged.setdefault(service, set())
            for drop in drops:
                counts[drop.reason] = counts.get(drop.reason, 0) + drop.families
                key = (drop.family, drop.reason)
                if key in logged or len(logged) > self._log_limit:
                    continue
                if len(logged) == self._log_limit:
                    logged.add(("", ""))  # marks the limit as reported
                    logger.warning("metric families dropped service=%s: more than %d distinct "
                                   "families, further ones are counted, not logged",
                                   service, self._log_limit)
                    continue
                logged.add(key)
                logger.warning("metric family dropped service=%s family=%s reason=%s",
                               service, _printable(drop.family), drop.reason)
            self._counts = {**self._counts, service: counts}
            self.token = object()

    def counts(self) -> Mapping[str, Mapping[str, int]]:
        """service -> reason -> families dropped since the daemon started (no lock needed:
        the mapping is swapped whole)."""
        return self._counts

    def current(self) -> Mapping[str, Mapping[str, int]]:
        """service -> reason -> families its latest payload is losing (scrape and merge)."""
        return self._current

    def retain(self, services: Iterable[str]) -> None:
        """Forget services that are gone (after a reload)."""
        keep = set(services)
        with self._lock:
            self._counts = {k: v for k, v in self._counts.items() if k in keep}
            self._current = {k: v for k, v in self._current.items() if k in keep}
            self._logged = {k: v for k, v in self._logged.items() if k in keep}
            self.token = object()


def drop_families(counts: Mapping[str, Mapping[str, int]], environment: str) -> list[Metric]:
    """`service_scrape_dropped_families_total`: one series per service and reason seen."""
    family = CounterMetricFamily(
        DROPPED_FAMILY, "Metric families of the service's payload dropped before /v1/metrics, "
        "by reason: denied, not_allowed, reserved, type_clash, invalid, limit.",
        labels=["service", "environment", "reason"])
    for service in sorted(counts):
        for reason in REASONS:
            value = counts[service].get(reason)
            if value:
                family.add_metric([service, environment, reason], value)
    return [family]
