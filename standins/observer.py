"""Stand-in for observer: follows new rows of the `events` table and exposes how many it has
seen and how far behind the writes it is.

It starts at the newest event present (it follows, it does not replay) and polls for rows with
a larger id. Lag is PostgreSQL's `clock_timestamp() - created_at` of each event when observed:
the delay from append to observation, free of clock skew between hosts. With PostgreSQL down,
or before event-writer has created the table, it keeps running and reports not ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from common import (
    Families,
    Link,
    Router,
    Unavailable,
    add_database,
    dependency_gauge,
    health_routes,
    instrumented,
    main,
    parser,
    serve,
    setup_logging,
    wait_connected,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from store import MISSING_SCHEMA, postgres_link

logger = logging.getLogger("observer")
BATCH = 1000
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Follower:
    def __init__(self, pg: Link[asyncpg.Pool], registry: CollectorRegistry,
                 interval: float) -> None:
        self.pg, self.interval = pg, interval
        families = Families(registry)
        self.seen = families.add(Counter(
            "observer_events", "New events observed since start.", registry=None))
        self.last_id = families.add(Gauge(
            "observer_last_event_id", "Id of the newest event observed.", registry=None))
        self.lag = families.add(Gauge(
            "observer_lag_seconds", "Append-to-observation delay of the newest event "
            "observed.", registry=None))
        self.lag_histogram = families.add(Histogram(
            "observer_event_lag_seconds", "Append-to-observation delay per event.",
            buckets=LAG_BUCKETS, registry=None))
        self.cursor: int | None = None  # None until the starting point is known
        self.table_ready = False

    def status(self) -> dict[str, Any]:
        return {"ready": self.table_ready, "table_ready": self.table_ready,
                "last_event_id": self.cursor}

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Unavailable:
                await wait_connected([self.pg], 1.0)
                continue
            except MISSING_SCHEMA:
                if self.table_ready:
                    logger.warning("events table missing")
                self.table_ready = False
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    asyncio.TimeoutError) as exc:
                self.table_ready = False
                await self.pg.drop(exc)
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        pool = self.pg.get()
        if self.cursor is None:
            self.cursor = int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM events"))
            self.last_id.set(self.cursor)
            logger.info("following events after id=%d", self.cursor)
        rows = await pool.fetch(
            "SELECT id, extract(epoch FROM clock_timestamp() - created_at)::float8 AS lag "
            "FROM events WHERE id > $1 ORDER BY id LIMIT $2", self.cursor, BATCH)
        self.table_ready = True
        for row in rows:
            self.lag_histogram.observe(max(0.0, row["lag"]))
        if rows:
            self.cursor = int(rows[-1]["id"])
            self.seen.inc(len(rows))
            self.last_id.set(self.cursor)
            self.lag.set(max(0.0, rows[-1]["lag"]))


async def run() -> int:
    p = parser("observer", 8083)
    add_database(p)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    args = p.parse_args()
    setup_logging("observer", args.log_level)
    registry = CollectorRegistry()
    pg = postgres_link(args.database_url, dependency_gauge(registry), args.retry_max)
    follower = Follower(pg, registry, args.interval)
    app = instrumented(Router(health_routes([pg], follower.status), registry), registry)
    return await serve(app, args.listen, [pg.run, follower.run], [pg.aclose])


if __name__ == "__main__":
    main(run)
