"""Plain-socket reads and writes without a scheduler pass (the splice and the tunnel stream's
sink).

They go through the socket's descriptor, looked up on every call: a socket closed meanwhile
(its number possibly reused by another connection) raises ``trio.ClosedResourceError`` as
trio's own calls do, and is never read or written through its old number.
"""

from __future__ import annotations

import os
import sys

import trio


def plain_socket(stream: object) -> trio.socket.SocketType | None:
    """The socket of a plain trio socket stream (POSIX), else None."""
    if isinstance(stream, trio.SocketStream) and sys.platform != "win32":
        return stream.socket
    return None


def _descriptor(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    return fd


def read_now(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Read what the socket has (b"" at its end); BlockingIOError if nothing. Raises OSError
    like a socket receive, ClosedResourceError if the socket was closed."""
    return os.read(_descriptor(sock), max_bytes)


def write_now(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> int:
    """Write what the socket takes without waiting; how much that was. Raises OSError (e.g.
    BrokenPipeError) like a socket send, ClosedResourceError if the socket was closed."""
    try:
        return os.write(_descriptor(sock), data)
    except BlockingIOError:
        return 0


async def close_forcefully(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` at once, like :func:`trio.aclose_forcefully`; a plain trio socket
    stream is closed directly, without that function's cancelled scope (a ``Cancelled``
    raised and caught and a scheduler pass, about a tenth of the CPU of a short TCP forward
    connection, docs/performance.md) and without a checkpoint."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)
