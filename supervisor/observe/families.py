"""Parse children's expositions and relabel their families (render.CachingRenderer merges them).

Pure functions over prometheus_client `Metric` families; no I/O, no clocks, thread-safe.

- `parse_exposition` reads the text format 0.0.4 (what the scraper asks for), or OpenMetrics
  when the child answers with it anyway. A payload with
  more than `max_series` samples is rejected whole (`SeriesLimitExceeded`), never truncated: a
  truncated histogram (buckets without `_count`, half the label sets) would be silently wrong in
  Prometheus, whereas a rejected payload shows up as `service_scrape_up 0`.
- `relabel` adds `service` and `environment`; a child's own label of that name is kept as
  `exported_service` / `exported_environment` (more `exported_` prefixes if that is taken too),
  as Prometheus does with honor_labels=false.
- `NO_HELP` is the HELP text a merged family gets when no source gave one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

DEFAULT_MAX_SERIES = 10_000
NO_HELP = "No HELP text was given by the source of this metric."
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class ExpositionError(ValueError):
    """A payload that is not usable metrics text; the message is short and holds no URL."""


class SeriesLimitExceeded(ExpositionError):
    def __init__(self, limit: int, seen: int, families: int = 1) -> None:
        super().__init__(f"more than {limit} samples")
        self.limit = limit
        self.seen = seen  # samples parsed when the limit was hit (> limit)
        self.families = families  # families parsed when the limit was hit (>= 1)


def parse_exposition(text: str, max_series: int = DEFAULT_MAX_SERIES, *,
                     openmetrics: bool = False, invalid: list[str] | None = None
                     ) -> list[Metric]:
    """Families from text format 0.0.4 (or OpenMetrics); raises ExpositionError (or
    SeriesLimitExceeded). Families with names Prometheus 2.x refuses are skipped, their names
    appended to `invalid`."""
    families: list[Metric] = []
    samples = 0
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    try:
        for family in parse(text):
            samples += len(family.samples)
            if samples > max_series:
                raise SeriesLimitExceeded(max_series, samples, len(families) + 1)
            if not _valid_family(family):
                # prometheus_client also parses UTF-8/quoted names that promtool 2.42 and older
                # Prometheus servers reject; one such family must not sink the whole payload.
                logger.debug("invalid metric or label name family=%r", family.name[:80])
                if invalid is not None:
                    invalid.append(family.name)
                continue
            families.append(family)
    except ExpositionError:
        raise
    except Exception as exc:  # the parser raises ValueError, IndexError, KeyError ... on garbage
        raise ExpositionError(f"not metrics text: {_short(exc)}") from None
    return families


def sample_count(families: Iterable[Metric]) -> int:
    return sum(len(f.samples) for f in families)


def relabel(families: Iterable[Metric], service: str, environment: str) -> list[Metric]:
    """Copies of `families` with `service` and `environment` on every sample."""
    added = {"service": service, "environment": environment}
    out = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            labels = dict(sample.labels)
            for key, new_value in added.items():
                if key in labels:
                    target = "exported_" + key
                    while target in labels:
                        target = "exported_" + target
                    labels[target] = labels.pop(key)
                labels[key] = new_value
            copy.samples.append(sample._replace(labels=labels))
        out.append(copy)
    return out


def _valid_family(family: Metric) -> bool:
    if not _NAME.match(family.name):
        return False
    for sample in family.samples:
        if not _NAME.match(sample.name) or not all(_LABEL.match(k) for k in sample.labels):
            return False
    return True


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Collected:
    """The minimal 'registry' prometheus_client's encoders need: exactly these families."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Sequence[Metric]:
        return self._families
