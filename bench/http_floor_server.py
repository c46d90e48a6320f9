"""Calibration for the HTTP part: the same server class as the daemon's (prometheus_client's
ThreadingWSGIServer) serving precomputed bytes, so no rendering happens.

`python http_floor_server.py PORT BODY_FILE`: GET /v1/metrics returns BODY_FILE's bytes,
GET /v1/ready a small fixed JSON. Latency against this is the floor set by the bench's clients,
the thread-per-connection server and the transport; the daemon's excess over it is its own work.
"""

import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


def main() -> None:
    port, body_file = int(sys.argv[1]), sys.argv[2]
    with open(body_file, "rb") as f:
        metrics = f.read()
    ready = b'{"status":"ready","checks":{}}'

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/v1/metrics":
            body, kind = metrics, "text/plain; version=0.0.4; charset=utf-8"
        else:
            body, kind = ready, "application/json"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    ThreadingWSGIServer.request_queue_size = 128
    ThreadingWSGIServer.daemon_threads = True
    server = make_server("127.0.0.1", port, app, ThreadingWSGIServer,
                         handler_class=QuietHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
