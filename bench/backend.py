"""The benchmark backend, run in its own process: ``python -m bench.backend``.

Three TCP servers on 127.0.0.1 (ephemeral ports, announced as one JSON line on stdout):

- ``sink``: reads until EOF, counting bytes, then answers the count as 8 bytes big-endian.
- ``source``: reads an 8-byte big-endian count N, sends N bytes, then half-closes. N = 0 asks
  whether the path is open end to end: the answer is one byte ``R``, then the next count is read.
- ``hold``: sends one byte ``R`` on accept (so the client knows the path is established end to
  end), then holds the connection until the peer closes it.

It stops on SIGTERM/SIGINT, and when its parent dies (PR_SET_PDEATHSIG set by the launcher, plus
a parent-pid check here as a second line of defence).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys

import trio

CHUNK = 1 << 20
PAYLOAD = os.urandom(CHUNK)
HOLD_BYTE = b"R"


async def _receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise trio.BrokenResourceError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return data


async def _sink(stream: trio.SocketStream) -> None:
    buffer = bytearray(CHUNK)
    total = 0
    try:
        while True:
            count = await stream.socket.recv_into(buffer)
            if not count:
                break
            total += count
        await stream.send_all(struct.pack(">Q", total))
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _source(stream: trio.SocketStream) -> None:
    view = memoryview(PAYLOAD)
    try:
        (remaining,) = struct.unpack(">Q", await _receive_exactly(stream, 8))
        while not remaining:  # a readiness probe
            await stream.send_all(HOLD_BYTE)
            (remaining,) = struct.unpack(">Q", await _receive_exactly(stream, 8))
        while remaining:
            size = min(remaining, CHUNK)
            await stream.send_all(view[:size])
            remaining -= size
        await stream.send_eof()
        with trio.move_on_after(30):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _hold(stream: trio.SocketStream) -> None:
    try:
        await stream.send_all(HOLD_BYTE)
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _watch_parent(scope: trio.CancelScope) -> None:
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110  (no event exists for "parent died")
        await trio.sleep(1)
    scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def main() -> None:
    """Serve until told to stop."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(_watch_parent, nursery.cancel_scope)
        ports = {}
        for name, handler in (("sink", _sink), ("source", _source), ("hold", _hold)):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            ports[name] = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, handler, listeners)
        print(json.dumps({"ports": ports, "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
