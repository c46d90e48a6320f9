"""Stand-in for watchdog: polls the other services' /v1/health and exposes what it sees.

`--target NAME=URL` (repeatable) names each endpoint; a target is up when it answers 2xx within
`--timeout`. Metrics: `watchdog_target_up{target}`, `watchdog_target_check_duration_seconds
{target}`, `watchdog_target_checks_total{target,result}`; `/v1/status` gives the same as JSON.
It depends on nothing, so it is always ready; a dead target is a finding, not a fault.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from common import (
    Families,
    Reply,
    Route,
    Router,
    Scope,
    health_routes,
    instrumented,
    main,
    parser,
    serve,
    setup_logging,
)
from prometheus_client import CollectorRegistry, Counter, Gauge

logger = logging.getLogger("watchdog")


class Watch:
    def __init__(self, targets: dict[str, str], registry: CollectorRegistry, interval: float,
                 timeout: float) -> None:
        self.targets, self.interval, self.timeout = targets, interval, timeout
        families = Families(registry)
        self.up = families.add(Gauge("watchdog_target_up", "1 if the target's health endpoint "
                                     "answered 2xx at the last check.", ["target"],
                                     registry=None))
        self.duration = families.add(Gauge("watchdog_target_check_duration_seconds",
                                           "Duration of the last check.", ["target"],
                                           registry=None))
        self.checks = families.add(Counter("watchdog_target_checks", "Checks by result.",
                                           ["target", "result"], registry=None))
        self.seen: dict[str, dict[str, Any]] = {}
        for name in targets:
            self.up.labels(name).set(0)
            self.seen[name] = {"up": False, "detail": "not checked yet"}

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
            while True:
                await asyncio.gather(*(self.check(client, name, url)
                                       for name, url in self.targets.items()))
                await asyncio.sleep(self.interval)

    async def check(self, client: httpx.AsyncClient, name: str, url: str) -> None:
        start = time.perf_counter()
        try:
            response = await client.get(url)
            ok, detail = response.is_success, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok, detail = False, type(exc).__name__
        elapsed = time.perf_counter() - start
        if ok != self.seen[name]["up"]:
            logger.info("target %s name=%s detail=%s", "up" if ok else "down", name, detail)
        self.up.labels(name).set(1 if ok else 0)
        self.duration.labels(name).set(elapsed)
        self.checks.labels(name, "ok" if ok else "fail").inc()
        self.seen[name] = {"up": ok, "detail": detail, "checked_at": time.time(),
                           "duration_seconds": round(elapsed, 4)}

    async def status(self, scope: Scope, receive: Any, reply: Reply) -> None:
        await reply.json(200, {"targets": self.seen})


def parse_targets(values: list[str]) -> dict[str, str]:
    targets = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise SystemExit(f"watchdog: --target expects NAME=http://..., got {value!r}")
        targets[name] = url
    return targets


async def run() -> int:
    p = parser("watchdog", 8084)
    p.add_argument("--target", action="append", default=[], metavar="NAME=URL")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args()
    setup_logging("watchdog", args.log_level)
    registry = CollectorRegistry()
    watch = Watch(parse_targets(args.target), registry, args.interval, args.timeout)
    routes = [*health_routes([]), Route("GET", "/v1/status", watch.status)]
    app = instrumented(Router(routes, registry), registry)
    return await serve(app, args.listen, [watch.run])


if __name__ == "__main__":
    main(run)
