"""Copying bytes both ways between two streams: the last step of most protocol plugins.

Between a plain socket and a tunnel stream (the TCP forward, SOCKS, the TCP plugin), the pump
reads and writes the socket with one ``os.read`` / ``os.write`` on its descriptor once trio
said it is ready, and hands the tunnel stream what its credit takes without waiting: trio's
``receive_some`` / ``send_all`` add a scheduler pass to every call (their checkpoint), three
per request and side of a small request/response exchange (docs/performance.md, "Splice").
A socket that is not ready, or a stream without credit, falls back to trio's calls.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from ._sockio import plain_socket, read_now, write_now
from ._stream import Sink, TunnelStream

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

    Between a tunnel stream and a plain socket the splice runs one task: the tunnel's reader
    writes to the socket and half-closes it itself, and a second task runs only while the
    socket cannot take what came. So when the splice is cancelled, what the tunnel delivers
    before its task has unwound (the same scheduler pass) may still be written to the socket,
    and a FIN then half-closes it; nothing is lost or reordered (what is not written stays in
    the stream).
    """
    broken: list[str] = []
    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope
        # A direction from a tunnel stream into a plain socket needs no task while the
        # tunnel's reader can write what arrives straight to the socket: it stands by, and a
        # task is started only for what the socket does not take (memory per idle stream, CPU
        # per new stream: docs/performance.md, "Per-stream cost", item 9).
        standby = None
        if not a_first:
            standby = _Standby.arm(a, b, (a_name, b_name), broken, scope, moved, nursery)
        if standby is None and not b_first:
            standby = _Standby.arm(b, a, (b_name, a_name), broken, scope, moved, nursery)
        if standby is None:
            nursery.start_soon(
                _pump, a, b, a_first, a_name, b_name, broken, scope, moved, name=_PUMP
            )
            # The other direction in this task: one task less per stream.
            await _pump(b, a, b_first, b_name, a_name, broken, scope, moved)
        elif standby.source is a:
            await standby.run_beside(_pump(b, a, b_first, b_name, a_name, broken, scope, moved))
        else:
            await standby.run_beside(_pump(a, b, a_first, a_name, b_name, broken, scope, moved))
    return broken[0] if broken else None


class _Standby:
    """The direction of a splice from a tunnel stream into a plain socket, run without a task
    of its own: the tunnel's reader writes what arrives to the socket (the stream's sink), and
    half-closes the socket at the peer's FIN. What the sink cannot do (data the socket did not
    take, an error, a close) starts the usual pump task; when the splice's task is done with
    the other direction first, it runs this one itself."""

    __slots__ = (
        "_broken",
        "_context",
        "_destination",
        "_moved",
        "_names",
        "_nursery",
        "_scope",
        "source",
    )

    def __init__(
        self,
        source: TunnelStream,
        destination: trio.SocketStream,
        names: tuple[str, str],
        broken: list[str],
        scope: trio.CancelScope,
        moved: Callable[[], None] | None,
        nursery: trio.Nursery,
    ) -> None:
        self.source = source
        self._destination = destination
        self._names = names
        self._broken = broken
        self._scope = scope
        self._moved = moved
        self._nursery = nursery
        #: The splice's task's context variables, for the task :meth:`start` starts from the
        #: tunnel's reader (trio gives a task a copy of its spawner's context).
        self._context = contextvars.copy_context()

    @classmethod
    def arm(
        cls,
        source: trio.abc.Stream,
        destination: trio.abc.Stream,
        names: tuple[str, str],
        broken: list[str],
        scope: trio.CancelScope,
        moved: Callable[[], None] | None,
        nursery: trio.Nursery,
    ) -> _Standby | None:
        """A standby for ``source`` → ``destination`` (``names`` in that order), if that
        direction can have one now; None leaves everything as it was."""
        sock = plain_socket(destination)
        if not isinstance(source, TunnelStream) or sock is None:
            return None
        assert isinstance(destination, trio.SocketStream)
        standby = cls(source, destination, names, broken, scope, moved, nursery)
        sink: Sink = sock if moved is None else (sock, moved)
        if not source._stand_by(standby, sink):
            return None
        return standby

    def _pump(self) -> Coroutine[Any, Any, None]:
        source_name, destination_name = self._names
        return _pump(
            self.source,
            self._destination,
            b"",
            source_name,
            destination_name,
            self._broken,
            self._scope,
            self._moved,
        )

    def start(self) -> None:
        """The sink could not take something: the usual pump task takes over for the rest of
        the splice. (Handing the direction back once the stream is idle again churned: under
        bulk load every frame the socket could not take started a task, and bulk MB/s fell
        by 5-15%, docs/performance.md.)"""
        self._context.run(self._spawn)

    def _spawn(self) -> None:
        self._nursery.start_soon(self._pump, name=_PUMP)

    def end(self) -> None:
        """The peer's FIN, nothing buffered: half-close the socket here (what trio's
        ``send_eof`` of a socket stream does, without its checkpoint); the direction is done."""
        sock = self._destination.socket
        try:
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("the socket was closed")
            if not sock.did_shutdown_SHUT_WR:
                sock.shutdown(socket.SHUT_WR)
        except _BROKEN:
            self._broken.append(self._names[1])
            self._scope.cancel()

    async def run_beside(self, other: Coroutine[Any, Any, None]) -> None:
        """Run ``other`` (the opposite direction) in this task; then, if this direction still
        stands by, run it here too."""
        try:
            await other
        finally:
            idle = self.source._standby is self
            if idle:
                self.source._release_standby()
        if idle and not self._broken:
            await self._pump()


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
