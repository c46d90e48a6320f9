"""Calibration for the HTTP part: the daemon's own server (supervisor.web.http.serve) serving
precomputed bytes, so no rendering, no readiness snapshot and no daemon competing for the GIL.

`python http_floor_server.py PORT BODY_FILE`: GET /v1/metrics returns BODY_FILE's bytes,
GET /v1/ready a small fixed JSON. Latency against this is the floor set by the bench's clients,
the server and the transport; the daemon's excess over it is its own work.
"""

import sys

from supervisor.web.http import serve


def main() -> None:
    port, body_file = int(sys.argv[1]), sys.argv[2]
    with open(body_file, "rb") as f:
        metrics = f.read()
    ready = b'{"status":"ready","checks":{}}'

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        if environ.get("PATH_INFO") == "/v1/metrics":
            body, kind = metrics, "text/plain; version=0.0.4; charset=utf-8"
        else:
            body, kind = ready, "application/json"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    _, thread = serve("127.0.0.1", port, app, inline_paths=("/v1/ready",))
    thread.join()


if __name__ == "__main__":
    main()
