"""The FR52 deny list's entries (`deny_metrics`) and how a text is matched against them.

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

This is the pure half, which the config needs to validate entries and the names the daemon
writes as label values; supervisor/observe/denylist.py applies it to whole metric families.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable

# Seed story's constitutional metrics (FR52): never exposed, in any disguise. Globs over the
# normalised names, labels and HELP of a family: the exact names, then the same words (and
# `constitutional`) anywhere.
DEFAULT_DENY_METRICS = (
    "constitutional_breach_count",
    "halt_state",
    "dissent_health_ratio",
    "witness_coverage_percent",
    "override_frequency",
    "*constitutional*",
    "*breach_count*",
    "*halt_state*",
    "*dissent_health*",
    "*witness_coverage*",
    "*override_frequency*",
)
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


def denies_everything(entry: str) -> bool:
    """Whether `entry` has no letter or digit, so it would deny every metric (refused)."""
    return not normalise(entry.replace("*", "").replace("?", ""))


def _entry_regex(entry: str) -> str | None:
    folded = _fold(entry)
    stripped = _TRAILING.sub("", folded)
    if _NOT_ALNUM.sub("", stripped):
        folded = stripped
    core = _NOT_PATTERN.sub("", folded)
    if not core.replace("*", "").replace("?", ""):
        return None  # would match everything; config validation refuses such an entry
    return fnmatch.translate(core)


class DenyPatterns:
    """An immutable list of entries; `denies(text)` is thread-safe (the memo is a plain
    dict: a racing insert only repeats work)."""

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
        return (isinstance(other, DenyPatterns) and type(other) is type(self)
                and other._patterns == self._patterns)

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._patterns)!r})"
