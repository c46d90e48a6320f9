"""The JSON document behind GET /v1/status and `supervisor status --json` (a stable shape,
documented in docs/status.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supervisor.core.datatypes import signal_name

if TYPE_CHECKING:
    from supervisor.core.snapshot import ServiceSnapshot
    from supervisor.observe.scraper import ScrapeResult

SCHEMA_VERSION = 1

Counts = Mapping[str, Mapping[str, int]]  # service -> reason -> families


@dataclass(frozen=True)
class DaemonFacts:
    """The daemon-wide part of the document, as plain values."""

    environment: str
    config_path: str
    started_at: float  # time.monotonic()
    last_reload_ok: bool
    warnings: Sequence[str]


def status_document(daemon: DaemonFacts, snapshots: Mapping[str, ServiceSnapshot],
                    scrapes: Mapping[str, ScrapeResult], dropped: Counts, dropping: Counts,
                    readiness: dict[str, Any]) -> dict[str, Any]:
    """`dropped`: families kept out since the daemon started; `dropping`: those the latest
    payloads are losing; `readiness`: the /v1/ready body of the dependency checks."""
    now, wall = time.monotonic(), time.time()
    services = []
    for snap in snapshots.values():
        scrape = scrapes.get(snap.name)
        last = snap.last_exit
        services.append({
            "name": snap.name,
            "state": snap.state.value,
            "pid": snap.pid,
            "uptime_seconds": round(snap.uptime(now), 3),
            "starts": snap.starts,
            "started_at": snap.started_wall,
            "last_exit": None if last is None else {
                "code": last.code,
                "signal": signal_name(last.signal) if last.signal is not None else None,
                "reason": last.reason,
                "at": last.wall,
            },
            "last_error": snap.last_error,
            "waiting_for": snap.waiting_for,
            # the readiness probe's verdict; without one, whether the service is running
            # (as service_ready)
            "ready": snap.is_ready,
            "readiness_probe": snap.ready is not None,
            "probes": {kind: {"failures": p.failures, "passing": p.passing,
                              "last_error": p.last_error}
                       for kind, p in snap.probes.items()},
            "next_start_in_seconds": (round(max(0.0, snap.next_start_at - now), 3)
                                      if snap.next_start_at is not None else None),
            "quick_failures": snap.quick_failures,
            "cgroup": snap.cgroup,
            "scrape": None if scrape is None else {
                "ok": scrape.ok,
                "error": scrape.error,
                "duration_seconds": round(scrape.duration_seconds, 4),
                "samples": scrape.samples,
                # families kept out of /v1/metrics since the daemon started, by reason
                "dropped_families": dict(sorted(dropped.get(snap.name, {}).items())),
                # ... and those the latest payload is losing (scrape and merge), by reason
                "dropping_families": dict(sorted(dropping.get(snap.name, {}).items())),
            },
        })
    return {
        "version": SCHEMA_VERSION,
        "environment": daemon.environment,
        "time": wall,
        "daemon": {"pid": os.getpid(),
                   "uptime_seconds": round(now - daemon.started_at, 3),
                   "config": daemon.config_path,
                   "last_reload_ok": daemon.last_reload_ok,
                   "warnings": list(daemon.warnings)},
        "services": services,
        "readiness": readiness,
    }
