"""Stand-in for event-writer: consumes the Redis stream api submits to and appends each entry
to the `events` table in PostgreSQL (creating it if needed).

Delivery is at-least-once: entries are read through a consumer group and acknowledged only
after their INSERT committed; entries left pending (PostgreSQL was down, or we were stopped)
are read again first, and `stream_id` is unique so a re-delivered entry is written once.
With either dependency down it keeps running, reports not ready and retries with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import asyncpg
import redis.exceptions
from common import (
    Families,
    Link,
    Unavailable,
    add_database,
    add_redis,
    dependency_gauge,
    health_routes,
    instrumented,
    main,
    parser,
    serve,
    setup_logging,
    wait_connected,
)
from common import Router as _Router
from prometheus_client import CollectorRegistry, Counter, Gauge
from store import MISSING_SCHEMA, ensure_schema, postgres_link, redis_link

logger = logging.getLogger("event-writer")
GROUP = "event-writer"
BATCH = 100
BLOCK_MS = 1000
RETRY_MAX = 5.0
INSERT = ("INSERT INTO events (stream_id, kind, payload) VALUES ($1, $2, $3::jsonb) "
          "ON CONFLICT (stream_id) DO NOTHING")


class Writer:
    """The consume loop and what it has seen; `ready` is what /v1/ready reports."""

    def __init__(self, pg: Link[asyncpg.Pool], rd: Link[Any], stream: str, consumer: str,
                 registry: CollectorRegistry) -> None:
        self.pg, self.rd, self.stream = pg, rd, stream
        # A stable name, not one per process: a restarted writer must find the entries it
        # read but did not acknowledge before it died (they are pending under this name).
        self.consumer = consumer
        families = Families(registry)
        self.written = families.add(Counter(
            "event_writer_events_written", "Stream entries appended to the events table.",
            registry=None))
        self.invalid = families.add(Counter(
            "event_writer_events_invalid", "Stream entries dropped as unparseable.",
            registry=None))
        self.failures = families.add(Counter(
            "event_writer_failures", "Consume-loop iterations that failed, by dependency.",
            ["dependency"], registry=None))
        self.last_write = families.add(Gauge(
            "event_writer_last_write_timestamp_seconds", "Unix time of the last append.",
            registry=None))
        self.schema_ready = False
        self.group_ready = False
        self.next_id = "0"  # "0": our pending entries first; ">" once they are drained

    def status(self) -> dict[str, Any]:
        return {"ready": self.schema_ready and self.group_ready,
                "schema_ready": self.schema_ready, "group_ready": self.group_ready}

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.step()
                delay = 0.2
            except Unavailable:
                await wait_connected([self.pg, self.rd], 1.0)
            except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
                    self.group_ready = False  # Redis lost the stream (a restart without data)
                else:
                    self.failures.labels("redis").inc()
                    await self.rd.drop(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def step(self) -> None:
        pool = self.pg.get()
        client = self.rd.get()
        if not self.schema_ready:
            if not await self._postgres(ensure_schema(pool)):
                return
            self.schema_ready = True
            logger.info("event store ready")
        if not self.group_ready:
            try:
                # id "0": a new group also takes what was submitted before we first ran.
                await client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.group_ready, self.next_id = True, "0"
        # Block only when waiting for new entries; pending ones are there already.
        block = BLOCK_MS if self.next_id == ">" else None
        reply = await client.xreadgroup(GROUP, self.consumer, {self.stream: self.next_id},
                                        count=BATCH, block=block)
        entries = reply[0][1] if reply else []
        if not entries:
            self.next_id = ">"
            return
        rows = []
        for entry_id, fields in entries:
            row = _parse(entry_id, fields)
            if row is None:
                self.invalid.inc()
            else:
                rows.append(row)
        if rows and not await self._postgres(pool.executemany(INSERT, rows)):
            self.next_id = "0"  # unacknowledged: read them again once PostgreSQL is back
            return
        await client.xack(self.stream, GROUP, *[entry_id for entry_id, _ in entries])
        if rows:
            self.written.inc(len(rows))
            self.last_write.set_to_current_time()

    async def _postgres(self, operation: Any) -> bool:
        """Await a PostgreSQL operation; on failure drop the link and return False."""
        try:
            await operation
        except MISSING_SCHEMA:
            self.schema_ready = False  # someone dropped the table: create it again
            return False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                asyncio.TimeoutError) as exc:
            self.failures.labels("postgres").inc()
            await self.pg.drop(exc)
            await asyncio.sleep(0.2)
            return False
        return True


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, str, str] | None:
    try:
        event = json.loads(fields[b"event"])
        kind = str(event["type"])[:100]
        payload = json.dumps(event.get("payload", {}))
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
    return entry_id.decode(), kind, payload


async def run() -> int:
    p = parser("event-writer", 8082)
    add_database(p)
    add_redis(p)
    p.add_argument("--consumer", default=socket.gethostname(),
                   help="consumer name in the group; one per writer, stable across restarts")
    args = p.parse_args()
    setup_logging("event-writer", args.log_level)
    registry = CollectorRegistry()
    up = dependency_gauge(registry)
    pg = postgres_link(args.database_url, up, args.retry_max)
    rd = redis_link(args.redis_url, up, args.retry_max)
    writer = Writer(pg, rd, args.stream, args.consumer, registry)
    app = instrumented(_Router(health_routes([pg, rd], writer.status), registry), registry)
    return await serve(app, args.listen, [pg.run, rd.run, writer.run], [pg.aclose, rd.aclose])


if __name__ == "__main__":
    main(run)
