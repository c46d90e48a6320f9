"""The event store (PostgreSQL table `events`) and the submission stream (Redis), as links.

Schema. `events(id bigserial, stream_id text unique, kind text, payload jsonb, created_at
timestamptz)`. event-writer creates it; the columns are added one by one (IF NOT EXISTS) so a
bare `events (id bigserial PRIMARY KEY)` made by someone else is upgraded, not fought with.
`stream_id` (the Redis entry id) makes re-delivered entries idempotent.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from common import Link
from prometheus_client import Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SCHEMA_LOCK = 7_462_001  # advisory lock id: two writers starting together do not race DDL
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY);
ALTER TABLE events ADD COLUMN IF NOT EXISTS stream_id text,
                   ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'event',
                   ADD COLUMN IF NOT EXISTS payload jsonb NOT NULL DEFAULT '{}',
                   ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX IF NOT EXISTS events_stream_id ON events (stream_id);
"""
# Errors that mean "the table is not there (yet)": not ready, not a dead connection.
MISSING_SCHEMA = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)


async def ensure_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute(SCHEMA)


def postgres_link(dsn: str, up: Gauge, retry_max: float = 5.0,
                  name: str = "postgres") -> Link[asyncpg.Pool]:
    async def connect() -> asyncpg.Pool:
        # Short timeouts: a probe that hangs for asyncpg's default 60 s is no probe.
        return await asyncpg.create_pool(dsn, min_size=1, max_size=4, timeout=2,
                                         command_timeout=3, max_inactive_connection_lifetime=60)

    async def close(pool: asyncpg.Pool) -> None:
        pool.terminate()  # close() would wait for a dead server

    async def ping(pool: asyncpg.Pool) -> Any:
        return await pool.fetchval("SELECT 1")

    return Link(name, dsn, connect, close, ping, up, backoff_max=retry_max)


def redis_link(url: str, up: Gauge, retry_max: float = 5.0,
               name: str = "redis") -> Link[aioredis.Redis]:
    async def connect() -> aioredis.Redis:
        # No library retries: the link's own backoff decides; socket_timeout must exceed the
        # XREADGROUP block time (1 s).
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5,
                                         retry=Retry(NoBackoff(), 0))
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def close(client: aioredis.Redis) -> None:
        await client.aclose()

    async def ping(client: aioredis.Redis) -> Any:
        return await client.ping()

    return Link(name, url, connect, close, ping, up, backoff_max=retry_max)
