"""FR52 guard: which metric families must never reach Prometheus, in any disguise.

How a text is normalised and matched against the `deny_metrics` entries (case, separators,
Unicode forms, trailing suffixes, globs) is the config's half, in supervisor/config/deny.py;
this module applies it to whole families.

`denies_family` applies the match to everything of a family that Prometheus would store or show: the
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

from typing import TYPE_CHECKING

from supervisor.config.deny import SUFFIX_WORDS, DenyPatterns, forms, normalise

if TYPE_CHECKING:  # a type only: nothing here needs prometheus_client loaded
    from prometheus_client.metrics_core import Metric

__all__ = ["SUFFIX_WORDS", "TYPE_SUFFIXES", "DenyList", "exposed_names", "forms", "normalise"]

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


class DenyList(DenyPatterns):
    """The deny list's entries (DEFAULT_DENY_METRICS unless given), matching texts and whole
    families; thread-safe, as DenyPatterns."""

    __slots__ = ()

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
