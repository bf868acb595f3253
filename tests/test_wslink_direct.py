"""Large frames decrypted straight into their own buffer (``_wslink.DIRECT_PAYLOAD``).

From 64 KiB on, once the peer authenticated (``allow_direct_payloads``), the rest of a frame
that has not all arrived goes from the TLS object into a buffer of the frame's size instead of
through the link's read buffer. These tests drive that
path over real TLS on 127.0.0.1 with raw frames a peer writes in awkward pieces: the messages
must come out exactly as sent (masked or not, fragmented, with control frames and small frames
around them), a connection that ends inside such a frame must close the link as abnormal, and
the path must really be taken (a large message is the buffer it was decrypted into).
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import pytest
import trio

from backchannel._tlschannel import TlsChannel
from backchannel._transport import GatewayAddress, dial_gateway
from backchannel._tunnel import TunnelSettings
from backchannel._wslink import (
    CLOSE_ABNORMAL,
    DIRECT_PAYLOAD,
    OP_BINARY,
    OP_PING,
    WebSocketClosed,
    WebSocketLink,
)
from tests.test_wslink_review import (
    GUARD,
    TLS_VERSIONS,
    Pki,
    client_context,
    frame,
    gateway,
    tls_pair,
)
from tests.test_wslink_review import pki as pki  # the fixture

OP_CONTINUATION = 0x0


async def _write_in_pieces(channel: TlsChannel, wire: bytes, pieces: list[int]) -> None:
    """Send ``wire`` as TLS records cut at the given sizes (cycled), the rest at once."""
    position = 0
    index = 0
    while position < len(wire):
        size = pieces[index % len(pieces)] if pieces else len(wire)
        await channel.send_all(wire[position : position + size])
        position += size
        index += 1


def _receiver(channel: TlsChannel, *, client: bool, direct: bool = True) -> WebSocketLink:
    link = WebSocketLink(channel, client=client, max_message_size=1 << 22)
    if direct:  # as the transport does once the peer authenticated
        link.allow_direct_payloads()
    return link


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("size", [DIRECT_PAYLOAD - 1, DIRECT_PAYLOAD, 70_000, 1 << 20])
@pytest.mark.parametrize("pieces", [[], [1, 13, 5000], [DIRECT_PAYLOAD // 2 + 3]])
@pytest.mark.parametrize("masked", [False, True], ids=["from-server", "from-client"])
async def test_large_frames_between_small_ones_arrive_intact(
    pki: Pki, version: ssl.TLSVersion, size: int, pieces: list[int], masked: bool
) -> None:
    big = os.urandom(size)
    messages = [b"before", big, b"after", os.urandom(DIRECT_PAYLOAD + 1)]
    wire = b"".join(frame(OP_BINARY, message, masked=masked) for message in messages)
    with trio.fail_after(GUARD):
        async with tls_pair(pki, version) as (client, server):
            # A server link reads masked frames (the peer is a client), a client link unmasked.
            writer, reader = (client, server) if masked else (server, client)
            link = _receiver(reader, client=not masked)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_in_pieces, writer, wire, pieces)
                received = [await link.get_message() for _ in messages]
    assert received == messages  # bytes and bytearray compare by content


async def test_a_fragmented_large_message_with_a_ping_between_its_fragments(pki: Pki) -> None:
    first, second = os.urandom(100_000), os.urandom(200_000)
    wire = (
        frame(OP_BINARY, first, masked=False, fin=False)
        + frame(OP_PING, b"are you there", masked=False)
        + frame(OP_CONTINUATION, second, masked=False)
        + frame(OP_BINARY, b"next", masked=False)
    )
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            link = _receiver(client, client=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_in_pieces, server, wire, [7, 40_000])
                assert await link.get_message() == first + second
                assert await link.get_message() == b"next"
            # The pong went back (masked: we are the client side).
            pong = await server.receive_some(1024)
            assert pong[0] == 0x8A
            assert pong[1] & 0x80


@pytest.mark.parametrize("received", [0, 1, DIRECT_PAYLOAD])
async def test_the_connection_ending_inside_a_large_frame_closes_the_link(
    pki: Pki, received: int
) -> None:
    whole = frame(OP_BINARY, os.urandom(300_000), masked=False)
    cut = whole[: 10 + received]  # the 10-byte header and part of the payload
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            link = _receiver(client, client=True)
            await server.send_all(cut)
            await server.aclose()
            with pytest.raises(WebSocketClosed) as caught:
                await link.get_message()
    assert caught.value.code == CLOSE_ABNORMAL


async def test_a_large_frame_is_the_buffer_it_was_decrypted_into(pki: Pki) -> None:
    """The fast path is taken: the message is the frame's own buffer (a bytearray), not a
    copy out of the read buffer (bytes). Small frames still come as bytes."""
    big = os.urandom(300_000)
    wire = frame(OP_BINARY, big, masked=False) + frame(OP_BINARY, b"small", masked=False)
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            link = _receiver(client, client=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, wire)
                message = await link.get_message()
                small = await link.get_message()
    assert isinstance(message, bytearray)
    assert message == big
    assert isinstance(small, bytes)
    assert small == b"small"


async def test_before_authentication_large_frames_are_buffered_as_they_arrive(pki: Pki) -> None:
    """A new link (the transport allows direct payloads only once the peer authenticated)
    takes the same frames the buffered way: same messages, copied out of the read buffer."""
    big = os.urandom(300_000)
    wire = frame(OP_BINARY, big, masked=False) + frame(OP_BINARY, b"small", masked=False)
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client, server):
            link = _receiver(client, client=True, direct=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_in_pieces, server, wire, [1, 20_000])
                message = await link.get_message()
                small = await link.get_message()
    assert isinstance(message, bytes)
    assert message == big
    assert small == b"small"


async def test_both_ends_of_a_tunnel_allow_direct_payloads_once_authenticated(pki: Pki) -> None:
    """The transport turns the fast path on after HELLO and authentication, on both sides
    (without it every large frame would silently take the buffered way)."""
    outcome: list[Any] = []
    with trio.fail_after(GUARD):
        async with gateway(pki, outcome) as port, trio.open_nursery() as nursery:
            ws, _, answer = await dial_gateway(
                nursery,
                GatewayAddress.parse(f"wss://127.0.0.1:{port}/tunnel"),
                ssl_context=client_context(pki),
                proxy=None,
                hello={"role": "connector", "subaccount": "s"},
                settings=TunnelSettings(),
            )
            assert answer["role"] == "gateway"
            assert ws._direct_payloads
            await ws.aclose()
    _certificate, accepted = outcome
    assert accepted is not None
    assert accepted[0]._direct_payloads
