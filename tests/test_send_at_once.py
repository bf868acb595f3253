"""A small splice read leaves as one DATA frame in one message, without the mux's queue
(``Mux.take_data_frame``, ``Tunnel._send_at_once``), and only when that is exactly what
queueing it would have sent: nothing queued ahead of it, the writer idle, nobody waiting for
room, one send step, credit for all of it, a transport that takes it at once.

The mux half compares the bytes with what ``send_data`` and ``data_to_send`` produce; the
tunnel half uses the eager in-memory pair of ``test_eager_send`` and spies on the mux's
queueing entry point to tell which way a send went.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from backchannel._proto._frames import FrameDecoder, FrameType
from backchannel._proto._mux import Mux, MuxSettings
from backchannel._proto._streamstate import StreamStateError
from backchannel._tunnel import FIRST_SEND_CHUNK

from .test_eager_send import eager_pair
from .test_wslink_review import GUARD


def ready_pair(settings: MuxSettings | None = None) -> tuple[Mux, Mux]:
    """Two handshaken muxes (gateway, connector), nothing queued."""
    gateway = Mux(initiator=False, settings=settings)
    connector = Mux(initiator=True, settings=settings)
    connector.send_hello({})
    gateway.receive_data(connector.data_to_send())
    gateway.send_hello({})
    connector.receive_data(gateway.data_to_send())
    assert gateway.ready
    assert connector.ready
    return gateway, connector


def open_stream(gateway: Mux, connector: Mux) -> int:
    stream_id = gateway.open_stream({"protocol": "test"})
    connector.receive_data(gateway.data_to_send())
    connector.accept_stream(stream_id)
    gateway.receive_data(connector.data_to_send())
    assert not gateway.pending_bytes
    return stream_id


def frames(data: bytes) -> list[tuple[FrameType, int, bytes]]:
    decoder = FrameDecoder(max_payload=1 << 24)
    return [(frame.type, frame.stream_id, bytes(frame.payload)) for frame in decoder.feed(data)]


# --------------------------------------------------------------------------- the mux


def test_the_frame_taken_is_the_frame_send_data_would_queue() -> None:
    queued_side, queued_peer = ready_pair()
    taken_side, taken_peer = ready_pair()
    stream_id = open_stream(queued_side, queued_peer)
    assert open_stream(taken_side, taken_peer) == stream_id
    payload = os.urandom(1500)
    queued_side.send_data(stream_id, payload)
    queued = queued_side.data_to_send()
    header = taken_side.take_data_frame(stream_id, len(payload))
    assert header is not None
    assert header + payload == queued
    assert taken_side.send_window(stream_id) == queued_side.send_window(stream_id)
    assert taken_side.send_window(stream_id) == MuxSettings().initial_window - len(payload)
    assert not taken_side.pending_bytes
    assert taken_side.queued_data(stream_id) == 0
    # The peer takes it as DATA within the window it granted.
    (event,) = taken_peer.receive_data(header + payload)
    assert bytes(event.data) == payload  # type: ignore[attr-defined]


def test_nothing_is_taken_while_anything_is_queued_ahead() -> None:
    gateway, connector = ready_pair()
    stream_id = open_stream(gateway, connector)
    window = gateway.send_window(stream_id)
    gateway.ping(b"12345678")
    assert gateway.take_data_frame(stream_id, 10) is None
    assert gateway.send_window(stream_id) == window
    assert [kind for kind, _, _ in frames(gateway.data_to_send())] == [FrameType.PING]


@pytest.mark.parametrize("what", ["credit", "frame size", "peer's frame size"])
def test_nothing_is_taken_beyond_credit_or_one_frame(what: str) -> None:
    settings = MuxSettings(initial_window=20_000, data_chunk_size=16_384, max_frame_size=16_384)
    gateway, connector = ready_pair(settings)
    stream_id = open_stream(gateway, connector)
    if what == "credit":
        gateway.send_data(stream_id, b"x" * 15_000)
        gateway.data_to_send()
        length = 5_001  # 5,000 left
    elif what == "frame size":
        length = settings.data_chunk_size + 1
    else:
        length = 16_385  # the peer promised 16 KiB frames
        gateway = Mux(initiator=False, settings=MuxSettings(data_chunk_size=1 << 20))
        connector = Mux(initiator=True, settings=settings)
        connector.send_hello({})
        gateway.receive_data(connector.data_to_send())
        gateway.send_hello({})
        connector.receive_data(gateway.data_to_send())
        stream_id = open_stream(gateway, connector)
    window = gateway.send_window(stream_id)
    assert gateway.take_data_frame(stream_id, length) is None
    assert gateway.send_window(stream_id) == window
    assert gateway.take_data_frame(stream_id, length - 1) is not None


def test_a_stream_that_cannot_send_raises_as_send_data_does() -> None:
    gateway, connector = ready_pair()
    stream_id = open_stream(gateway, connector)
    gateway.send_fin(stream_id)
    gateway.data_to_send()
    with pytest.raises(StreamStateError):
        gateway.take_data_frame(stream_id, 1)
    with pytest.raises(StreamStateError):
        gateway.take_data_frame(stream_id + 2, 1)  # never opened


# --------------------------------------------------------------------------- the tunnel


@contextmanager
def queueing_calls(mux: Mux) -> Iterator[list[int]]:
    """Record the length of every ``send_data`` call (the queueing path) on ``mux``."""
    calls: list[int] = []
    original = mux.send_data

    def spy(stream_id: int, data: bytes | bytearray | memoryview) -> int:
        calls.append(len(data))
        return original(stream_id, data)

    mux.send_data = spy  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del mux.send_data


async def test_a_small_read_leaves_at_once_as_one_frame_in_one_message() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            before = len(eager.now_senders)
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            with queueing_calls(pair.gateway._mux) as calls:
                assert opener._send_now(request) == len(request)
            assert calls == []
            assert eager.now_senders[before:] == [trio.lowlevel.current_task()]
            assert frames(eager._queue[-1]) == [(FrameType.DATA, opener.stream_id, request)]
            assert opener._sent == len(request)
            assert pair.gateway._mux.send_window(opener.stream_id) == (
                MuxSettings().initial_window - len(request)
            )
            assert await acceptor.receive_some() == request


async def test_a_queued_frame_is_not_overtaken() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            pair.gateway._mux.ping(b"12345678")  # queued, the writer not woken
            with queueing_calls(pair.gateway._mux) as calls:
                assert opener._send_now(b"after the ping") == 14
            assert calls == [14]
            kinds = [kind for kind, _, _ in frames(eager._queue[-1])]
            assert kinds == [FrameType.PING, FrameType.DATA]
            assert await acceptor.receive_some() == b"after the ping"


async def test_more_than_one_send_step_is_queued_in_steps() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, _eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            data = os.urandom(FIRST_SEND_CHUNK + 1)
            with queueing_calls(pair.gateway._mux) as calls:
                assert opener._send_now(data) == len(data)
            assert calls == [FIRST_SEND_CHUNK, 1]  # one step, then the rest
            received = b""
            while len(received) < len(data):
                received += await acceptor.receive_some()
            assert received == data


async def test_the_writer_is_not_bypassed_while_busy_or_the_transport_cannot_send() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            eager.accepting_now = False
            with queueing_calls(pair.gateway._mux) as calls:
                assert opener._send_now(b"one") == 3
                # The writer was woken and has not run: it is not idle.
                eager.accepting_now = True
                assert opener._send_now(b"two") == 3
            assert calls == [3, 3]
            received = b""
            while len(received) < 6:
                received += await acceptor.receive_some()
            assert received == b"onetwo"


async def test_streams_waiting_for_room_keep_their_turn() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, _eager):
            opener, acceptor = await pair.open_pair()
            other, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            pair.gateway._output_blocked.add(other, 0)
            try:
                with queueing_calls(pair.gateway._mux) as calls:
                    assert opener._send_now(b"polite") == 6
                assert calls == [6]
            finally:
                pair.gateway._output_blocked.discard(other)
            assert await acceptor.receive_some() == b"polite"


async def test_what_the_transport_did_not_take_is_flushed_by_the_writer() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            eager.hold_sends()
            flushes = eager.flushes
            with queueing_calls(pair.gateway._mux) as calls:
                assert opener._send_now(b"held") == 4
            assert calls == []
            assert eager.send_pending
            await trio.testing.wait_all_tasks_blocked()
            assert eager.flushes == flushes + 1
            eager.release_sends()
            assert await acceptor.receive_some() == b"held"


async def test_a_broken_transport_ends_the_tunnel_and_fails_the_stream() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()

            def broken(message: bytes) -> None:
                raise OSError("connection reset by peer")

            eager.send_message_now = broken  # type: ignore[method-assign]
            assert opener._send_now(b"lost") == 4  # taken, as queued data would be
            await pair.gateway.wait_closed()
            assert "connection reset by peer" in pair.gateway.close_reason
            with pytest.raises(trio.BrokenResourceError):
                await opener.send_all(b"more")
