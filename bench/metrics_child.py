"""A bench child that serves a fixed Prometheus exposition of about 50 series on one port.

Run as `python3 -S metrics_child.py PORT`. Deliberately tiny (socket only, one connection at a
time) so 200 of them cost little CPU and memory.
"""

import socket
import sys


def exposition() -> bytes:
    lines = ["# HELP bench_requests_total Requests served, by route.",
             "# TYPE bench_requests_total counter"]
    lines += [f'bench_requests_total{{route="/r{i}"}} {i * 7}' for i in range(25)]
    lines += ["# HELP bench_queue_depth Items waiting, by queue.",
              "# TYPE bench_queue_depth gauge"]
    lines += [f'bench_queue_depth{{queue="q{i}"}} {i}' for i in range(25)]
    body = ("\n".join(lines) + "\n").encode()
    head = ("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def main() -> None:
    response = exposition()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[1])))
    server.listen(64)
    while True:
        conn, _ = server.accept()
        try:
            conn.settimeout(2.0)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(response)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
