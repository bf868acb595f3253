"""Copying bytes both ways between two streams: the last step of most protocol plugins.

Between a plain socket and a tunnel stream (the TCP forward, SOCKS, the TCP plugin), the pump
reads and writes the socket with one ``os.read`` / ``os.write`` on its descriptor once trio
said it is ready, and hands the tunnel stream what its credit takes without waiting: trio's
``receive_some`` / ``send_all`` add a scheduler pass to every call (their checkpoint), three
per request and side of a small request/response exchange (docs/performance.md, "Splice").
A socket that is not ready, or a stream without credit, falls back to trio's calls.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._sockio import plain_socket, read_now, write_now
from ._stream import TunnelStream

#: Large reads keep the per-byte Python overhead low on bulk transfers; the mux cuts frames.
SPLICE_CHUNK = 256 * 1024

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

#: The pump task's name (given, so that trio does not format one per stream).
_PUMP = "backchannel splice"
#: With a ``moved`` callback, writes that must wait go out in pieces of this size, calling it
#: after each: one 256 KiB read could take longer than an idle timeout to drain to a slow reader.
MOVED_SLICE = 16 * 1024


async def splice_streams(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    a_name: str = "a",
    b_name: str = "b",
    a_first: bytes = b"",
    b_first: bytes = b"",
    moved: Callable[[], None] | None = None,
) -> str | None:
    """Copy ``a`` to ``b`` and ``b`` to ``a`` until both directions have ended.

    ``a_first`` is sent to ``b`` before anything read from ``a`` (bytes a parser already took
    from ``a``), ``b_first`` likewise to ``a``. Each direction forwards end-of-stream as a
    half-close where the destination supports it (TLS cannot: that direction then stays open
    until the other ends). If one side breaks, the other direction is cancelled and the broken
    side's name is returned; None means both directions ended cleanly. Neither stream is closed.

    ``moved``, if given, is called whenever bytes move either way: after every read and after
    every :data:`MOVED_SLICE` bytes written (so that a slow but steady reader counts as
    traffic), also when the tunnel's reader writes straight into a waiting splice's socket. An
    idle timer pushes its deadline back there.
    """
    broken: list[str] = []
    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope
        nursery.start_soon(_pump, a, b, a_first, a_name, b_name, broken, scope, moved, name=_PUMP)
        # The other direction in this task: one task less per stream (idle streams' memory).
        await _pump(b, a, b_first, b_name, a_name, broken, scope, moved)
    return broken[0] if broken else None


async def _pump(
    source: trio.abc.ReceiveStream,
    destination: trio.abc.SendStream,
    first: bytes,
    source_name: str,
    destination_name: str,
    broken: list[str],
    scope: trio.CancelScope,
    moved: Callable[[], None] | None,
) -> None:
    side = destination_name
    # An idle socket is waited on with wait_readable alone, not under receive_some → recv →
    # the non-blocking helper: the coroutine frames of that chain are held for as long as the
    # stream is idle (about 1.5 KiB per stream and side, docs/performance.md). After a full
    # read more is likely waiting: a checkpoint (other tasks run), then straight to the read.
    source_socket = plain_socket(source)
    destination_socket = plain_socket(destination)
    tunnel_destination = destination if isinstance(destination, TunnelStream) else None
    tunnel_source = source if isinstance(source, TunnelStream) else None
    try:
        if first:
            await _send_rest(destination, first, moved)
        full = False
        data: bytes | bytearray
        while True:
            side = source_name
            if source_socket is not None:
                if full:
                    await trio.lowlevel.checkpoint()
                elif source_socket.fileno() < 0:
                    raise trio.ClosedResourceError("the socket was closed")
                else:
                    await trio.lowlevel.wait_readable(source_socket)
                try:
                    data = read_now(source_socket, SPLICE_CHUNK)
                except BlockingIOError:  # readiness without data (it happens): wait again
                    full = False
                    continue
            elif tunnel_source is not None and destination_socket is not None:
                # What arrives while we wait with nothing buffered goes to the socket from the
                # tunnel's reader (no wake-up of this task); we get only what the socket did
                # not take (everything once it was closed), the end, or an error. Set here,
                # not in a helper coroutine: an idle stream would hold that frame too.
                # With `moved`, the reader calls it too: (socket, moved); else the socket alone
                # (an idle stream holds no tuple).
                tunnel_source._sink = (
                    destination_socket if moved is None else (destination_socket, moved)
                )
                try:
                    data = await tunnel_source.receive_some(SPLICE_CHUNK)
                finally:
                    tunnel_source._sink = None
            else:
                data = await source.receive_some(SPLICE_CHUNK)
            if not data:
                break
            if moved is not None:
                moved()
            full = len(data) == SPLICE_CHUNK
            side = destination_name
            # Every pass through the loop has a checkpoint above (the read): what the
            # destination takes without waiting is handed over without another one.
            if destination_socket is not None:
                sent = write_now(destination_socket, data)
            elif tunnel_destination is not None:
                sent = tunnel_destination._send_now(data)
            else:
                sent = 0
            if sent < len(data):  # (all of it taken at once: the read's `moved` stands)
                await _send_rest(destination, memoryview(data)[sent:] if sent else data, moved)
        side = destination_name
        if isinstance(destination, trio.abc.HalfCloseableStream):
            await destination.send_eof()
    except _BROKEN:
        broken.append(side)
        scope.cancel()


async def _send_rest(
    destination: trio.abc.SendStream,
    data: bytes | bytearray | memoryview,
    moved: Callable[[], None] | None,
) -> None:
    """``send_all``; with ``moved``, in :data:`MOVED_SLICE` pieces, calling it after each."""
    if moved is None:
        await destination.send_all(data)
        return
    view = memoryview(data)
    for start in range(0, len(view), MOVED_SLICE):
        await destination.send_all(view[start : start + MOVED_SLICE])
        moved()
