"""HTTP load generator, in its own process: ``python -m bench.http_load``.

Opens ``--connections`` kept-alive connections and keeps one GET in flight on each (closed
loop: the next request goes out as soon as the response is complete), either straight to a
server (origin-form) or through an HTTP forward proxy (absolute-form ``http://<virtual>/path``
with ``Proxy-Authorization: Basic``). Once connected it prints ``{"ready": true}`` and reads
``FROM UNTIL`` from stdin (``time.monotonic()`` values, the same clock in every process on
Linux; or give ``--window FROM UNTIL``), so all load processes of a case share one window. It
records the latency of every response completed in ``[FROM, UNTIL)``; what completes before is
warm-up, and it stops at UNTIL.

``--header-file`` adds the lines of a file (``Name: value``) to every request, e.g. a user's
``SAP-Connectivity-Authentication: Bearer <JWT>`` (kept out of the command line).
``--new-connection`` sends ``Connection: close`` and opens a fresh connection for every
request (timed from the connect), so that each request also opens a new tunnel stream.

A single-threaded ``epoll`` loop over non-blocking sockets with a minimal response parser
(status line, Content-Length; the body is counted, not kept), so the client costs little CPU per
request. Latencies (ns, int64) go to ``--latencies-out``; one JSON line on stdout sums up.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import socket
import sys
import time
from array import array
from collections.abc import Sequence

RECV_SIZE = 256 * 1024
_EPOLLIN = select.EPOLLIN


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_request(
    path: str,
    port: int,
    proxy_target: str | None,
    credentials: str | None,
    extra: Sequence[str] = (),
) -> bytes:
    """The request bytes, sent unchanged on every round; ``extra`` are more header lines."""
    if proxy_target is None:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    else:
        lines = [f"GET http://{proxy_target}{path} HTTP/1.1", f"Host: {proxy_target}"]
    if proxy_target is not None and credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_header_file(path: str) -> list[str]:
    """The ``Name: value`` lines of ``path`` (blank lines skipped)."""
    with open(path, encoding="utf-8") as lines:
        headers = [line.strip() for line in lines if line.strip()]
    for line in headers:
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip():
            raise SystemExit(f"{path}: not a 'Name: value' header line: {line[:40]!r}")
    return headers


class _Conn:
    __slots__ = ("body_left", "head", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()  # response head bytes so far (empty once the head is parsed)
        self.body_left = -1  # -1: still reading the head
        self.sent_at = 0


class LoadError(Exception):
    """A response was not a 200, or a connection broke."""


class Load:
    """The closed-loop client."""

    def __init__(
        self, port: int, connections: int, request: bytes, *, new_connection: bool = False
    ) -> None:
        self.port = port
        self.request = request
        self.new_connection = new_connection
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.errors: list[str] = []
        self.error_count = 0
        self.completed = 0
        self.warm_up_completed = 0
        self.latencies = array("q")
        for _ in range(connections):
            self._open()

    def _open(self) -> _Conn:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), _EPOLLIN)
        return conn

    def _send(self, conn: _Conn, started: int | None = None) -> None:
        conn.head.clear()
        conn.body_left = -1
        conn.sent_at = time.monotonic_ns() if started is None else started
        if conn.sock.send(self.request) != len(self.request):
            raise LoadError("a request did not fit into the socket buffer")

    def _note(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(message)

    def _fail(self, conn: _Conn, message: str) -> None:
        self._note(message)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return  # closed already (a new connection for the next request failed to open)
        self.conns.pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()

    def _received(self, conn: _Conn, data: bytes) -> bool:
        """Feed bytes; True when the response is complete."""
        if conn.body_left < 0:
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(conn.head[:end]).lower()
            if not head.startswith(b"http/1.1 200 "):
                raise LoadError(f"response {bytes(conn.head[:end]).splitlines()[0]!r}")
            start = head.find(b"\r\ncontent-length:")
            if start < 0:
                raise LoadError("response without Content-Length")
            stop = head.find(b"\r\n", start + 2)
            length = int(head[start + 17 : stop if stop > 0 else len(head)])
            conn.body_left = length - (len(conn.head) - end - 4)
        else:
            conn.body_left -= len(data)
        if conn.body_left < 0:
            raise LoadError("more bytes than Content-Length")
        return conn.body_left == 0

    def run(self, measure_from: float, until: float) -> dict[str, float]:
        """Run until ``until``; returns the CPU seconds and wall time of the measured window."""
        start_ns = int(measure_from * 1e9)
        until_ns = int(until * 1e9)
        cpu_start: float | None = None
        wall_start = 0.0
        for conn in list(self.conns.values()):
            self._send(conn)
        conns = self.conns
        latencies = self.latencies
        while True:
            now = time.monotonic()
            if cpu_start is None and now >= measure_from:
                cpu_start, wall_start = _cpu_seconds(), now
            if now >= until:
                break
            if not conns:
                raise LoadError("every connection failed: " + "; ".join(self.errors))
            for fd, _ in self.epoll.poll(min(0.05, until - now)):
                found = conns.get(fd)
                if found is None:
                    continue
                conn = found
                try:
                    data = conn.sock.recv(RECV_SIZE)
                    if not data:
                        raise LoadError("the server closed a kept-alive connection")
                    if not self._received(conn, data):
                        continue
                    done = time.monotonic_ns()
                    if done >= start_ns:
                        if done >= until_ns:
                            continue  # past the window: leave this connection idle
                        latencies.append(done - conn.sent_at)
                    else:
                        self.warm_up_completed += 1
                    if self.new_connection:
                        self._close(conn)
                        started = time.monotonic_ns()
                        self._send(self._open(), started)
                    else:
                        self._send(conn)
                except (LoadError, OSError) as exc:
                    self._fail(conn, str(exc))
                    try:
                        self._send(self._open())
                    except (LoadError, OSError) as reconnect:
                        self._note(f"reconnect failed: {reconnect}")
        end = time.monotonic()
        if cpu_start is None:
            cpu_start, wall_start = _cpu_seconds(), end
        return {"cpu_seconds": _cpu_seconds() - cpu_start, "wall_seconds": end - wall_start}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one load process; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_load")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--path", default="/small")
    parser.add_argument("--proxy-target", help="virtual host:port: absolute-form via a proxy")
    parser.add_argument("--credentials-prefix", help="'subaccount/app' for Proxy-Authorization")
    parser.add_argument("--secret-file", help="file holding the app secret")
    parser.add_argument("--header-file", help="file of 'Name: value' lines added to every request")
    parser.add_argument(
        "--new-connection",
        action="store_true",
        help="'Connection: close' and a fresh connection for every request",
    )
    parser.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("FROM", "UNTIL"),
        help="measured window in time.monotonic() seconds; without it, print a 'ready' line "
        "once connected and read 'FROM UNTIL' from stdin",
    )
    parser.add_argument("--latencies-out", required=True, help="int64 ns, native byte order")
    args = parser.parse_args(argv)
    credentials = None
    if args.credentials_prefix is not None:
        with open(args.secret_file, encoding="utf-8") as secret:
            credentials = f"{args.credentials_prefix}:{secret.read().strip()}"
    extra = read_header_file(args.header_file) if args.header_file else []
    if args.new_connection:
        extra.append("Connection: close")
    request = build_request(args.path, args.port, args.proxy_target, credentials, extra)
    load = Load(args.port, args.connections, request, new_connection=args.new_connection)
    if args.window:
        measure_from, until = args.window
    else:
        print(json.dumps({"ready": True}), flush=True)
        measure_from, until = (float(v) for v in sys.stdin.readline().split())
    window = load.run(measure_from, until)
    with open(args.latencies_out, "wb") as out:
        load.latencies.tofile(out)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "connections": args.connections,
                "completed": len(load.latencies),
                "warm_up_completed": load.warm_up_completed,
                "error_count": load.error_count,
                "errors": load.errors,
                **window,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
