"""The tunnel's own WebSocket framing (backchannel._wslink) against RFC 6455 and wsproto.

Frames we build are the bytes wsproto builds (server) or decode to the payload (client); frames
wsproto builds, cut anywhere, come out of our parser as the same messages; every violation a
peer can commit closes with the RFC's code and a close frame that says it, without buffering
an announced oversized frame.
"""

from __future__ import annotations

import os
import struct

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from backchannel._wslink import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_PING,
    HandshakeStream,
    WebSocketClosed,
    WebSocketLink,
    build_frame,
    mask,
)


def wsproto_frame(opcode: Opcode, payload: bytes, *, client: bool, fin: bool = True) -> bytes:
    """What wsproto itself would send (its own serializer, with masking when ``client``)."""
    return bytes(FrameProtocol(client=client, extensions=[])._serialize_frame(opcode, payload, fin))


def raw_frame(
    first: int, payload: bytes, *, masked: bool, length_field: bytes | None = None
) -> bytes:
    """A frame with any first byte, masking choice and (possibly non-minimal) length field."""
    key = b"\x01\x02\x03\x04"
    if length_field is None:
        size = len(payload)
        if size <= 125:
            length_field = bytes([size])
        elif size <= 0xFFFF:
            length_field = bytes([126]) + struct.pack("!H", size)
        else:
            length_field = bytes([127]) + struct.pack("!Q", size)
    second = length_field[0] | (0x80 if masked else 0)
    body = mask(payload, key) if masked else payload
    return bytes([first, second]) + length_field[1:] + (key if masked else b"") + body


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_server_frames_are_wsproto_frames(size: int) -> None:
    payload = os.urandom(size)
    assert build_frame(OP_BINARY, payload, client=False) == wsproto_frame(
        Opcode.BINARY, payload, client=False
    )


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65536, 300_000])
def test_client_frames_decode_to_the_payload_in_wsproto(size: int) -> None:
    payload = os.urandom(size)
    frame = build_frame(OP_BINARY, payload, client=True)
    reference = wsproto_frame(Opcode.BINARY, payload, client=True)
    assert len(frame) == len(reference)
    assert frame[:2] == reference[:2]
    receiver = FrameProtocol(client=False, extensions=[])
    receiver.receive_bytes(frame)
    (decoded,) = receiver.received_frames()
    assert decoded.payload == payload


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_mask_is_an_involution(data: bytes, key: bytes) -> None:
    masked = mask(data, key)
    assert len(masked) == len(data)
    assert mask(masked, key) == data


class _Peer:
    """The other end of an in-memory stream, speaking raw bytes."""

    def __init__(self, stream: trio.abc.Stream, *, link_is_client: bool) -> None:
        self.stream = stream
        self.link_is_client = link_is_client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def frames(self) -> list[tuple[Opcode, bytes]]:
        """Every frame the link sent until it closed the stream (decoded as its peer would)."""
        protocol = FrameProtocol(client=not self.link_is_client, extensions=[])
        while data := await self.stream.receive_some(65536):
            protocol.receive_bytes(bytes(data))
        return [(frame.opcode, _payload(frame.payload)) for frame in protocol.received_frames()]


def _payload(payload: object) -> bytes:
    """wsproto gives a close frame's payload as (code, reason)."""
    if isinstance(payload, tuple):
        code, reason = payload
        return struct.pack("!H", code) + str(reason).encode()
    assert isinstance(payload, bytes | bytearray)
    return bytes(payload)


def _link(*, client: bool = False, max_message_size: int = 1 << 20) -> tuple[WebSocketLink, _Peer]:
    ours, theirs = trio.testing.memory_stream_pair()
    link = WebSocketLink(ours, client=client, max_message_size=max_message_size)
    return link, _Peer(theirs, link_is_client=client)


async def _expect_close(link: WebSocketLink, peer: _Peer, code: int, words: str) -> None:
    with pytest.raises(WebSocketClosed) as caught:
        await link.get_message()
    assert caught.value.code == code
    assert words in caught.value.reason
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.aclose)
        frames = await peer.frames()
    (opcode, payload) = frames[-1]
    assert opcode == Opcode.CLOSE
    assert struct.unpack("!H", payload[:2])[0] == code


@given(
    st.lists(st.binary(max_size=2000), min_size=1, max_size=5),
    st.lists(st.integers(1, 4000), min_size=1, max_size=30),
)
@settings(max_examples=60, deadline=None)
def test_wsproto_frames_cut_anywhere_give_the_same_messages(
    messages: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(wsproto_frame(Opcode.BINARY, m, client=True) for m in messages)

    async def main() -> None:
        link, peer = _link(client=False)
        position = 0
        for cut in cuts:
            if position < len(wire):
                await peer.send(wire[position : position + cut])
                position += cut
        if position < len(wire):
            await peer.send(wire[position:])
        received = [await link.get_message() for _ in messages]
        assert received == messages

    trio.run(main)


async def test_fragmented_text_with_a_ping_in_between() -> None:
    link, peer = _link(client=True)
    text = "grüße, " * 10
    encoded = text.encode()
    await peer.send(wsproto_frame(Opcode.TEXT, encoded[:7], client=False, fin=False))
    await peer.send(wsproto_frame(Opcode.PING, b"are you there", client=False))
    await peer.send(wsproto_frame(Opcode.CONTINUATION, encoded[7:], client=False))
    assert await link.get_message() == text
    await link.send_message(b"done")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.aclose)
        frames = await peer.frames()
    assert frames[0] == (Opcode.PONG, b"are you there")
    assert frames[1] == (Opcode.BINARY, b"done")
    assert frames[2][0] == Opcode.CLOSE


async def test_close_frame_is_answered_and_reported() -> None:
    link, peer = _link(client=False)
    reason = "bye now"
    await peer.send(
        wsproto_frame(Opcode.CLOSE, struct.pack("!H", 1001) + reason.encode(), client=True)
    )
    with pytest.raises(WebSocketClosed) as caught:
        await link.get_message()
    assert (caught.value.code, caught.value.reason) == (1001, reason)
    with pytest.raises(WebSocketClosed):
        await link.send_message(b"too late")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.aclose)
        protocol = FrameProtocol(client=True, extensions=[])
        while data := await peer.stream.receive_some(65536):
            protocol.receive_bytes(bytes(data))
        (echo,) = list(protocol.received_frames())
    assert echo.opcode == Opcode.CLOSE
    assert echo.payload == (CloseReason.GOING_AWAY, "")


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (raw_frame(0x82 | 0x40, b"x", masked=True), CLOSE_PROTOCOL_ERROR, "reserved bits"),
        (raw_frame(0x83, b"x", masked=True), CLOSE_PROTOCOL_ERROR, "unknown opcode"),
        (raw_frame(0x82, b"x", masked=False), CLOSE_PROTOCOL_ERROR, "unmasked frame"),
        (
            raw_frame(0x82, b"x" * 5, masked=True, length_field=b"\x7e" + struct.pack("!H", 5)),
            CLOSE_PROTOCOL_ERROR,
            "minimally",
        ),
        (
            raw_frame(0x82, b"", masked=True, length_field=b"\x7f" + struct.pack("!Q", 1 << 63)),
            CLOSE_PROTOCOL_ERROR,
            "minimally",
        ),
        (raw_frame(0x89, b"p" * 126, masked=True), CLOSE_PROTOCOL_ERROR, "longer than 125"),
        (raw_frame(0x09, b"p", masked=True), CLOSE_PROTOCOL_ERROR, "fragmented control"),
        (raw_frame(0x80, b"x", masked=True), CLOSE_PROTOCOL_ERROR, "continuation frame without"),
        (raw_frame(0x81, b"\xff\xfe", masked=True), CLOSE_INVALID_DATA, "not UTF-8"),
        (raw_frame(0x88, b"\x03", masked=True), CLOSE_PROTOCOL_ERROR, "one-byte"),
        (raw_frame(0x88, struct.pack("!H", 1005), masked=True), CLOSE_PROTOCOL_ERROR, "close code"),
        (raw_frame(0x88, b"\x03\xe8\xff", masked=True), CLOSE_INVALID_DATA, "reason is not UTF-8"),
    ],
    ids=[
        "rsv", "opcode", "unmasked", "short-126", "long-msb", "long-control", "fragmented-control",
        "orphan-continuation", "bad-utf8", "close-1-byte", "close-1005", "close-reason-utf8",
    ],
)  # fmt: skip
async def test_violations_close_with_the_rfc_code(frame: bytes, code: int, words: str) -> None:
    link, peer = _link(client=False)
    await peer.send(frame)
    await _expect_close(link, peer, code, words)


async def test_a_masked_frame_from_the_server_is_refused() -> None:
    link, peer = _link(client=True)
    await peer.send(raw_frame(0x82, b"x", masked=True))
    with pytest.raises(WebSocketClosed) as caught:
        await link.get_message()
    assert caught.value.code == CLOSE_PROTOCOL_ERROR
    assert "masked frame from the server" in caught.value.reason


async def test_a_new_message_inside_a_fragmented_one_is_refused() -> None:
    link, peer = _link(client=False)
    await peer.send(raw_frame(0x02, b"part", masked=True))
    await peer.send(raw_frame(0x82, b"other", masked=True))
    await _expect_close(link, peer, CLOSE_PROTOCOL_ERROR, "inside a fragmented")


async def test_an_announced_oversized_frame_is_refused_before_its_payload() -> None:
    link, peer = _link(client=False, max_message_size=1000)
    # Only the header: a 2^40-byte frame is refused on its announcement, nothing is buffered.
    await peer.send(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"\x00" * 4)
    await _expect_close(link, peer, CLOSE_TOO_BIG, "larger than 1000")


async def test_fragments_adding_up_past_the_limit_are_refused() -> None:
    link, peer = _link(client=False, max_message_size=1000)
    await peer.send(raw_frame(0x02, b"a" * 600, masked=True))
    await peer.send(raw_frame(0x80, b"b" * 600, masked=True))
    await _expect_close(link, peer, CLOSE_TOO_BIG, "larger than 1000")


async def test_the_end_of_the_connection_without_a_close_frame_is_abnormal() -> None:
    link, peer = _link(client=False)
    await peer.send(raw_frame(0x82, b"last", masked=True)[:-1])
    await peer.stream.aclose()
    with pytest.raises(WebSocketClosed) as caught:
        await link.get_message()
    assert caught.value.code == 1006


async def test_ping_from_the_client_is_answered_with_its_payload() -> None:
    link, peer = _link(client=False)
    await peer.send(raw_frame(0x80 | OP_PING, b"12345678", masked=True))
    await peer.send(raw_frame(0x82, b"data", masked=True))
    assert await link.get_message() == b"data"
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(bytes(await peer.stream.receive_some(65536)))
    (pong,) = list(protocol.received_frames())
    assert (pong.opcode, _payload(pong.payload)) == (Opcode.PONG, b"12345678")


async def test_the_handshake_stream_keeps_what_follows_the_head() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    handshake = HandshakeStream(ours, client=False)
    head = b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n"
    frame = raw_frame(0x82, b"HELLO", masked=True)
    # The head's end split across two reads, with the first frame right behind it.
    await theirs.send_all(head[:-3])
    pieces = [await handshake.receive_some(65536)]
    await theirs.send_all(head[-3:] + frame)
    pieces.append(await handshake.receive_some(65536))
    assert b"".join(pieces) == head
    buffered = handshake.take_over()
    assert buffered == frame
    link = WebSocketLink(ours, client=False, max_message_size=1 << 20, buffered=buffered)
    assert await link.get_message() == b"HELLO"
    # trio-websocket's reader, still reading, sees nothing until the tunnel releases it.
    seen: list[bytes | bytearray] = []

    async def library_reader() -> None:
        seen.append(await handshake.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(library_reader)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # parked, although the link reads the same channel
        handshake.release()
    assert seen == [b""]


async def test_a_refused_upgrade_passes_its_body_to_the_library() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    handshake = HandshakeStream(ours, client=True)
    answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope"
    await theirs.send_all(answer)
    received = b""
    while len(received) < len(answer):
        received += await handshake.receive_some(65536)
    assert received == answer
