"""Stand-in for the platform's api: a bare ASGI app on uvicorn, instrumented by
supervisor.observe.instrument.MetricsMiddleware.

Routes (each is its own `endpoint` label): GET /v1/health, GET /v1/ready, GET /v1/events
(recent events from PostgreSQL), GET /v1/events/{id}, POST /v1/events (submits
`{"type": ..., "payload": {...}}` to the Redis stream that event-writer consumes),
GET /v1/fail?status=500[&delay=0.2][&mode=exception] (fails on demand), GET /metrics.
With PostgreSQL or Redis down the routes that need them answer 503 and /v1/ready says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
import redis.exceptions
from common import (
    Families,
    Reply,
    Route,
    Router,
    Scope,
    Unavailable,
    add_database,
    add_redis,
    dependency_gauge,
    health_routes,
    instrumented,
    main,
    parser,
    query,
    read_body,
    serve,
    setup_logging,
)
from prometheus_client import CollectorRegistry, Counter
from store import MISSING_SCHEMA, postgres_link, redis_link

logger = logging.getLogger("api")
_FAILED = object()  # fetch() already answered the request
STREAM_MAXLEN = 100_000  # approximate cap so an absent event-writer cannot fill Redis


def build(args: Any, registry: CollectorRegistry) -> tuple[Any, list[Any]]:
    up = dependency_gauge(registry)
    pg = postgres_link(args.database_url, up, args.retry_max)
    rd = redis_link(args.redis_url, up, args.retry_max)
    submitted = Families(registry).add(Counter(
        "api_events_submitted", "Events accepted and put on the stream.", registry=None))

    async def fetch(reply: Reply, missing_schema: tuple[int, str], method: str, sql: str,
                    *args: Any) -> Any:
        """Run one query; on failure answer the request and return _FAILED."""
        try:
            return await getattr(pg.get(), method)(sql, *args)
        except Unavailable as exc:
            await reply.json(503, {"error": str(exc)})
        except MISSING_SCHEMA:
            await reply.json(missing_schema[0], {"error": missing_schema[1]})
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                asyncio.TimeoutError) as exc:
            await pg.drop(exc)
            await reply.json(503, {"error": "postgres unavailable"})
        return _FAILED

    async def list_events(scope: Scope, receive: Any, reply: Reply) -> None:
        try:
            limit = max(1, min(100, int(query(scope).get("limit", ["20"])[0])))
        except ValueError:
            await reply.json(400, {"error": "limit must be an integer"})
            return
        rows = await fetch(reply, (503, "event store not initialised"), "fetch",
                           "SELECT id, kind, payload, created_at FROM events "
                           "ORDER BY id DESC LIMIT $1", limit)
        if rows is not _FAILED:
            await reply.json(200, {"events": [_row(r) for r in rows]})

    async def get_event(scope: Scope, receive: Any, reply: Reply) -> None:
        try:
            event_id = int(scope["path_params"]["id"])
        except ValueError:
            await reply.json(400, {"error": "id must be an integer"})
            return
        row = await fetch(reply, (404, "no such event"), "fetchrow",
                          "SELECT id, kind, payload, created_at FROM events WHERE id = $1",
                          event_id)
        if row is _FAILED:
            return
        if row is None:
            await reply.json(404, {"error": "no such event"})
        else:
            await reply.json(200, _row(row))

    async def submit(scope: Scope, receive: Any, reply: Reply) -> None:
        try:
            event = json.loads(await read_body(receive))
        except (ValueError, UnicodeDecodeError):
            await reply.json(400, {"error": "expected a JSON object under 64 KiB"})
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await reply.json(422, {"error": 'expected {"type": str, "payload": object}'})
            return
        entry = json.dumps({"type": event["type"][:100], "payload": event.get("payload", {})})
        try:
            stream_id = await rd.get().xadd(args.stream, {"event": entry},
                                            maxlen=STREAM_MAXLEN, approximate=True)
        except Unavailable as exc:
            await reply.json(503, {"error": str(exc)})
            return
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            await rd.drop(exc)
            await reply.json(503, {"error": "redis unavailable"})
            return
        submitted.inc()
        await reply.json(202, {"stream_id": stream_id.decode()})

    async def fail(scope: Scope, receive: Any, reply: Reply) -> None:
        params = query(scope)
        try:
            status = int(params.get("status", ["500"])[0])
            delay = float(params.get("delay", ["0"])[0])
        except ValueError:
            await reply.json(400, {"error": "status and delay must be numbers"})
            return
        if not 400 <= status <= 599:
            await reply.json(400, {"error": "status must be 400..599"})
            return
        await asyncio.sleep(max(0.0, min(delay, 5.0)))
        if params.get("mode", [""])[0] == "exception":
            raise RuntimeError("failing on demand")  # the server answers 500
        await reply.json(status, {"error": "failing on demand", "status": status})

    routes = [
        *health_routes([pg, rd]),
        Route("GET", "/v1/events", list_events),
        Route("GET", "/v1/events/{id}", get_event),
        Route("POST", "/v1/events", submit),
        Route("GET", "/v1/fail", fail),
    ]
    app = instrumented(Router(routes, registry), registry)
    return app, [pg, rd]


def _row(row: Any) -> dict[str, Any]:
    payload = row["payload"]
    return {"id": row["id"], "type": row["kind"],
            "payload": json.loads(payload) if isinstance(payload, str) else payload,
            "created_at": row["created_at"].isoformat()}


async def run() -> int:
    p = parser("api", 8081)
    add_database(p)
    add_redis(p)
    args = p.parse_args()
    setup_logging("api", args.log_level)
    registry = CollectorRegistry()
    app, links = build(args, registry)
    return await serve(app, args.listen, [link.run for link in links],
                       [link.aclose for link in links])


if __name__ == "__main__":
    main(run)
