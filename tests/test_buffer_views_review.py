"""Review of the shared buffers (ba09192: received DATA payloads are views into the message;
6a6fe46: DATA sent from bytes is queued as (header, view) and copied once in data_to_send).

Two tests were written failing, each for a defect the review found (the one-copy send path
never applied in the tunnel: its streams pass memoryviews of the caller's bytes; a typed
memoryview, e.g. of array('H'), was counted in items, not bytes, and broke the peer's
decoding); they pass since the fixes. The others pin down what the review checked and found
correct.
"""

from __future__ import annotations

import array
import os
import random

import pytest
import trio
import trio.testing

from backchannel import splice_streams
from backchannel._proto._events import DataReceived, Event, HelloReceived
from backchannel._proto._frames import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from backchannel._proto._mux import Mux, MuxSettings
from backchannel._wslink import WebSocketLink

from .test_eager_send_review import small_buffer_tcp_pair, tls_tunnels
from .test_mux import Pair, frames_of, open_accepted
from .test_wslink_review import GUARD, Pki, pki, tcp_pair
from .tunnel_pair import tunnel_pair

__all__ = ["pki"]  # the fixture, imported for the tests below


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(event.data)
        for event in events
        if isinstance(event, DataReceived) and event.stream_id == stream_id
    )


def handshaken() -> tuple[Pair, int]:
    pair = Pair()
    pair.handshake()
    return pair, open_accepted(pair)


# =========================================================================== findings


async def test_bytes_a_tunnel_stream_sends_are_queued_as_views() -> None:
    """The splice reads bytes (os.read) and gives them to TunnelStream._send_now; the commit's
    one-copy path is meant for exactly those."""
    async with tunnel_pair() as pair:
        opener, _ = await pair.open_pair()
        pair.gateway_transport.hold_sends()
        payload = os.urandom(64 * 1024)  # SPLICE_CHUNK, as a socket read gives it
        assert opener._send_now(payload) == len(payload)
        # No checkpoint since: the writer has not taken anything from the queue yet.
        queued = pair.gateway._mux._ordered
        assert queued, "the DATA is queued"
        assert any(isinstance(entry, tuple) for entry in queued), (
            f"bytes were copied at once: {[type(entry).__name__ for entry in queued]}"
        )


def test_an_array_of_two_byte_items_is_sent_as_its_bytes() -> None:
    pair, stream_id = handshaken()
    items = array.array("H", range(100))
    taken = pair.connector.send_data(stream_id, memoryview(items))  # a typed bytes-like
    events = pair.to_gateway()  # ProtocolError: "unsupported frame version"
    assert received_bytes(events, stream_id) == items.tobytes()[:taken]
    assert taken == len(items) * items.itemsize


# =========================================================================== checked: receiving


def test_views_into_the_decoders_carry_over_survive_later_feeds() -> None:
    """A DATA view into the decoder's own buffer (a frame split over two feeds) stays intact
    while the decoder goes on: the carry-over is replaced by a new bytearray, never resized
    in place (no BufferError, no overwritten payload)."""
    first = encode_frame(FrameType.DATA, 1, b"A" * 1000)
    second = encode_frame(FrameType.DATA, 1, b"B" * 1000)
    third = encode_frame(FrameType.DATA, 1, b"C" * 1000)
    wire = first + second + third
    decoder = FrameDecoder()
    assert decoder.feed(wire[:500]) == []
    (a,) = decoder.feed(wire[500 : len(first) + 300])  # A: a view into the carry-over
    assert isinstance(a.payload, memoryview)
    (b,) = decoder.feed(wire[len(first) + 300 : len(first) + len(second) + 7])
    (c,) = decoder.feed(bytearray(wire[len(first) + len(second) + 7 :]))
    assert decoder.at_frame_boundary
    assert (bytes(a.data), bytes(b.data), bytes(c.data)) == (b"A" * 1000, b"B" * 1000, b"C" * 1000)


def test_max_frames_keeps_views_of_earlier_frames_intact() -> None:
    """The before-HELLO path decodes one frame per feed and feeds b"" again: each DATA view
    points into that feed's buffer, which later feeds do not touch."""
    frames = [encode_frame(FrameType.DATA, 1, bytes([n]) * 100) for n in range(5)]
    decoder = FrameDecoder()
    got: list[Frame] = decoder.feed(bytearray(b"".join(frames)), max_frames=1)
    while more := decoder.feed(b"", max_frames=1):
        got += more
    assert [bytes(frame.data) for frame in got] == [bytes([n]) * 100 for n in range(5)]


def test_hello_open_and_data_in_one_message() -> None:
    """The connector gets the gateway's HELLO, an OPEN and DATA in one message (HELLO first,
    one frame at a time): the DATA then is a view into the decoder's carry-over; it is right,
    and the next message's frames do not change it."""
    connector = Mux(initiator=True)
    gateway = Mux(initiator=False)
    connector.send_hello({"role": "connector"})
    (hello,) = gateway.receive_data(connector.data_to_send())
    assert isinstance(hello, HelloReceived)
    gateway.send_hello({"role": "gateway"})
    stream_id = gateway.open_stream({"protocol": "test"})
    first, second = os.urandom(3000), os.urandom(5000)
    events = connector.receive_data(bytearray(gateway.data_to_send()))
    connector.accept_stream(stream_id)
    gateway.receive_data(connector.data_to_send())
    gateway.send_data(stream_id, first)
    events += connector.receive_data(gateway.data_to_send())
    gateway.send_data(stream_id, second)
    events += connector.receive_data(bytearray(gateway.data_to_send()))
    assert received_bytes(events, stream_id) == first + second


def test_the_mux_keeps_no_view_of_a_bytearray_message() -> None:
    """Once the caller dropped the events, nothing in the mux or decoder holds an export of the
    message it was given: the caller may resize or reuse it (BufferError would show a view
    kept somewhere, e.g. a small DATA view retaining a large message)."""
    pair, stream_id = handshaken()
    pair.gateway.send_data(stream_id, b"x" * 100)
    pair.gateway.send_data(stream_id, b"y" * 70_000)  # two frames: 64 KiB chunks
    message = bytearray(pair.gateway.data_to_send())
    events = pair.connector.receive_data(message)
    assert received_bytes(events, stream_id) == b"x" * 100 + b"y" * 70_000
    with pytest.raises(BufferError):
        message += b"!"  # the events' views are exports of it
    del events
    message += b"!"
    message.clear()


async def test_stream_buffers_hold_copies_not_views_of_messages() -> None:
    """Data nobody is reading is kept in the stream's deque as bytes of its own (not a view
    keeping a whole message alive)."""
    async with tunnel_pair() as pair:
        opener, acceptor = await pair.open_pair()
        caller_buffer = bytearray(b"a" * 100_000)
        await opener.send_all(caller_buffer)
        caller_buffer[:] = b"b" * 100_000  # copied at send: changing it now changes nothing
        await opener.send_all(memoryview(b"c" * 10))
        await trio.testing.wait_all_tasks_blocked()
        assert acceptor.buffered == 100_010
        assert all(type(chunk) is bytes for chunk in acceptor._chunks)
        received = b""
        while len(received) < 100_010:
            received += await acceptor.receive_some()
        assert received == b"a" * 100_000 + b"c" * 10


# =========================================================================== checked: sending


def test_data_to_send_accounting_with_views_bytes_and_urgent_frames() -> None:
    """DATA from bytes (views), bytearrays and memoryviews (copies), urgent credit and pings
    between them, taken by data_to_send under several max_bytes limits: the frames arrive whole
    and in order (urgent ones ahead of the ordered ones queued at the time), pending_bytes and
    queued_data always match what is still queued."""
    rng = random.Random(7)
    settings = MuxSettings(data_chunk_size=1000)
    pair = Pair(settings, settings)
    pair.handshake()
    sid_a = open_accepted(pair)
    sid_b = open_accepted(pair, "gateway")
    sender, receiver = pair.connector, pair.gateway
    sent: dict[int, bytes] = {sid_a: b"", sid_b: b""}
    received: dict[int, bytes] = {sid_a: b"", sid_b: b""}
    pings = 0
    for round_ in range(60):
        for _ in range(rng.randrange(1, 5)):
            stream_id = rng.choice([sid_a, sid_b])
            size = rng.randrange(1, 3500)
            raw = rng.randbytes(size)
            kind = rng.randrange(3)
            data: bytes | bytearray | memoryview = (
                raw if kind == 0 else bytearray(raw) if kind == 1 else memoryview(raw)
            )
            taken = sender.send_data(stream_id, data)
            if isinstance(data, bytearray):
                data[:] = b"\0" * len(data)  # the caller reuses its buffer
            sent[stream_id] += raw[:taken]
            if rng.random() < 0.3:
                sender.ping(round_.to_bytes(8, "big"))
                pings += 1
        while sender.pending_bytes:
            queued = {sid: sender.queued_data(sid) for sid in (sid_a, sid_b)}
            before = sender.pending_bytes
            limit = rng.choice([None, 1, HEADER_SIZE + 500, 3000, 10_000])
            message = sender.data_to_send(limit)
            assert message
            assert sender.pending_bytes == before - len(message)
            frames = frames_of(message)
            if limit is not None and len(frames) > 1:
                assert len(message) <= limit
            urgent_seen_after_data = False
            for frame in frames:
                if frame.type is FrameType.DATA:
                    queued[frame.stream_id] -= len(frame.payload)
                    urgent_seen_after_data = True
                elif frame.type is FrameType.PING:
                    assert not urgent_seen_after_data, "urgent frames go first"
            assert {sid: sender.queued_data(sid) for sid in (sid_a, sid_b)} == queued
            for event in receiver.receive_data(message):
                if isinstance(event, DataReceived):
                    received[event.stream_id] += bytes(event.data)
                    receiver.acknowledge(event.stream_id, len(event.data))
        sender.receive_data(receiver.data_to_send())  # credit and pongs back
    assert pings
    assert received == sent
    assert sender.queued_data(sid_a) == sender.queued_data(sid_b) == 0


def test_a_released_caller_view_of_bytes_and_a_reused_bytearray() -> None:
    """A caller may release its memoryview, or reuse its bytearray, as soon as send_data
    returned: the frames carry what was given (also when the peer's credit is short and
    send_data takes only part)."""
    settings = MuxSettings(initial_window=1500, data_chunk_size=1000)
    pair = Pair(settings, settings)
    pair.handshake()
    stream_id = open_accepted(pair)
    reused = bytearray(b"1" * 1000)
    assert pair.connector.send_data(stream_id, reused) == 1000
    reused[:] = b"2" * 1000
    with memoryview(b"3" * 1000) as view:
        assert pair.connector.send_data(stream_id, view) == 500  # the credit's rest
    assert pair.connector.send_data(stream_id, b"4" * 10) == 0
    events = pair.to_gateway()
    assert received_bytes(events, stream_id) == b"1" * 1000 + b"3" * 500


# =========================================================================== checked: end to end


async def _read_all(stream: trio.SocketStream, count: int) -> bytes:
    received = bytearray()
    while len(received) < count:
        data = await stream.receive_some(1 << 20)
        assert data
        received += data
    return bytes(received)


@pytest.mark.parametrize("small_buffers", [False, True], ids=["default-buffers", "small-buffers"])
async def test_splice_over_tls_with_direct_payloads_delivers_intact(
    pki: Pki, small_buffers: bool
) -> None:
    """Our TLS + WebSocket link with direct payloads (large frames arrive as bytearrays of
    their own): a bulk transfer each way through the tunnel into spliced sockets with small
    or default buffers (the tunnel's reader writing views straight to the socket, partial
    writes, the rest copied into the stream) arrives intact."""
    size = 6 << 20
    down = os.urandom(size)  # gateway -> connector: unmasked, a bytearray per large frame
    up = os.urandom(size)  # connector -> gateway: masked, unmasked into bytes
    with trio.fail_after(GUARD):
        async with tls_tunnels(pki, small_buffers=False) as tunnels:
            for tunnel in (tunnels.gateway, tunnels.connector):
                link = tunnel._transport
                assert isinstance(link, WebSocketLink)
                link.allow_direct_payloads()
            opener, acceptor = await tunnels.open_pair()
            near, far = await (small_buffer_tcp_pair() if small_buffers else tcp_pair())
            results: dict[str, bytes] = {}

            async def far_side() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(far.send_all, up)

                    async def read() -> None:
                        results["down"] = await _read_all(far, size)

                    inner.start_soon(read)

            async def opener_side() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(opener.send_all, down)

                    async def read() -> None:
                        received = bytearray()
                        while len(received) < size:
                            data = await opener.receive_some()
                            assert data
                            received += data
                        results["up"] = bytes(received)

                    inner.start_soon(read)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, acceptor, near)
                async with trio.open_nursery() as ends:
                    ends.start_soon(far_side)
                    ends.start_soon(opener_side)
                nursery.cancel_scope.cancel()
            await near.aclose()
            await far.aclose()
    assert results["down"] == down
    assert results["up"] == up
