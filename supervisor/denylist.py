"""FR52 guard: which metric names must never leave /v1/metrics.

Patterns are fnmatch-style globs matched case-sensitively against the whole name (Prometheus
names are case-sensitive). A name is also denied when its family name - the name with one of the
sample suffixes `_total`, `_bucket`, `_count`, `_sum`, `_created` removed - matches, so denying
`halt_state` also denies the counter `halt_state_total` and a histogram's `halt_state_bucket`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable

from supervisor.config import DEFAULT_DENY_METRICS

logger = logging.getLogger(__name__)

SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


class DenyList:
    """An immutable set of glob patterns; `denies(name)` is pure and thread-safe."""

    __slots__ = ("_patterns", "_regex")

    def __init__(self, patterns: Iterable[str] = DEFAULT_DENY_METRICS) -> None:
        self._patterns: tuple[str, ...] = tuple(dict.fromkeys(patterns))
        # One alternation of translated globs: a single regex match per name, however many
        # patterns an operator configures (collect() checks every family of every child).
        if self._patterns:
            joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in self._patterns)
            self._regex: re.Pattern[str] | None = re.compile(joined)
        else:
            self._regex = None

    @property
    def patterns(self) -> tuple[str, ...]:
        return self._patterns

    def denies(self, name: str) -> bool:
        if self._regex is None:
            return False
        if self._regex.match(name):
            return True
        for suffix in SAMPLE_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                if self._regex.match(name[: -len(suffix)]):
                    return True
        return False

    def __repr__(self) -> str:
        return f"DenyList({list(self._patterns)!r})"
