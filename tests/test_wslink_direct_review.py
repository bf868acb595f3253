"""Fresh-eyes review of the direct decryption of large frames (commit 1f90778).

``TlsChannel.decrypt`` / ``receive_with`` and ``WebSocketLink._decrypt_step``: a frame of
``DIRECT_PAYLOAD`` bytes or more that has not all arrived gets a buffer of its own, and the
rest of its payload is decrypted straight into it. Every test runs over real TLS on 127.0.0.1.
Where the exact TLS records and their arrival matter, the peer is a bare ``ssl.SSLObject``
(:class:`RawTlsPeer`) that writes the records it is told to in one TCP send, and the test waits
until all of them are in the receiver's socket buffer (``SO_RCVLOWAT``) before the receiver
reads: no timing assumptions.

Five tests were written failing, each for a defect the review found (an announced large frame
allocated its whole size before any of it arrived: 16 MiB per connection before authentication
on the gateway; decrypt with a limit beyond its view, or into an empty view, took the
connection for ended; a TLS error after plaintext in the same read became a clean end; a
cancelled receive lost the bytes its step had taken); they pass since the fixes. The others
document properties checked.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing

from backchannel._tlschannel import TlsChannel
from backchannel._transport import MAX_RECEIVED_MESSAGE
from backchannel._wslink import (
    CLOSE_ABNORMAL,
    CLOSE_TOO_BIG,
    DIRECT_PAYLOAD,
    OP_BINARY,
    OP_PING,
    WebSocketClosed,
    WebSocketLink,
    mask,
)
from tests.test_wslink_review import (
    GUARD,
    TLS_VERSIONS,
    Pki,
    client_context,
    frame,
    server_context,
    tcp_pair,
    tls_pair,
    traced,
)
from tests.test_wslink_review import pki as pki  # the fixture

OP_CONTINUATION = 0x0
#: A TLS application-data record whose MAC cannot verify: an ssl.SSLError on decryption.
BAD_RECORD = b"\x17\x03\x03\x00\x20" + b"\x00" * 32


# --------------------------------------------------------------------------- helpers


class RawTlsPeer:
    """The client end of a TLS connection, as bare as it gets: the test decides which TLS
    records go out and in which TCP send (a hostile connector, seen from the gateway)."""

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.tcp = tcp
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")

    async def handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self.tcp.send_all(self._outgoing.read())
                data = await self.tcp.receive_some(1 << 16)
                if not data:
                    raise EOFError("the server ended the TLS handshake") from None
                self._incoming.write(data)
                continue
            if self._outgoing.pending:
                await self.tcp.send_all(self._outgoing.read())
            return

    def close_notify(self) -> bytes:
        """The ciphertext of our close_notify (nothing is sent)."""
        with suppress(ssl.SSLWantReadError):  # ours is out; the server's would come next
            self._ssl.unwrap()
        return self._outgoing.read()

    async def receive(self, count: int) -> bytes:
        """``count`` bytes of plaintext from the server."""
        data = bytearray()
        while len(data) < count:
            try:
                data += self._ssl.read(count - len(data))
            except ssl.SSLWantReadError:
                received = await self.tcp.receive_some(1 << 16)
                if not received:
                    raise EOFError("the server ended the connection") from None
                self._incoming.write(received)
        return bytes(data)

    def records(self, *plaintexts: bytes) -> bytes:
        """The ciphertext of one TLS record per plaintext (nothing is sent)."""
        for plaintext in plaintexts:
            self._ssl.write(plaintext)
        return self._outgoing.read()


@asynccontextmanager
async def raw_pair(
    pki: Pki, version: ssl.TLSVersion | None = None
) -> AsyncIterator[tuple[RawTlsPeer, TlsChannel]]:
    """A raw TLS client peer and the server's TlsChannel, handshakes done."""
    client_tcp, server_tcp = await tcp_pair()
    peer = RawTlsPeer(client_tcp, client_context(pki, version))
    server = TlsChannel(server_tcp, server_context(pki, version), server_side=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.handshake)
            nursery.start_soon(server.do_handshake)
        yield peer, server
    finally:
        await trio.aclose_forcefully(client_tcp)
        await trio.aclose_forcefully(server)


async def send_arrived(peer: RawTlsPeer, receiver: TlsChannel, wire: bytes) -> None:
    """Send ``wire`` in one TCP send and return once all of it waits in the receiver's socket
    buffer (its next read takes it all)."""
    transport = receiver.transport
    assert isinstance(transport, trio.SocketStream)
    await peer.tcp.send_all(wire)
    transport.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(wire))
    try:
        await trio.lowlevel.wait_readable(transport.socket)
    finally:
        transport.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def masked_header(
    length: int, key: bytes = b"\x01\x02\x03\x04", *, opcode: int = OP_BINARY, fin: bool = True
) -> bytes:
    """The header of a masked data frame of ``length`` (> 65535) bytes."""
    first = (0x80 if fin else 0) | opcode
    return bytes([first, 0x80 | 127]) + struct.pack("!Q", length) + key


async def cancel_when_all_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


def gateway_link(
    channel: TlsChannel, max_message_size: int = MAX_RECEIVED_MESSAGE, *, direct: bool = True
) -> WebSocketLink:
    """The gateway's link; ``direct``: after the connector authenticated (direct payloads)."""
    link = WebSocketLink(channel, client=False, max_message_size=max_message_size)
    if direct:
        link.allow_direct_payloads()
    return link


# =========================================================================== defects


async def test_an_announced_large_frame_costs_no_more_memory_than_what_arrived(
    pki: Pki,
) -> None:
    announced = MAX_RECEIVED_MESSAGE - 1
    with trio.fail_after(GUARD):
        async with raw_pair(pki) as (peer, server):
            link = gateway_link(server, direct=False)  # before authentication
            await send_arrived(peer, server, peer.records(masked_header(announced) + b"abcd"))
            with traced() as allocated:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.get_message)  # parses the header, waits for more
                    await trio.testing.wait_all_tasks_blocked()
                    held = allocated()
                    nursery.cancel_scope.cancel()
    assert held < 1 << 20, f"{held} bytes held for 18 bytes received"


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_tls_error_after_plaintext_is_raised_by_the_next_receive(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            await send_arrived(peer, server, peer.records(b"last words") + BAD_RECORD)
            assert await server.receive_some() == b"last words"
            with pytest.raises(trio.BrokenResourceError, match="TLS error"):
                await server.receive_some()


async def test_decrypt_with_a_limit_beyond_the_view_does_not_end_the_channel(pki: Pki) -> None:
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            await server.send_all(b"x" * 20)
            view = memoryview(bytearray(10))
            assert await client.receive_with(lambda: client.decrypt(view, 100)) == 10
            assert await client.receive_some() == b"x" * 10
            await server.send_all(b"more")
            assert await client.receive_some() == b"more"


async def test_decrypt_into_an_empty_view_does_not_end_the_channel(pki: Pki) -> None:
    """Refused (ValueError), not taken for the end of the connection."""
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            await server.send_all(b"data")
            with pytest.raises(ValueError, match="at least one byte"):
                client.decrypt(memoryview(bytearray()), 1)
            assert await client.receive_some() == b"data"


async def test_a_cancelled_receive_some_loses_no_bytes(pki: Pki) -> None:
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            await server.send_all(b"abc")
            assert await client.receive_some(2) == b"ab"  # "c" waits in the SSL object
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.receive_some(10)
            await server.send_all(b"d")
            received = b""
            while len(received) < 2:  # "c" may come alone (served from memory), then "d"
                received += await client.receive_some(10)
            assert received == b"cd"


# =========================================================================== properties


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("size", [5, 200_000])
async def test_a_message_before_a_tls_error_is_delivered_then_1006(
    pki: Pki, version: ssl.TLSVersion, size: int
) -> None:
    """A small frame (all of it within the header-first read) or a large one (its own buffer),
    then a bad record in the same socket read: the message comes, then 1006."""
    payload = os.urandom(size)
    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            link = gateway_link(server)
            wire = peer.records(frame(OP_BINARY, payload, masked=True)) + BAD_RECORD
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.tcp.send_all, wire)
                assert await link.get_message() == payload
                with pytest.raises(WebSocketClosed) as caught:
                    await link.get_message()
    assert caught.value.code == CLOSE_ABNORMAL


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_frame_above_the_limit_is_refused_before_any_allocation(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    """max_message_size is still checked on the header, before the frame's own buffer."""
    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            link = gateway_link(server, max_message_size=1 << 20)
            wire = peer.records(masked_header((1 << 20) + 1) + b"abcd")
            await send_arrived(peer, server, wire)
            with traced() as allocated, pytest.raises(WebSocketClosed) as caught:
                await link.get_message()
            assert allocated() < 1 << 19
    assert caught.value.code == CLOSE_TOO_BIG


async def test_fragments_and_an_announced_large_fragment_past_the_limit_are_refused(
    pki: Pki,
) -> None:
    """The limit counts the fragments already held: the link never holds more than
    max_message_size of one message, however a peer splits it."""
    first = os.urandom(600_000)
    with trio.fail_after(GUARD):
        async with raw_pair(pki) as (peer, server):
            link = gateway_link(server, max_message_size=1 << 20)
            # A first fragment of 600 kB, then one announcing 500 kB more: 1.1 MB in all.
            wire = frame(OP_BINARY, first, masked=True, fin=False)
            wire += masked_header(500_000, opcode=OP_CONTINUATION)
            records = [wire[i : i + 16_000] for i in range(0, len(wire), 16_000)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.tcp.send_all, peer.records(*records))
                with pytest.raises(WebSocketClosed) as caught:
                    await link.get_message()
    assert caught.value.code == CLOSE_TOO_BIG


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_cancelled_get_message_inside_a_large_frame_resumes_intact(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    """get_message cancelled again and again (at the checkpoint after a step that decrypted
    from memory: a header, part of a large frame; and while waiting for the socket) loses
    nothing: every message comes whole and in order."""
    messages = [os.urandom(100_000), os.urandom(DIRECT_PAYLOAD), b"small", os.urandom(250_000)]
    wire = b"".join(frame(OP_BINARY, message, masked=True) for message in messages)
    records = [wire[i : i + 7_001] for i in range(0, len(wire), 7_001)]
    received: list[bytes | bytearray | str] = []
    cancelled = 0

    async def blocking_call(scope: trio.CancelScope) -> None:
        with scope:
            received.append(await link.get_message())

    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            link = gateway_link(server)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.tcp.send_all, peer.records(*records))
                while len(received) < len(messages):
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        received.append(await link.get_message())
                    cancelled += scope.cancelled_caught
                    if len(received) < len(messages):
                        # One call that reads the socket, cancelled once it waits for more.
                        call = trio.CancelScope()
                        async with trio.open_nursery() as inner:
                            inner.start_soon(blocking_call, call)
                            inner.start_soon(cancel_when_all_blocked, call)
                        cancelled += call.cancelled_caught
    assert received == messages
    assert cancelled > 0


async def test_receive_with_is_a_checkpoint_when_served_from_memory(pki: Pki) -> None:
    """Like the old receive_into: a step that returns a count at once still checkpoints; a
    cancelled call takes nothing (the step does not run)."""
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            await server.send_all(b"0123456789")
            target = bytearray()
            assert await client.receive_with(lambda: client.decrypt(target, 4)) == 4
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.receive_with(lambda: client.decrypt(target, 4))
            assert scope.cancelled_caught
            assert target == b"0123"
            with trio.testing.assert_checkpoints():
                await client.receive_with(lambda: client.decrypt(target, 100))
            assert target == b"0123456789"


async def test_decrypt_into_a_view_writes_from_its_start_up_to_the_limit(pki: Pki) -> None:
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            await server.send_all(b"abcdefgh")
            storage = bytearray(b"........")
            view = memoryview(storage)[2:]
            assert await client.receive_with(lambda: client.decrypt(view, 3)) == 3
            assert storage == b"..abc..."
            assert await client.receive_some() == b"defgh"


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("ending", ["tls-error", "close-notify", "tcp-eof"])
async def test_the_connection_ending_inside_a_large_frame_is_abnormal(
    pki: Pki, version: ssl.TLSVersion, ending: str
) -> None:
    """A TLS error, a close_notify or a bare TCP end while a large frame is open: 1006 at
    once, never a hang and never a partial message."""
    whole = frame(OP_BINARY, os.urandom(200_000), masked=True)
    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            link = gateway_link(server)
            wire = peer.records(whole[:30_000])
            if ending == "tls-error":
                wire += BAD_RECORD
            await send_arrived(peer, server, wire)
            if ending == "close-notify":
                await peer.tcp.send_all(peer.close_notify())
            elif ending == "tcp-eof":
                await peer.tcp.send_eof()
            with pytest.raises(WebSocketClosed) as caught:
                await link.get_message()
    assert caught.value.code == CLOSE_ABNORMAL


async def test_a_large_message_is_a_resizable_bytearray_of_its_own(pki: Pki) -> None:
    """No memoryview export outlives the decryption: the receiver may resize the message
    (and a masked frame comes unmasked)."""
    big = os.urandom(300_000)
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            link = WebSocketLink(client, client=True, max_message_size=1 << 22)
            link.allow_direct_payloads()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, frame(OP_BINARY, big, masked=False))
                message = await link.get_message()
    assert isinstance(message, bytearray)
    del message[:1000]
    message += b"!"
    assert message == big[1000:] + b"!"


async def test_bytes_after_the_upgrade_that_start_a_large_frame(pki: Pki) -> None:
    """HandshakeStream's leftover (``buffered``) holds a large frame's header and part of its
    payload, with a ping before it: the rest comes through TLS into the frame's own buffer."""
    big = os.urandom(150_000)
    key = b"\x09\x08\x07\x06"
    whole = masked_header(len(big), key) + mask(big, key)
    buffered = frame(OP_PING, b"hi", masked=True) + whole[:5]
    with trio.fail_after(GUARD):
        async with raw_pair(pki) as (peer, server):
            link = WebSocketLink(server, client=False, max_message_size=1 << 22, buffered=buffered)
            link.allow_direct_payloads()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.tcp.send_all, peer.records(whole[5:70_000], whole[70_000:]))
                message = await link.get_message()
    assert message == big


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_large_fragmented_message_with_pings_in_every_gap(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    """Large fragments (each its own buffer), pings between them, all in records cut through
    headers: one message, exactly as sent, and every ping answered."""
    parts = [os.urandom(DIRECT_PAYLOAD), os.urandom(70_000), os.urandom(DIRECT_PAYLOAD + 7)]
    wire = b""
    for index, part in enumerate(parts):
        opcode = OP_BINARY if index == 0 else OP_CONTINUATION
        wire += frame(opcode, part, masked=True, fin=index == len(parts) - 1)
        wire += frame(OP_PING, b"p%d" % index, masked=True)
    records = [wire[i : i + 9_973] for i in range(0, len(wire), 9_973)]
    with trio.fail_after(GUARD):
        async with raw_pair(pki, version) as (peer, server):
            link = gateway_link(server)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.tcp.send_all, peer.records(*records))
                message = await link.get_message()
            # The pongs of the pings before the last fragment's end left with the message.
            pongs = await peer.receive(8)
    assert message == b"".join(parts)
    assert pongs == b"\x8a\x02p0\x8a\x02p1"
