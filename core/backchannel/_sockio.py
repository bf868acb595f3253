"""Plain-socket writes without a scheduler pass (the splice and the tunnel stream's sink)."""

from __future__ import annotations

import os
import sys

import trio


def socket_descriptor(stream: object) -> int | None:
    """The descriptor of a plain trio socket stream (POSIX), else None."""
    if isinstance(stream, trio.SocketStream) and sys.platform != "win32":
        return stream.socket.fileno()
    return None


def write_now(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write what the socket ``fd`` takes without waiting; how much that was. Raises OSError
    (e.g. BrokenPipeError) like a socket send."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
