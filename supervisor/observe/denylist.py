"""FR52 guard: which metrics must never reach Prometheus, in any disguise.

Prometheus stores what the exposition writes, and the writers rewrite: OpenMetrics turns a
child's `halt:state` into `halt_state`, an `escaping=` request doubles underscores or prefixes
`U__`, a counter gains `_total`. So nothing is compared as written. Every text is *normalised*:
Unicode compatibility forms folded (NFKD, combining marks dropped), case folded, and every
character that is not an ASCII letter or digit removed, so `halt:state`, `HALT_STATE`,
`halt__state`, `halt-state`, `Halt.State` and `haltstate` all read `haltstate`. A text is also
tried without its trailing sample and unit suffixes (`_total`, `_count`, `_sum`, `_bucket`,
`_created`, `_info`, `_gsum`, `_gcount`, `_seconds`, `_bytes`, `_ratio`, `_percent`, as
many as it has), and so is each entry: `dissent_health_ratio` denies `dissent_health` and
`Dissent:Health:Ratio_total` alike.

Entries are globs (`*`, `?`) over the whole normalised text: `jobs_*` denies `jobs_total` and
`JOBS:done`, not `my_jobs`. The built-in list has each constitutional metric both exactly and
as `*word*`, so those match anywhere in a text, with any prefix or suffix (`my_halt_state`,
`U__halt__state`, `constitutional_breaches_total`).

`denies_family` applies that to everything of a family that Prometheus would store or show: the
family name and every series name it exposes, every label name and value, the HELP and UNIT
text, and exemplar labels; and to the joins a reader would make: family name + label name
(`halt{state="1"}`), label name + value (`x{halt="state"}`), family name + value, a label name
+ `state` (`x{halt="on"}`: a label is a state), and for a stateset (OpenMetrics, or in text a
gauge with a label named like itself) the family name + `state` (`halt{halt="halted"}` is the
stateset encoding of a halt state). A match anywhere drops the whole family.

Limits (docs/metrics.md): abbreviations and synonyms (`dissent_ratio`, `stop_flag`), digits for
letters (`h4lt`) and letters of other scripts that merely look Latin are not caught - the strict
allow list (`allow_metrics`) exists for that. A `*word*` entry may also drop an innocent family
whose text happens to hold the word's letters in a row.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

from supervisor.config import DEFAULT_DENY_METRICS

if TYPE_CHECKING:  # config validation imports this module before prometheus_client is needed
    from prometheus_client.metrics_core import Metric

# Series names a family of each type puts into an exposition besides its own name.
TYPE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def exposed_names(family: Metric) -> set[str]:
    """Every series name `family` can put into an exposition (for deny and clash checks)."""
    names = {family.name}
    names.update(family.name + s for s in TYPE_SUFFIXES.get(family.type, ()))
    names.update(s.name for s in family.samples)
    return names


SUFFIX_WORDS = ("total", "count", "sum", "bucket", "created", "info", "gsum", "gcount",
                "seconds", "bytes", "ratio", "percent")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_NOT_PATTERN = re.compile(r"[^a-z0-9*?]+")
# Trailing suffix words, each after a separator (a text without separators keeps its letters).
_WORDS = "|".join(SUFFIX_WORDS)
_TRAILING = re.compile(rf"(?:[^a-z0-9*?]+(?:{_WORDS}))+[^a-z0-9*?]*\Z")
_MEMO_LIMIT = 50_000  # distinct texts remembered per list (label values repeat across scrapes)


def _fold(text: str) -> str:
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text)
                       if not unicodedata.combining(c))
    return text.casefold()


def normalise(text: str) -> str:
    """`text` as the guard compares it: folded, ASCII letters and digits only."""
    return _NOT_ALNUM.sub("", _fold(text))


def forms(text: str) -> tuple[str, ...]:
    """The normalised text, and the same without its trailing sample and unit suffixes."""
    folded = _fold(text)
    full = _NOT_ALNUM.sub("", folded)
    stripped = _NOT_ALNUM.sub("", _TRAILING.sub("", folded))
    return (full, stripped) if stripped and stripped != full else (full,)


def _entry_regex(entry: str) -> str | None:
    folded = _fold(entry)
    stripped = _TRAILING.sub("", folded)
    if _NOT_ALNUM.sub("", stripped):
        folded = stripped
    core = _NOT_PATTERN.sub("", folded)
    if not core.replace("*", "").replace("?", ""):
        return None  # would match everything; config validation refuses such an entry
    return fnmatch.translate(core)


class DenyList:
    """An immutable list of entries; `denies(text)` and `denies_family(metric)` are
    thread-safe (the memo is a plain dict: a racing insert only repeats work)."""

    __slots__ = ("_patterns", "_regex", "_memo")

    def __init__(self, patterns: Iterable[str] = DEFAULT_DENY_METRICS) -> None:
        self._patterns: tuple[str, ...] = tuple(dict.fromkeys(patterns))
        parts = [p for p in (_entry_regex(e) for e in self._patterns) if p is not None]
        # One alternation: a single search per text, however many entries an operator adds.
        self._regex = re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None
        self._memo: dict[str, bool] = {}

    @property
    def patterns(self) -> tuple[str, ...]:
        return self._patterns

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DenyList) and other._patterns == self._patterns

    def __hash__(self) -> int:
        return hash(self._patterns)

    def denies(self, text: str) -> bool:
        """Whether an entry matches normalised `text` (or `text` without its suffixes)."""
        if self._regex is None:
            return False
        memo = self._memo
        found = memo.get(text)
        if found is None:
            regex = self._regex
            found = any(regex.match(form) is not None for form in forms(text))
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[text] = found
        return found

    def denies_family(self, family: Metric) -> bool:
        """Whether anything of `family` Prometheus would store or show matches (see module)."""
        if self._regex is None:
            return False
        denies = self.denies
        name = family.name
        if denies(name) or denies(family.documentation or "") or denies(family.unit or ""):
            return True
        if any(denies(name + suffix) for suffix in TYPE_SUFFIXES.get(family.type, ())):
            return True  # `breach` as a summary exposes `breach_count`
        samples = family.samples
        pairs = {pair for sample in samples for pair in sample.labels.items()}
        # A stateset is stored as a gauge with a label named like the family, one series per
        # state: `halt{halt="halted"}` is a halt state, in OpenMetrics or in text.
        folded = normalise(name)
        stateset = family.type == "stateset" or any(
            normalise(k) == folded for k in {k for k, _ in pairs})
        if stateset and denies(name + "state"):
            return True
        if any(denies(n) for n in {sample.name for sample in samples} if n != name):
            return True
        for key, value in pairs:  # each distinct label pair once, however many series
            if (denies(key) or denies(value) or denies(name + key) or denies(key + value)
                    or denies(name + value) or denies(key + "state")):
                return True
        for sample in samples:
            exemplar = sample.exemplar
            if exemplar is not None and any(denies(k) or denies(v) or denies(k + v)
                                            for k, v in exemplar.labels.items()):
                return True
        return False

    def __repr__(self) -> str:
        return f"DenyList({list(self._patterns)!r})"
