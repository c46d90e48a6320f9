"""Render /v1/metrics from many sources, reusing each source's formatted text while it is
unchanged.

At 200 services of 50 series each, formatting ten thousand samples with prometheus_client took
most of a 120 ms render, although almost all of them change only when that child is scraped
again (every scrape_interval). So each source is named and declares how it is cached (`Cache`);
this module is the one place that rule is applied:

- `keyed(name, families, *key)`: rebuilt only when an object of `key` is replaced (identity,
  not equality: the event loop swaps snapshots, stats and scrape results whole). Its builder
  gets no clock, so it cannot show a time-dependent value that would then freeze.
- `clocked(name, families, *key)`: keyed, and also rebuilt once per clock tick (`Ticker`,
  CLOCK_RESOLUTION); its builder is handed the render's `now`. Uptimes, the daemon's process.
- `always(name, families)`: rebuilt on every render (cheap values other threads update in
  place, or that are time-dependent on their own: request counters, dependency freshness).

While a source's key is the same, its families, their series names and keys, and their
formatted sample lines are reused; a render only merges at family level and joins text.

The text itself is always prometheus_client's: a family's sample lines are its encoder's output
for that family alone minus the `# HELP`/`# TYPE`/`# UNIT` header, and each merged family gets
the header the encoder writes for the merged metadata. This is the only merge (`_merge`):
deny-list, first type wins, colliding series names dropped, duplicate series keep the first;
a scraped service's family dropped for a clash is reported once per prepared source (once per
scrape) to `on_drop` (reason `type_clash`). Families that need sample-level surgery
(duplicates, or `_created`-style samples that the 0.0.4 text format writes as separate gauge
blocks) are rendered whole, uncached.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client.metrics_core import Metric

from supervisor.observe.denylist import DenyList, exposed_names
from supervisor.observe.families import NO_HELP, Collected

Encoder = Callable[[Collected], bytes]
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
# Samples the 0.0.4 text encoder moves out of their family into a gauge block of their own.
_SPLIT_SUFFIXES = ("_created", "_gsum", "_gcount")
_EOF = b"# EOF\n"
_MAX_HEADERS = 10_000


CLOCK_RESOLUTION = 0.1  # s; a clocked source's values are at most this old


class Cache(enum.Enum):
    """How a source's families are reused between renders (see the module docstring)."""

    KEYED = "keyed"
    CLOCKED = "clocked"
    ALWAYS = "always"


Builder = Callable[[], Iterable[Metric]]


class Source(NamedTuple):
    """One contributor to /v1/metrics. Build it with `keyed`, `clocked` or `always`, which
    type `families` by the policy (a tuple: a render builds one per source per scrape)."""

    name: str
    families: Callable[..., Iterable[Metric]]  # given the render's `now` only if CLOCKED
    cache: Cache
    key: tuple[object, ...] = ()
    service: str | None = None  # a scraped service's name: its clashes are reported as drops


def keyed(name: str, families: Builder, *key: object, service: str | None = None) -> Source:
    """Rebuilt only when an object of `key` is replaced; `families` must read nothing else."""
    return Source(name, families, Cache.KEYED, key, service)


def clocked(name: str, families: Callable[[float], Iterable[Metric]], *key: object) -> Source:
    """Rebuilt when an object of `key` is replaced and once per clock tick; gets `now`."""
    return Source(name, families, Cache.CLOCKED, key)


def always(name: str, families: Builder, *, service: str | None = None) -> Source:
    """Rebuilt on every render."""
    return Source(name, families, Cache.ALWAYS, (), service)


@dataclass
class _Family:
    metric: Metric
    names: tuple[str, ...]  # exposed series names (deny and clash checks)
    sample_names: frozenset[str]  # for ?name[]=
    keys: frozenset[SeriesKey]
    # The samples' `service` label values (None: no such label). Two parts whose sets do not
    # meet cannot hold the same series, so merging them needs no per-series check.
    services: frozenset[str | None]
    clean: bool  # no duplicate series within the family
    splits_in_text: bool  # has samples the text format writes as separate blocks
    lines: dict[str, bytes] = field(default_factory=dict)  # content type -> sample lines
    denied_by: tuple[DenyList, bool] | None = None  # the last deny-list asked, and its answer

    def denied(self, deny: DenyList) -> bool:
        # The whole guard (names, labels, HELP ...), once per prepared source and deny list:
        # a scraped service's families were screened already, the daemon's own are small.
        cached = self.denied_by
        if cached is None or cached[0] is not deny:
            cached = self.denied_by = (deny, deny.denies_family(self.metric)
                                       or any(deny.denies(n) for n in self.names))
        return cached[1]


@dataclass
class _Prepared:
    key: tuple[object, ...] | None
    families: list[_Family]
    service: str | None = None
    reported: set[str] = field(default_factory=set)  # families already reported as clashes


def _sample_keys(metric: Metric) -> list[SeriesKey]:
    return [(s.name, tuple(sorted(s.labels.items()))) for s in metric.samples]


def _keys_of(metric: Metric) -> set[SeriesKey]:
    return set(_sample_keys(metric))


def _prepare(source: Source, key: tuple[object, ...] | None, now: float) -> _Prepared:
    prepared = []
    clocked = source.cache is Cache.CLOCKED
    for metric in source.families(now) if clocked else source.families():
        keys = _sample_keys(metric)
        unique = frozenset(keys)
        split_names = {metric.name + suffix for suffix in _SPLIT_SUFFIXES}
        prepared.append(_Family(
            metric, tuple(exposed_names(metric)), frozenset(s.name for s in metric.samples),
            unique, frozenset(s.labels.get("service") for s in metric.samples),
            len(unique) == len(keys), any(s.name in split_names for s in metric.samples)))
    return _Prepared(key, prepared, source.service)


class Ticker:
    """Key material for sources that change with the clock: the same object throughout each
    `period` seconds, so such a source is rebuilt at most once per period however often
    /v1/metrics is scraped, and its values are at most `period` old."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._token: tuple[int] = (-1,)

    def token(self, now: float) -> object:
        index = int(now // self.period)
        token = self._token
        if token[0] != index:  # a race between renders only costs one extra rebuild
            token = self._token = (index,)
        return token


def same_objects(a: tuple[object, ...] | None, b: tuple[object, ...] | None) -> bool:
    """Element by element the very same objects (identity, not equality); None never is."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x is y for x, y in zip(a, b, strict=True))


class _Merged:
    __slots__ = ("name", "documentation", "type", "unit", "parts", "whole", "splits_in_text",
                 "services", "_keys")

    def __init__(self, metric: Metric) -> None:
        self.name = metric.name
        self.documentation = metric.documentation or NO_HELP
        self.type = metric.type
        self.unit = metric.unit
        self.parts: list[_Family | Metric] = []  # Metric: a filtered copy, rendered uncached
        self.whole = False  # render as one merged family (no cached lines)
        self.splits_in_text = False  # some part has samples text 0.0.4 writes as own blocks
        self.services: set[str | None] = set()
        self._keys: set[SeriesKey] | None = None  # built only once parts may overlap

    def add(self, family: _Family) -> None:
        self.splits_in_text = self.splits_in_text or family.splits_in_text
        if self._keys is None and family.clean and self.services.isdisjoint(family.services):
            self.services |= family.services
            self.parts.append(family)
            return
        if self._keys is None:
            self._keys = set()
            for part in self.parts:
                self._keys |= part.keys if isinstance(part, _Family) else _keys_of(part)
        # Possible duplicate series: keep the first of each.
        metric = family.metric
        copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        for sample, key in zip(metric.samples, _sample_keys(metric), strict=True):
            if key not in self._keys:
                self._keys.add(key)
                copy.samples.append(sample)
        self.services |= family.services
        self.parts.append(copy)
        self.whole = self.whole or family.splits_in_text

    def mentions(self, names: set[str]) -> bool:
        """`?name[]=` matches the family name or any of its samples' names."""
        return self.name in names or any(
            not names.isdisjoint(p.sample_names if isinstance(p, _Family)
                                 else (s.name for s in p.samples))
            for p in self.parts)


class CachingRenderer:
    """Thread-safe: renders may run concurrently (one per format); the cache is swapped whole."""

    def __init__(self, sources: Callable[[], list[Source]],
                 deny: Callable[[], DenyList] = DenyList,
                 on_drop: Callable[[str, str], None] | None = None, *,
                 clock: Ticker | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._sources = sources
        # The tick clocked sources are keyed by; the daemon keys kept bodies by it too.
        self.clock = Ticker(CLOCK_RESOLUTION) if clock is None else clock
        self.monotonic = monotonic
        self._deny = deny
        self._on_drop = on_drop  # (service, family name): a scraped family lost to a clash
        self._lock = threading.Lock()
        self._cache: dict[str, _Prepared] = {}
        self._headers: dict[tuple[str, str, str, str, str], bytes] = {}
        self.prepared = 0  # sources (re)built, for tests and benches

    def render(self, encoder: Encoder, content_type: str,
               names: tuple[str, ...] = ()) -> bytes:
        sources = self._prepared_sources()
        merged = self._merge(sources, self._deny())
        wanted = set(names)
        out: list[bytes] = []
        openmetrics = content_type.startswith("application/openmetrics-text")
        for family in merged:
            if wanted and not family.mentions(wanted):
                continue
            if family.whole or (not openmetrics and family.splits_in_text):
                out.append(_strip_eof(encoder(Collected([_whole(family)]))))
                continue
            out.append(self._header(encoder, content_type, family))
            for part in family.parts:
                if isinstance(part, Metric):
                    out.append(_lines(encoder, part))
                else:
                    lines = part.lines.get(content_type)
                    if lines is None:
                        lines = part.lines[content_type] = _lines(encoder, part.metric)
                    out.append(lines)
        if openmetrics:
            out.append(_EOF)
        return b"".join(out)

    def _header(self, encoder: Encoder, content_type: str, family: _Merged) -> bytes:
        """The encoder's `# HELP`/`# TYPE`/`# UNIT` lines for the merged metadata."""
        key = (content_type, family.name, family.documentation, family.type, family.unit)
        header = self._headers.get(key)
        if header is None:
            header = _strip_eof(encoder(Collected([_meta(family)])))
            if len(self._headers) >= _MAX_HEADERS:  # children churning their HELP texts
                self._headers.clear()
            self._headers[key] = header
        return header

    def _prepared_sources(self) -> list[_Prepared]:
        cache = self._cache
        fresh: dict[str, _Prepared] = {}
        result = []
        now = self.monotonic()
        tick = self.clock.token(now)
        for source in self._sources():
            # The caching rule, once: what must stay the very same objects for a reuse.
            if source.cache is Cache.KEYED:
                key: tuple[object, ...] | None = source.key
            elif source.cache is Cache.CLOCKED:
                key = (*source.key, tick)
            else:
                key = None
            cached = cache.get(source.name)
            if cached is None or not same_objects(cached.key, key):
                cached = _prepare(source, key, now)
                self.prepared += 1
            if key is not None:
                fresh[source.name] = cached
            result.append(cached)
        with self._lock:
            self._cache = fresh  # unused sources (removed services) fall out here
        return result

    def _clash(self, prepared: _Prepared, name: str) -> None:
        if prepared.service is None or self._on_drop is None:
            return
        with self._lock:  # concurrent renders: report each once
            if name in prepared.reported:
                return
            prepared.reported.add(name)
        self._on_drop(prepared.service, name)

    def _merge(self, sources: list[_Prepared], deny: DenyList) -> list[_Merged]:
        merged: dict[str, _Merged] = {}
        owner: dict[str, str] = {}  # exposed series name -> family name that claimed it
        for prepared in sources:
            for family in prepared.families:
                if family.denied(deny):
                    continue
                name = family.metric.name
                if any(owner.get(n, name) != name for n in family.names):
                    self._clash(prepared, name)
                    continue  # its series names collide with another family's
                target = merged.get(name)
                if target is None:
                    target = merged[name] = _Merged(family.metric)
                elif target.type != family.metric.type:
                    self._clash(prepared, name)
                    continue  # the first source's type wins
                elif target.documentation == NO_HELP and family.metric.documentation:
                    target.documentation = family.metric.documentation
                for n in family.names:
                    owner[n] = name
                target.add(family)
        return list(merged.values())


def _meta(family: _Merged) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


def _whole(family: _Merged) -> Metric:
    metric = _meta(family)
    for part in family.parts:
        metric.samples.extend(part.samples if isinstance(part, Metric) else part.metric.samples)
    return metric


def _lines(encoder: Encoder, metric: Metric) -> bytes:
    """The encoder's sample lines for `metric`, without its header lines and `# EOF`."""
    text = _strip_eof(encoder(Collected([metric])))
    start = 0
    while text.startswith(b"# ", start):
        start = text.index(b"\n", start) + 1
    return text[start:]


def _strip_eof(text: bytes) -> bytes:
    return text[: -len(_EOF)] if text.endswith(_EOF) else text

