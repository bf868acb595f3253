"""The HTTP benchmark backend, in its own process: ``python -m bench.http_backend``.

One HTTP/1.1 server on 127.0.0.1 (ephemeral port, announced as one JSON line on stdout):

- ``GET /small``: 200 with a 1 KiB body.
- ``GET /big``: 200 with ``--big-mib`` MiB (``/big?mib=N`` for N MiB), Content-Length framed.
- anything else: 404 (a method other than GET/HEAD: 405).

Connections are kept alive (HTTP/1.1 default; ``Connection: close`` and HTTP/1.0 are honoured),
pipelined requests are answered in order, request bodies with Content-Length are read and
discarded (a chunked request body gets 501 and the connection is closed).

It is a single-threaded ``epoll`` loop over non-blocking sockets with a minimal parser and
pre-built responses, not h11 + trio: the direct baseline should measure loopback and the client,
not this server's per-request overhead (it is also the backend behind the tunnel, so a cheap
server leaves more CPU to the gateway and connector on a small machine).

It stops on SIGTERM/SIGINT and when its parent dies (PR_SET_PDEATHSIG from the launcher, plus a
parent-pid check here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from urllib.parse import parse_qs

MIB = 1 << 20
SMALL_BODY = bytes(range(256)) * 4  # 1 KiB
PAYLOAD = memoryview(os.urandom(4 * MIB))
RECV_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_HANGUP = select.EPOLLERR | select.EPOLLHUP


def _head(
    status: str, length: int, close: bool, content_type: str = "application/octet-stream"
) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        f"HTTP/1.1 {status}\r\nServer: bench-http-backend\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n".encode()
        + connection
        + b"\r\n"
    )


SMALL = {close: _head("200 OK", len(SMALL_BODY), close) + SMALL_BODY for close in (False, True)}


def _error(status: str, close: bool) -> bytes:
    text = status.encode() + b"\n"
    return _head(status, len(text), close, "text/plain") + text


class Connection:
    """One client connection: bytes in, responses out, in request order."""

    __slots__ = ("big_left", "body_left", "closing", "inbuf", "out", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out: list[memoryview] = []
        self.big_left = 0  # payload bytes still to generate for a /big response
        self.body_left = 0  # request body bytes still to discard
        self.closing = False  # close once the output is flushed
        self.writing = False  # registered for EPOLLOUT


class Server:
    """The epoll loop."""

    def __init__(self, listener: socket.socket, big_mib: int) -> None:
        self.listener = listener
        self.big_bytes = big_mib * MIB
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.epoll.register(listener.fileno(), _EPOLLIN)
        self.running = True

    # -- requests

    def _respond(self, conn: Connection, head: bytes) -> None:
        """Parse one request head (without the blank line) and queue its response."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            conn.out.append(memoryview(_error("400 Bad Request", True)))
            conn.closing = True
            return
        method, target, version = parts
        keep_alive = version == b"HTTP/1.1"
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip() or b"0")
            elif name == b"transfer-encoding":
                conn.out.append(memoryview(_error("501 Not Implemented", True)))
                conn.closing = True
                return
            elif name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        conn.body_left = length
        close = not keep_alive
        conn.closing = close
        path, _, query = target.partition(b"?")
        if method not in (b"GET", b"HEAD"):
            conn.out.append(memoryview(_error("405 Method Not Allowed", close)))
        elif path == b"/small":
            response = SMALL[close]
            if method == b"HEAD":
                response = response[: len(response) - len(SMALL_BODY)]
            conn.out.append(memoryview(response))
        elif path == b"/big":
            size = self.big_bytes
            if query:
                values = parse_qs(query.decode("latin-1"))
                if "mib" in values:
                    size = int(values["mib"][0]) * MIB
                elif "bytes" in values:
                    size = int(values["bytes"][0])
            conn.out.append(memoryview(_head("200 OK", size, close)))
            conn.big_left = 0 if method == b"HEAD" else size
        else:
            conn.out.append(memoryview(_error("404 Not Found", close)))

    def _process(self, conn: Connection) -> None:
        """Answer buffered requests while nothing is waiting to be sent (keeps them in order)."""
        while not conn.out and not conn.big_left and not conn.closing:
            if conn.body_left:
                drop = min(conn.body_left, len(conn.inbuf))
                del conn.inbuf[:drop]
                conn.body_left -= drop
                if conn.body_left:
                    return
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > MAX_HEAD:
                    conn.out.append(memoryview(_error("431 Request Header Fields Too Large", True)))
                    conn.closing = True
                return
            head = bytes(conn.inbuf[:end])
            del conn.inbuf[: end + 4]
            try:
                self._respond(conn, head)
            except (ValueError, UnicodeDecodeError):
                conn.out.append(memoryview(_error("400 Bad Request", True)))
                conn.closing = True
            self._flush(conn)
            if conn.sock.fileno() < 0:
                return

    def _flush(self, conn: Connection) -> None:
        """Send what is queued until the socket is full; close if asked and done."""
        sock = conn.sock
        try:
            while True:
                if conn.out:
                    view = conn.out[0]
                    sent = sock.send(view)
                    if sent == len(view):
                        conn.out.pop(0)
                    else:
                        conn.out[0] = view[sent:]
                        break
                elif conn.big_left:
                    size = min(conn.big_left, len(PAYLOAD))
                    sent = sock.send(PAYLOAD[:size])
                    conn.big_left -= sent
                    if sent < size:
                        break
                else:
                    break
        except BlockingIOError:
            pass
        except OSError:
            self._close(conn)
            return
        pending = bool(conn.out or conn.big_left)
        if not pending and conn.closing:
            self._close(conn)
            return
        if pending != conn.writing:
            conn.writing = pending
            self.epoll.modify(sock.fileno(), _EPOLLIN | _EPOLLOUT if pending else _EPOLLIN)

    def _close(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self.conns.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
            conn.sock.close()

    # -- the loop

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock)
            self.conns[sock.fileno()] = conn
            self.epoll.register(sock.fileno(), _EPOLLIN)

    def _readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        self._process(conn)

    def run(self) -> None:
        """Serve until :attr:`running` is cleared or the parent goes away."""
        listen_fd = self.listener.fileno()
        parent = os.getppid()
        next_check = time.monotonic() + 1
        while self.running:
            for fd, events in self.epoll.poll(1.0):
                if fd == listen_fd:
                    self._accept()
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if events & _EPOLLOUT:
                    self._flush(conn)
                    if conn.sock.fileno() < 0:
                        continue
                    if not conn.writing:
                        self._process(conn)
                        if conn.sock.fileno() < 0:
                            continue
                if events & (_EPOLLIN | _HANGUP):
                    self._readable(conn)
            now = time.monotonic()
            if now > next_check:
                next_check = now + 1
                if os.getppid() != parent:
                    return


def main(argv: Sequence[str] | None = None) -> int:
    """Listen, announce the port, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_backend")
    parser.add_argument("--big-mib", type=int, default=256, help="size of GET /big in MiB")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    listener.setblocking(False)
    server = Server(listener, args.big_mib)

    def stop(signum: int, frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    port = listener.getsockname()[1]
    print(json.dumps({"ports": {"http": port}, "pid": os.getpid()}), flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
