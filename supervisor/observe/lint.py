"""What `promtool check metrics` would object to in a family, as our text format writes it
(its lint rules, and a histogram's `le` or a summary's `quantile` that is not a float, which
its parser refuses).

/v1/metrics must pass promtool whatever services send, and promtool fails (exit 3) on any lint
problem of any family; so a scraped family with one is dropped (`invalid`) rather than written.
The rules are client_golang's promlint (prometheus/testutil/promlint), judged on the family as
the text 0.0.4 writer names it (a counter `x` is written as `x_total`, an info `x` as
`x_info`); where versions of promlint differ, the stricter reading is taken. HELP is never a
problem here: the merge gives every family one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

_CAMEL = re.compile(r"[a-z][A-Z]")
# What Go's strconv.ParseFloat surely reads (promtool's parser reads `le` and `quantile` so).
_FLOAT = re.compile(r"[+-]?(?:inf|infinity|nan|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\Z",
                    re.IGNORECASE)
_BASE_UNITS = ("amperes", "bytes", "celsius", "grams", "joules", "kelvin", "meters", "metres",
               "seconds", "volts")
_OTHER_UNITS = ("minutes", "hours", "days", "weeks", "kelvins", "fahrenheit", "rankine",
                "inches", "yards", "miles", "bits", "calories", "pounds", "ounces")
_PREFIXES = ("pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto", "kilo", "kibi",
             "mega", "mibi", "giga", "gibi", "tera", "tebi", "peta", "pebi")
# Words promlint reads as a unit other than a base unit: "milliseconds", "hours", "kilobytes".
_NON_BASE = frozenset(
    [p + u for p in _PREFIXES for u in _BASE_UNITS + _OTHER_UNITS]
    + list(_OTHER_UNITS))
_ABBREVIATIONS = frozenset(("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m",
                            "h", "d"))
_TYPE_WORDS = ("counter", "gauge", "histogram", "summary", "gauge_histogram")
# How the text writer names and types each family type.
_TEXT_TYPE = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
              "unknown": "untyped"}


def text_name(family: Metric) -> tuple[str, str]:
    """The family's name and type as the text 0.0.4 writer puts them in `# TYPE`."""
    if family.type == "counter":
        return family.name + "_total", "counter"
    if family.type == "info":
        return family.name + "_info", "gauge"
    return family.name, _TEXT_TYPE.get(family.type, family.type)


def lint_problem(family: Metric) -> str | None:
    """promtool's first objection to `family`, or None."""
    name, kind = text_name(family)
    lower = name.lower()
    words = lower.split("_")
    if ":" in name:
        return "metric names should not contain ':'"
    if _CAMEL.search(name):
        return "metric names should be written in 'snake_case' not 'camelCase'"
    if any(w in _NON_BASE for w in name.split("_")):
        return "use base units"
    if any(w in _ABBREVIATIONS for w in words[1:]):
        return "metric names should not contain abbreviated units"
    for word in _TYPE_WORDS:
        if f"_{word}_" in lower or lower.endswith("_" + word):
            return f"metric name should not include type '{word}'"
    if kind not in ("counter", "untyped") and name.endswith("_total"):
        return 'non-counter metrics should not have "_total" suffix'
    if kind != "untyped":
        if kind != "histogram" and name.endswith("_bucket"):
            return 'non-histogram metrics should not have "_bucket" suffix'
        if kind not in ("histogram", "summary") and name.endswith(("_count", "_sum")):
            return 'non-histogram and non-summary metrics should not have "_count"/"_sum"'
    keys = {k for sample in family.samples for k in sample.labels}
    if any(_CAMEL.search(k) for k in keys):
        return "label names should be written in 'snake_case' not 'camelCase'"
    if kind in ("histogram", "summary"):
        special = "le" if kind == "histogram" else "quantile"
        if any(not _FLOAT.match(s.labels[special]) for s in family.samples
               if special in s.labels):
            return f"text format parsing error: {special!r} must be a float"
    if kind in ("counter", "histogram", "summary") and any(
            s.name.endswith("_created") and ("le" in s.labels or "quantile" in s.labels)
            for s in family.samples):
        # The text format writes `x_created` as a gauge family of its own.
        return 'non-histogram and non-summary metrics should not have "le"/"quantile" label'
    if kind != "untyped":
        if kind != "histogram" and "le" in keys:
            return 'non-histogram metrics should not have "le" label'
        if kind != "summary" and "quantile" in keys:
            return 'non-summary metrics should not have "quantile" label'
    return None
