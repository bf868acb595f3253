"""Review of the splice's direct socket path (9940e36) and the tunnel stream's sink (92da70d).

Real sockets on 127.0.0.1 (port 0), the in-memory tunnel pair. Two were written failing, for
the defect the review found (a socket closed during a splice was still read and written through
its descriptor number, which another connection may reuse); they pass since the fix. The others
pin down what the review checked and found correct.
"""

from __future__ import annotations

import fcntl
import os
import socket as socket_module
import struct
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from backchannel import _splice as backchannel_splice
from backchannel import _stream as backchannel_stream
from backchannel import splice_streams
from backchannel._proto._mux import MuxSettings
from backchannel._sockio import write_now
from backchannel._stream import TunnelStream
from backchannel._tunnel import TunnelSettings

from .test_splice_direct import GUARD, read_all, receive_exactly, socket_pair
from .tunnel_pair import tunnel_pair


@asynccontextmanager
async def pending_connection() -> AsyncIterator[tuple[trio.SocketListener, trio.SocketStream]]:
    """A listener and a client whose connection waits in the backlog: ``listener.accept()``
    later creates the server's socket (taking the lowest free descriptor at that moment)."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            yield listener, client


def nothing_readable(stream: trio.SocketStream) -> bytes:
    """What has arrived on ``stream`` (b"" when nothing), without waiting."""
    try:
        return os.read(stream.socket.fileno(), 1 << 20)  # trio's sockets do not block
    except BlockingIOError:
        return b""


def readable_bytes(stream: trio.SocketStream) -> int:
    """How many received bytes wait in the socket's buffer (FIONREAD)."""
    answer = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, bytes(4))
    return int(struct.unpack("i", answer)[0])


def sink_of(stream: TunnelStream) -> trio.socket.SocketType | None:
    """The socket the tunnel's reader writes to for ``stream`` now (None: none)."""
    sink = stream._sink
    return sink[0] if isinstance(sink, tuple) else sink


# --------------------------------------------------------------------------- stale descriptors


async def close_and_reuse(a: trio.SocketStream, listener: trio.SocketListener) -> trio.abc.Stream:
    """Close ``a`` (as a plugin's own timeout might) and accept a new connection that gets its
    descriptor number (the lowest free one)."""
    number = a.socket.fileno()
    await a.aclose()
    stranger = await listener.accept()
    assert isinstance(stranger, trio.SocketStream)
    assert stranger.socket.fileno() == number
    return stranger


async def test_a_socket_closed_during_the_splice_never_gets_data_through_its_old_number() -> None:
    """trio's contract: closing a stream that another task uses makes that task's call raise
    ClosedResourceError. The splice must end (naming the closed side) and nothing meant for
    the closed socket may reach the connection that took its descriptor number."""
    with trio.fail_after(GUARD):
        async with (
            tunnel_pair() as pair,
            socket_pair() as (client, a),
            pending_connection() as (listener, stranger_client),
        ):
            opener, acceptor = await pair.open_pair()
            outcome: list[str | None] = []

            async def run_splice() -> None:
                outcome.append(await splice_streams(a, acceptor, a_name="a", b_name="tunnel"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_splice)
                # a → tunnel ends; tunnel → a waits on the tunnel stream (its sink set).
                await client.send_eof()
                assert await read_all(opener) == b""
                await trio.testing.wait_all_tasks_blocked()
                async with await close_and_reuse(a, listener):
                    await opener.send_all(b"meant for the closed socket")
                    await trio.testing.wait_all_tasks_blocked()
                    leaked = nothing_readable(stranger_client)
                    nursery.cancel_scope.cancel()
            assert leaked == b""
            assert outcome == ["a"]


async def test_a_socket_closed_during_the_splice_is_never_read_through_its_old_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other direction: after a full read the splice reads again without waiting for
    readiness. A socket closed while the splice waited for credit must end the splice, not
    feed another connection's bytes into the tunnel."""
    chunk = 4096
    monkeypatch.setattr(backchannel_splice, "SPLICE_CHUNK", chunk)  # full reads are easy
    window = 16 * chunk
    settings = TunnelSettings(mux=MuxSettings(initial_window=window, max_window=window))
    payload = os.urandom(window + 2 * chunk)
    with trio.fail_after(GUARD):
        async with (
            tunnel_pair(settings, settings) as pair,
            socket_pair() as (client, a),
            pending_connection() as (listener, stranger_client),
        ):
            opener, acceptor = await pair.open_pair()
            await client.send_all(payload)
            await trio.lowlevel.wait_readable(a.socket)
            # All of it waits in a's buffer: every read of the splice is a full one.
            assert readable_bytes(a) == len(payload)
            outcome: list[object] = []

            async def run_splice() -> None:
                try:
                    outcome.append(await splice_streams(a, opener, a_name="a", b_name="tunnel"))
                except Exception as exc:  # (the reviewed code also fails after the leak)
                    outcome.append(exc)

            received = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_splice)
                await trio.testing.wait_all_tasks_blocked()
                # One window went out; the splice holds a full read and waits for credit.
                assert acceptor.buffered == window
                async with await close_and_reuse(a, listener):
                    await stranger_client.send_all(b"SECRET of another connection")

                    async def drain() -> None:
                        while data := await acceptor.receive_some(1 << 20):
                            received.extend(data)

                    nursery.start_soon(drain)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
            assert b"SECRET" not in received
            assert outcome == ["a"]


# --------------------------------------------------------------------------- checked, correct


@asynccontextmanager
async def small_buffer_socket_pair(
    size: int = 4096,
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """(client, server) on 127.0.0.1 whose buffers are set small before listen / connect, so
    that the sink's writes soon take only part of a frame (or nothing)."""
    listener = trio.socket.socket()
    listener.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_SNDBUF, size)
    listener.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, size)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    sock = trio.socket.socket()
    sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, size)
    sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_SNDBUF, size)
    with listener:
        await sock.connect(listener.getsockname())
        server, _ = await listener.accept()
    async with trio.SocketStream(sock) as client, trio.SocketStream(server) as a:
        yield client, a


async def test_partial_sink_writes_keep_order_and_the_fin_comes_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sink writes part of a frame, the rest is buffered, the splice writes it with trio
    while more frames queue behind it and the FIN arrives: every byte in order, then EOF."""
    writes: list[tuple[int, int]] = []

    def recording_write_now(
        sock: trio.socket.SocketType, data: bytes | bytearray | memoryview
    ) -> int:
        sent = write_now(sock, data)
        writes.append((sent, len(data)))
        return sent

    monkeypatch.setattr(backchannel_stream, "write_now", recording_write_now)
    payload = os.urandom(1 << 20)
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, small_buffer_socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            received = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                await trio.testing.wait_all_tasks_blocked()
                # Frames of 5,000 bytes, a reader taking 3,001 between them: the socket is
                # partly full when a frame arrives, so the sink takes part of some.
                for start in range(0, len(payload), 5000):
                    await opener.send_all(payload[start : start + 5000])
                    await trio.testing.wait_all_tasks_blocked()
                    received.extend(await client.receive_some(3001))
                await opener.send_eof()
                while data := await client.receive_some(7919):
                    received.extend(data)
                assert bytes(received) == payload
                assert any(0 < sent < size for sent, size in writes)  # partial sink writes
                assert any(sent == size for sent, size in writes)  # and whole ones
                await client.send_eof()
                assert await read_all(opener) == b""


async def test_a_cancelled_splice_leaves_no_sink_and_later_data_is_buffered() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                await trio.testing.wait_all_tasks_blocked()
                assert sink_of(acceptor) is not None
                nursery.cancel_scope.cancel()
            assert sink_of(acceptor) is None
            await opener.send_all(b"after the splice")
            await trio.testing.wait_all_tasks_blocked()
            assert acceptor.buffered == len(b"after the splice")
            assert nothing_readable(client) == b""
            assert await receive_exactly(acceptor, 16) == b"after the splice"


async def test_a_second_receiver_clears_no_sink_it_did_not_set() -> None:
    """A receive that fails with BusyResourceError (the splice is receiving) leaves the
    splice's sink as it was, never a stale one, and data still arrives."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await acceptor.receive_some(10)
                assert sink_of(acceptor) is a.socket
                await opener.send_all(b"still delivered")
                assert await receive_exactly(client, 15) == b"still delivered"
                await trio.testing.wait_all_tasks_blocked()
                assert sink_of(acceptor) is a.socket
                nursery.cancel_scope.cancel()
