"""A second, deliberately plain implementation of /v1/metrics' merge rules, used only as the
oracle the production merge (supervisor.observe.render.CachingRenderer) is checked against
(tests/test_render.py): merge every family, then encode, with no caching at all.

Same-named families from all sources become one family (one HELP, one TYPE); families the FR52
guard denies (names, labels, HELP) are dropped; the first source's type wins and a later family
of another type - or one whose exposed names would collide with an earlier family's series,
like a gauge `x_count` next to a histogram `x` - is dropped Duplicate series
(same name and labels) keep the first.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from supervisor.observe.denylist import DenyList, exposed_names
from supervisor.observe.families import NO_HELP


def merge_families(sources: Iterable[Iterable[Metric]], deny: DenyList) -> list[Metric]:
    merged: dict[str, Metric] = {}
    owner: dict[str, str] = {}  # exposed series name -> family name that claimed it
    seen: dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for families in sources:
        for family in families:
            names = exposed_names(family)
            if any(deny.denies(n) for n in names) or deny.denies_family(family):
                continue
            if any(owner.get(n, family.name) != family.name for n in names):
                continue
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation or NO_HELP, family.type, family.unit)
                seen[family.name] = set()
            elif target.type != family.type:
                continue
            elif target.documentation == NO_HELP and family.documentation:
                target.documentation = family.documentation
            for n in names:
                owner[n] = family.name
            keys = seen[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in keys:
                    continue
                keys.add(key)
                target.samples.append(sample)
    return list(merged.values())
