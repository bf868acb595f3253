"""Review of the small sends that leave without the mux's queue (547fc53: ``Mux.take_data_frame``,
``Tunnel._send_at_once``, called first by ``TunnelStream._send_now``, the splice's entry point).

The claim under review: the bytes on the wire, their order against every other frame, credit,
send steps, fairness between streams, the writer's flushing and error handling are exactly what
queueing the read and waking the writer produced before; only the CPU cost differs.

Most tests run twice (the ``path`` fixture): once as the code is, once with
``Tunnel._send_at_once`` replaced by one that declines, which makes ``_send_now`` exactly the
code before the commit (its only change is the call in front). Both runs must give the same,
explicitly written, outcome: every message the tunnel writes (recorded where it reaches the
in-memory WebSocket, or read by the peer over real TLS on 127.0.0.1), what ``_send_now``
returned, credit and bytes served. The "at once" run also checks that the new path really was
taken where the scenario means it to be (so a test cannot pass by never exercising it).
Seeded random sequences of reads, credit, held and refusing transports and heartbeat wakes
compare the two runs' whole wire traces as well. The file also runs against the tree before
the commit (``PYTHONPATH`` at a worktree of ``547fc53~1``, where the new path does not exist):
every test passes there (the fairness test below failed only on 547fc53 itself, before the
fix). Each docstring's "Checked:" names the deliberately broken variant of the
commit's code it was seen to fail against.

The review found one defect, fixed since: a stream that was woken from the room waiters and had
not run yet did not stop the new path, while it makes the queued path give way
(``_send_blocked`` asks ``others_waiting()``, ``_send_at_once`` asked only ``len(...)``): a
stream that had been served more sent ahead of one served less
(``test_a_stream_woken_for_room_keeps_its_turn``, written failing).
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
import trio_websocket

from backchannel import splice_streams
from backchannel._exceptions import StreamError
from backchannel._proto._errors import ProtocolError, ResetCode
from backchannel._proto._frames import HEADER_SIZE, FrameDecoder, FrameType
from backchannel._proto._mux import MuxSettings
from backchannel._room_waiters import SERVED_LIMIT
from backchannel._stream import TunnelStream
from backchannel._tunnel import FIRST_SEND_CHUNK, MAX_SEND_CHUNK, Tunnel, TunnelSettings

from .test_eager_send import EagerGatedTransport
from .test_eager_send_review import tls_tunnels
from .test_splice_direct import receive_exactly, socket_pair
from .test_wslink_review import GUARD, Pki, pki
from .tunnel_pair import GatedTransport, TunnelPair, tunnel_pair

__all__ = ["pki"]  # the fixture, imported for the tests below

#: The tree under test has the new path (False when run against the commit before).
FAST_PATH = hasattr(Tunnel, "_send_at_once")

Frames = list[tuple[FrameType, int, bytes]]


# --------------------------------------------------------------------------- helpers


@dataclass
class SendPath:
    """Which way ``_send_now`` may go in this run, and the lengths that went at once."""

    at_once_allowed: bool
    at_once: list[int] = field(default_factory=list)

    def expect_at_once(self, *lengths: int) -> None:
        """The sends of these lengths (in order), and no others, left without the queue."""
        if self.at_once_allowed and FAST_PATH:
            assert self.at_once == list(lengths)
        else:
            assert self.at_once == []


@pytest.fixture(params=["at once", "queued"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SendPath:
    """At once: ``_send_at_once`` as it is (counted); queued: it always declines, so
    ``_send_now`` is the code before the commit."""
    record = SendPath(at_once_allowed=request.param == "at once")
    original: Callable[[Tunnel, TunnelStream, bytes | bytearray], bool] | None = getattr(
        Tunnel, "_send_at_once", None
    )

    def counting(self: Tunnel, stream: TunnelStream, data: bytes | bytearray) -> bool:
        if original is None or not record.at_once_allowed:
            return False
        taken = original(self, stream, data)
        if taken:
            record.at_once.append(len(data))
        return taken

    monkeypatch.setattr(Tunnel, "_send_at_once", counting, raising=False)
    return record


class WireRecorder(GatedTransport):
    """Records every message in the order it reaches the in-memory WebSocket."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__(ws)
        self.wire: list[bytes] = []

    async def send_message(self, message: bytes) -> None:
        await self._open.wait()
        self.wire.append(bytes(message))
        await self.ws.send_message(message)


class RecordingEager(EagerGatedTransport, WireRecorder):
    """The eager transport of test_eager_send; its forwarder and the tunnel's writer both
    write through :class:`WireRecorder` (next in the MRO), so ``wire`` is the wire order.
    Closing first lets the forwarder write what was sent now, as a socket delivers what it
    took before its FIN (the eager transport reports such messages as not pending)."""

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._drained.wait()
        await super().aclose(code, reason)


@asynccontextmanager
async def recorded_pair(
    gateway_settings: TunnelSettings | None = None,
    connector_settings: TunnelSettings | None = None,
    *,
    accept: bool = True,
    eager_side: str = "gateway",
) -> AsyncIterator[tuple[TunnelPair, RecordingEager]]:
    """tunnel_pair with an eager, recording transport on ``eager_side``."""
    async with (
        tunnel_pair(gateway_settings, connector_settings, accept=accept) as pair,
        trio.open_nursery() as nursery,
    ):
        tunnel = pair.gateway if eager_side == "gateway" else pair.connector
        plain = pair.gateway_transport if eager_side == "gateway" else pair.connector_transport
        eager = RecordingEager(plain.ws)
        tunnel._transport = eager
        tunnel._eager = eager  # type: ignore[assignment]  # the pair's own transport
        nursery.start_soon(eager.forward)
        try:
            yield pair, eager
        finally:
            eager.release_sends()
            nursery.cancel_scope.cancel()


def frames_of(messages: list[bytes]) -> list[Frames]:
    """Each message decoded into (type, stream id, payload) frames."""
    decoded = []
    for message in messages:
        decoder = FrameDecoder(max_payload=1 << 24)
        frames = [(f.type, f.stream_id, bytes(f.payload)) for f in decoder.feed(message)]
        assert decoder.at_frame_boundary
        decoded.append(frames)
    return decoded


def shape(messages: list[bytes]) -> list[list[tuple[FrameType, int, int]]]:
    """Each message as (type, stream id, payload length) per frame."""
    return [[(k, s, len(p)) for k, s, p in frames] for frames in frames_of(messages)]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# --------------------------------------------------------------------------- order on the wire


@pytest.mark.parametrize("accept", ["sent", "held", "cannot send now"])
async def test_an_unaccepted_stream_sends_its_accept_then_its_data(
    path: SendPath, accept: str
) -> None:
    """The connector's handler splices a stream it has not accepted: ``_accept_now`` sends the
    ACCEPT at once (the writer is idle), then the read leaves as its own message. When the
    transport keeps part of the ACCEPT ("held"), or cannot send (the ACCEPT is queued and
    the writer woken), the read is queued behind it: never ahead of the ACCEPT."""
    with trio.fail_after(GUARD):
        async with recorded_pair(accept=False, eager_side="connector") as (pair, eager):
            opener = await pair.gateway.open_stream({"protocol": "test"}, wait_accepted=False)
            acceptor = await pair.accepted.receive()
            await settle()
            eager.wire.clear()
            if accept == "held":
                eager.hold_sends()
            elif accept == "cannot send now":
                eager.accepting_now = False
            assert acceptor._send_now(b"reply") == 5
            eager.accepting_now = True
            eager.release_sends()
            await settle()
            sid = acceptor.stream_id
            if accept == "cannot send now":  # both queued: one message from the writer
                assert frames_of(eager.wire) == [
                    [(FrameType.ACCEPT, sid, b"{}"), (FrameType.DATA, sid, b"reply")]
                ]
            else:
                assert frames_of(eager.wire) == [
                    [(FrameType.ACCEPT, sid, b"{}")],
                    [(FrameType.DATA, sid, b"reply")],
                ]
            if accept == "sent":
                path.expect_at_once(5)
            else:
                path.expect_at_once()
            await opener.wait_accepted()
            assert await opener.receive_some() == b"reply"


@pytest.mark.parametrize(
    "ahead", ["ping", "control", "go_away", "window_update", "fin", "reset", "open"]
)
async def test_a_frame_queued_ahead_is_never_overtaken(path: SendPath, ahead: str) -> None:
    """Whatever another path queued and the writer has not taken yet (here queued in the mux
    without waking the writer, as the reader's acknowledge of an unknown stream does until the
    end of its loop) leaves first, in the same message as the read. (Checked: with
    take_data_frame's ``_pending_bytes`` test removed, every case fails.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            other, other_acceptor = await pair.open_pair()
            mux = pair.gateway._mux
            if ahead == "window_update":
                # 600 KiB unread on the gateway side: acknowledging it returns credit.
                await other_acceptor.send_all(b"w" * (600 * 1024))
            await settle()
            eager.wire.clear()
            expected: tuple[FrameType, int]
            if ahead == "ping":
                mux.ping(b"12345678")
                expected = (FrameType.PING, 0)
            elif ahead == "control":
                mux.send_control({"note": "queued"})
                expected = (FrameType.CONTROL, 0)
            elif ahead == "go_away":
                mux.go_away(ResetCode.NO_ERROR, "review")
                expected = (FrameType.GO_AWAY, 0)
            elif ahead == "window_update":
                assert other.buffered == 600 * 1024
                mux.acknowledge(other.stream_id, other.buffered)
                expected = (FrameType.WINDOW_UPDATE, other.stream_id)
            elif ahead == "fin":
                other._fin_sent = True
                mux.send_fin(other.stream_id)
                expected = (FrameType.FIN, other.stream_id)
            elif ahead == "reset":
                mux.reset_stream(other.stream_id, ResetCode.CANCELLED, "review")
                other._fail(StreamError(ResetCode.CANCELLED, "review"))
                expected = (FrameType.RESET, other.stream_id)
            else:
                new_id = mux.open_stream({"protocol": "test"})
                expected = (FrameType.OPEN, new_id)
            assert opener._send_now(b"after it") == 8
            await settle()
            (message,) = frames_of(eager.wire)
            assert [(kind, sid) for kind, sid, _ in message] == [
                expected,
                (FrameType.DATA, opener.stream_id),
            ]
            path.expect_at_once()
            assert await acceptor.receive_some() == b"after it"


@pytest.mark.parametrize("how", ["held", "cannot send now", "writer mid-send"])
async def test_a_read_behind_the_writers_message_stays_behind_it(path: SendPath, how: str) -> None:
    """Held: the first read leaves at once but the transport keeps part of it (the writer
    is woken to flush). Cannot send now: the first read is queued and the writer woken; the
    second finds it queued. Writer mid-send: the writer has taken the first read from the
    queue and is sending it (the queue is empty again) when the transport could take a
    message at once. In each case the second read, while the writer is not idle, is queued
    behind and leaves after the first. (Checked: without the ``_writer_waiters`` test in
    _send_at_once, "held" and "writer mid-send" fail; without the ``can_send_now`` test,
    "cannot send now" and "writer mid-send" do.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            writer_messages = eager.writer_messages
            if how == "held":
                eager.hold_sends()
            elif how == "cannot send now":
                eager.accepting_now = False
            else:
                eager.accepting_now = False
                eager.hold_sends()
            assert opener._send_now(b"one") == 3
            if how == "writer mid-send":
                await settle()  # the writer took "one" and waits for the transport
                assert pair.gateway._mux.pending_bytes == 0
                assert len(pair.gateway._writer_waiters) == 0
            eager.accepting_now = True
            assert opener._send_now(b"two") == 3
            await settle()
            eager.release_sends()
            await settle()
            sid = opener.stream_id
            if how == "cannot send now":  # both queued: the writer sends them in one message
                assert frames_of(eager.wire) == [
                    [(FrameType.DATA, sid, b"one"), (FrameType.DATA, sid, b"two")]
                ]
                assert eager.writer_messages == writer_messages + 1
            else:
                assert frames_of(eager.wire) == [
                    [(FrameType.DATA, sid, b"one")],
                    [(FrameType.DATA, sid, b"two")],
                ]
                assert eager.writer_messages == writer_messages + (1 if how == "held" else 2)
            if how == "held":
                path.expect_at_once(3)
            else:
                path.expect_at_once()
            assert await receive_exactly(acceptor, 6) == b"onetwo"


# --------------------------------------------------------------------------- credit and steps


@pytest.mark.parametrize("over", [0, 1], ids=["exactly the credit", "one byte more"])
async def test_credit_at_the_boundary(path: SendPath, over: int) -> None:
    """Credit of 4,096 bytes: a read of exactly that leaves whole (at once) and uses the
    window up; one byte more is the queued path's partial send. (Checked: with the credit not
    spent in take_data_frame, "exactly" sends the next byte without credit and fails.)"""
    window = 4096
    peer = TunnelSettings(mux=MuxSettings(initial_window=window, max_window=window))
    with trio.fail_after(GUARD):
        async with recorded_pair(connector_settings=peer) as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            data = os.urandom(window + over)
            assert opener._send_now(data) == window
            assert pair.gateway._mux.send_window(opener.stream_id) == 0
            assert opener._sent == window
            assert opener._send_now(b"x") == 0  # no credit left, either way
            await settle()
            assert shape(eager.wire) == [[(FrameType.DATA, opener.stream_id, window)]]
            if over == 0:
                path.expect_at_once(window)
            else:
                path.expect_at_once()
            assert await receive_exactly(acceptor, window) == data[:window]
            assert not pair.gateway.closed
            assert not pair.connector.closed


@pytest.mark.parametrize("size", [1987, 1988, 1989])
async def test_a_message_never_exceeds_max_message_size(path: SendPath, size: int) -> None:
    """max_message_size 2,000: a step is 1,988 bytes (a frame is never split across messages).
    A read of a step leaves at once as one message of exactly 2,000 bytes; one byte more is
    two steps, two frames, two messages. (Checked: without the send-step test in
    _send_at_once, 1,989 bytes leave as one 2,001-byte message.)"""
    limit = 2000
    step = limit - HEADER_SIZE
    settings = TunnelSettings(max_message_size=limit)
    with trio.fail_after(GUARD):
        async with recorded_pair(settings) as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            data = os.urandom(size)
            assert opener._send_now(data) == size
            await settle()
            assert all(len(message) <= limit for message in eager.wire)
            sid = opener.stream_id
            if size <= step:
                assert shape(eager.wire) == [[(FrameType.DATA, sid, size)]]
                path.expect_at_once(size)
            else:
                assert shape(eager.wire) == [
                    [(FrameType.DATA, sid, step)],
                    [(FrameType.DATA, sid, size - step)],
                ]
                path.expect_at_once()
            assert await receive_exactly(acceptor, size) == data


@pytest.mark.parametrize("limit", ["data_chunk_size", "peer's max_frame_size"])
@pytest.mark.parametrize("size", [16 * 1024, 16 * 1024 + 1])
async def test_frames_are_cut_at_the_chunk_and_peer_frame_size(
    path: SendPath, limit: str, size: int
) -> None:
    """A frame holds at most data_chunk_size bytes and at most what the peer accepts: a read
    of 16 KiB under a 16 KiB limit leaves at once as one frame, one byte more is two frames
    in one message (queued). (Checked: without take_data_frame's size tests, 16 KiB + 1
    leaves as one frame and the test fails; with the peer's limit the peer would also reject
    it as too large.)"""
    ours = TunnelSettings(mux=MuxSettings(data_chunk_size=16 * 1024))
    peers = TunnelSettings(mux=MuxSettings(max_frame_size=16 * 1024))
    gateway, connector = (ours, None) if limit == "data_chunk_size" else (None, peers)
    with trio.fail_after(GUARD):
        async with recorded_pair(gateway, connector) as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            data = os.urandom(size)
            assert opener._send_now(data) == size
            assert await receive_exactly(acceptor, size) == data
            await settle()
            sid = opener.stream_id
            if size == 16 * 1024:
                assert shape(eager.wire) == [[(FrameType.DATA, sid, size)]]
                path.expect_at_once(size)
            else:
                assert shape(eager.wire) == [
                    [(FrameType.DATA, sid, 16 * 1024), (FrameType.DATA, sid, 1)]
                ]
                path.expect_at_once()
            assert not pair.connector.closed


async def test_send_steps_grow_with_bytes_served_as_before(path: SendPath) -> None:
    """Below SERVED_LIMIT a step is 64 KiB (a read of 64 KiB + 1 is two steps, queued); past
    it a step is 256 KiB (a 256 KiB read leaves at once, one frame). ``_sent`` counts both.
    (Checked: without ``_sent += len(data)`` on the new path this fails.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            first = os.urandom(SERVED_LIMIT - 1)
            await opener.send_all(first)
            assert await receive_exactly(acceptor, len(first)) == first
            await settle()
            eager.wire.clear()
            sid = opener.stream_id
            small = os.urandom(1000)
            assert opener._send_now(small) == 1000  # one step: at once
            assert opener._sent == SERVED_LIMIT - 1 + 1000
            assert await receive_exactly(acceptor, 1000) == small
            await settle()
            assert shape(eager.wire) == [[(FrameType.DATA, sid, 1000)]]
            eager.wire.clear()
            more = os.urandom(MAX_SEND_CHUNK)
            assert opener._send_now(more) == MAX_SEND_CHUNK  # past the limit: one step
            assert opener._sent == SERVED_LIMIT - 1 + 1000 + MAX_SEND_CHUNK
            assert await receive_exactly(acceptor, MAX_SEND_CHUNK) == more
            await settle()
            data_frames = [f for m in shape(eager.wire) for f in m if f[0] is FrameType.DATA]
            assert data_frames == [(FrameType.DATA, sid, MAX_SEND_CHUNK)]
            path.expect_at_once(1000, MAX_SEND_CHUNK)


async def test_a_read_of_more_than_a_first_step_is_queued_in_steps(path: SendPath) -> None:
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            data = os.urandom(FIRST_SEND_CHUNK + 1)
            assert opener._send_now(data) == len(data)
            assert await receive_exactly(acceptor, len(data)) == data
            await settle()
            assert shape(eager.wire) == [
                [
                    (FrameType.DATA, opener.stream_id, FIRST_SEND_CHUNK),
                    (FrameType.DATA, opener.stream_id, 1),
                ]
            ]
            path.expect_at_once()


@pytest.mark.parametrize("held", [False, True], ids=["sent", "held by the transport"])
async def test_a_bytearray_read_is_copied_before_send_now_returns(
    path: SendPath, held: bool
) -> None:
    """The splice may reuse its buffer as soon as ``_send_now`` returns: what leaves is what
    was read, also when the transport holds the message. (Checked: a variant of _send_at_once
    that hands the transport the header and then the caller's bytearray itself sends the
    overwritten bytes.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            if held:
                eager.hold_sends()
            buffer = bytearray(b"request bytes")
            assert opener._send_now(buffer) == len(buffer)
            buffer[:] = b"X" * len(buffer)
            eager.release_sends()
            assert await receive_exactly(acceptor, 13) == b"request bytes"
            path.expect_at_once(13)


# --------------------------------------------------------------------------- ends and failures


async def test_a_read_after_the_peer_reset_but_before_its_reset_arrived(path: SendPath) -> None:
    """The acceptor resets; before the gateway reads the RESET, the opener's splice hands it a
    read: taken (the peer drops DATA of a stream it reset), the tunnel stays up, and the next
    read finds the stream reset."""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await settle()
            eager.wire.clear()
            acceptor.reset_nowait(ResetCode.CANCELLED, "review")  # queued, not yet read
            assert opener._send_now(b"late") == 4
            await settle()
            assert frames_of(eager.wire) == [[(FrameType.DATA, opener.stream_id, b"late")]]
            path.expect_at_once(4)
            assert opener._send_now(b"later") == 0
            assert opener.error is not None
            assert opener.error.code == ResetCode.CANCELLED
            assert not pair.gateway.closed
            assert not pair.connector.closed


async def test_nothing_leaves_after_an_abort(path: SendPath) -> None:
    """abort cancels the writer at once (it leaves the parking lot): a read handed over before
    the tunnel's end failed the streams is taken as queued data would be, and never sent.
    (Checked: without the ``_writer_waiters`` test in _send_at_once the read leaves at once
    after the abort, and the test fails.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, _ = await pair.open_pair()
            await settle()
            eager.wire.clear()
            pair.gateway.abort("review")
            assert len(pair.gateway._writer_waiters) == 0
            assert opener._send_now(b"too late") == 8
            await pair.gateway.wait_closed()
            await settle()
            assert eager.wire == []
            path.expect_at_once()
            assert opener._send_now(b"x") == 0


async def test_after_a_protocol_error_only_the_go_away_leaves(path: SendPath) -> None:
    """The peer breaks the protocol: the gateway fails every stream before it lets the writer
    drain, so no read is sent after the GO_AWAY that names the error. (Checked: without the
    ``_error`` test at the top of _send_now, take_data_frame raises StreamStateError for the
    stream the terminated mux forgot, and the test fails.)"""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, _ = await pair.open_pair()
            await settle()
            eager.wire.clear()
            gateway = pair.gateway
            original = gateway._protocol_failure
            taken: list[int] = []

            def failing_then_reading(exc: ProtocolError) -> None:
                original(exc)
                # A splice's read handed over right after (before the writer drains).
                taken.append(opener._send_now(b"after the error"))

            gateway._protocol_failure = failing_then_reading  # type: ignore[method-assign]
            await pair.connector_transport.inject(b"\xff" * 20)
            await settle()
            assert taken == [0]
            assert opener.error is not None
            await pair.gateway.wait_closed()
            assert "protocol error" in pair.gateway.close_reason
            kinds = [kind for message in frames_of(eager.wire) for kind, _, _ in message]
            assert kinds == [FrameType.GO_AWAY]
            path.expect_at_once()


async def test_a_graceful_go_away_delivers_the_last_read_then_closes(path: SendPath) -> None:
    """The gateway goes away; its last stream's last read (at once), its FIN, then the drain:
    every byte arrives before the tunnel closes, in order."""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await acceptor.send_eof()
            assert await opener.receive_some() == b""
            pair.gateway.go_away()
            await settle()
            eager.wire.clear()
            assert opener._send_now(b"last words") == 10
            await opener.aclose()  # FIN (we got the peer's): the tunnel drains and closes
            assert await receive_exactly(acceptor, 10) == b"last words"
            assert await acceptor.receive_some() == b""
            await pair.gateway.wait_closed()
            assert pair.gateway.close_reason == "tunnel went away gracefully"
            sid = opener.stream_id
            kinds = [(k, s) for message in frames_of(eager.wire) for k, s, _ in message]
            assert kinds == [(FrameType.DATA, sid), (FrameType.FIN, sid)]
            path.expect_at_once(10)


# --------------------------------------------------------------------------- fairness


@pytest.mark.parametrize("b_served", [0, 1000], ids=["B served no more", "B served more"])
async def test_a_stream_woken_for_room_keeps_its_turn(path: SendPath, b_served: int) -> None:
    """A waits for room (the queue at the high-water mark); the heartbeat's PING leaves at
    once from ``_wake_writer``, which then wakes A (``_wake_blocked(everyone=True)``) with the
    writer still idle. In the same scheduler pass, before A's task runs, B's splice hands
    over a read (the test calls ``_send_now`` right after, as B's pump task would when trio
    runs it first: both are runnable in the next batch, in random order). Least served
    first: if B has been served more than A, B gives way and A's data leaves first.

    The queue is filled with a PING queued before ``_wake_writer`` (the heartbeat's two calls,
    with A's send in between, high-water mark 16 bytes): only to make A wait while the writer
    is idle, which otherwise happens for a scheduler pass at a time. (Checked: the "served
    more" case passes against the tree before the commit and fails against this one; with
    ``len(self._output_blocked)`` in _send_at_once replaced by
    ``self._output_blocked.others_waiting()`` it passes; the "no more" case passes on all
    three.)"""
    settings = TunnelSettings(output_high_water=16)
    with trio.fail_after(GUARD):
        async with recorded_pair(settings) as (pair, eager):
            gateway = pair.gateway
            a, a_peer = await pair.open_pair()
            b, b_peer = await pair.open_pair()
            if b_served:
                await b.send_all(b"b" * b_served)
                assert await receive_exactly(b_peer, b_served) == b"b" * b_served
            await settle()
            eager.wire.clear()
            async with trio.open_nursery() as nursery:
                gateway._mux.ping(b"12345678")  # the heartbeat's ping, its wake comes below
                nursery.start_soon(a.send_all, b"A" * 100)
                await settle()
                assert a in gateway._output_blocked  # A waits for room
                assert len(gateway._writer_waiters) == 1  # the writer is idle
                gateway._wake_writer()  # the heartbeat's wake: PING at once, A woken
                assert not len(gateway._output_blocked)
                assert gateway._output_blocked.others_waiting()  # A has not run yet
                taken = b._send_now(b"B" * 100)  # B's pump, first in the next batch
                if taken < 100:
                    nursery.start_soon(b.send_all, b"B" * (100 - taken))  # as _send_rest
            assert await receive_exactly(a_peer, 100) == b"A" * 100
            assert await receive_exactly(b_peer, 100) == b"B" * 100
            await settle()
            order = [
                sid
                for message in frames_of(eager.wire)
                for kind, sid, _ in message
                if kind is FrameType.DATA
            ]
            expected = [b.stream_id, a.stream_id] if not b_served else [a.stream_id, b.stream_id]
            assert order == expected


async def test_many_streams_reading_at_once_each_arrive_whole(path: SendPath) -> None:
    """100 streams, each handing over ten small reads in turn (the writer idle between them
    or not, depending on what the transport took): every stream's bytes arrive in order."""
    with trio.fail_after(GUARD):
        async with recorded_pair() as (pair, eager):
            pairs = [await pair.open_pair() for _ in range(100)]
            await settle()
            eager.wire.clear()
            for round_ in range(10):
                if round_ % 3 == 1:
                    eager.hold_sends()  # the first read of the round stays partly unsent
                for n, (opener, _) in enumerate(pairs):
                    data = b"%03d:%d;" % (n, round_)
                    taken = opener._send_now(data)
                    if taken < len(data):
                        await opener.send_all(data[taken:])
                eager.release_sends()
                await settle()
            for n, (_, acceptor) in enumerate(pairs):
                expected = b"".join(b"%03d:%d;" % (n, r) for r in range(10))
                assert await receive_exactly(acceptor, len(expected)) == expected
            if path.at_once_allowed and FAST_PATH:
                assert path.at_once  # some left at once, others queued behind the writer
            else:
                assert path.at_once == []


# --------------------------------------------------------------------------- real TLS


async def test_over_tls_a_read_the_socket_took_in_part_is_flushed_before_any_other(
    pki: Pki, path: SendPath
) -> None:
    """Our WebSocketLink over TLS on 127.0.0.1 with 4 KiB socket buffers, the peer not
    reading: a 60 KiB read leaves at once and the socket takes only part of it; the link
    cannot send now, so the next reads (this stream's and another's) are queued for the
    writer, which first flushes the rest. Everything arrives whole and in order."""
    with trio.fail_after(GUARD):
        async with tls_tunnels(pki) as tunnels:
            (first, first_peer), (second, second_peer) = [
                await tunnels.open_pair() for _ in range(2)
            ]
            await settle()
            link = tunnels.gateway_link
            tunnels.connector_reads.pause()
            big = os.urandom(60 * 1024)
            assert first._send_now(big) == len(big)
            assert link.send_pending  # part of the message waits for the writer's flush
            assert second._send_now(b"second stream") == 13
            assert first._send_now(b"tail") == 4
            await settle()
            tunnels.connector_reads.resume()
            assert await receive_exactly(first_peer, len(big) + 4) == big + b"tail"
            assert await receive_exactly(second_peer, 13) == b"second stream"
            path.expect_at_once(len(big))
            assert not link.send_pending


async def test_over_tls_a_reset_socket_under_a_read_sent_at_once_ends_the_tunnel(
    pki: Pki, path: SendPath
) -> None:
    """The peer's socket resets before the gateway's reader notices; the next read fails in
    os.write from the stream's task: the tunnel aborts with "connection lost", the read counts
    as taken, the stream then fails with NOT_CONNECTED. (Checked: with _send_at_once's
    ``except Exception`` narrowed, WebSocketClosed escapes from _send_now and this fails.)"""
    with trio.fail_after(GUARD):
        async with tls_tunnels(pki, small_buffers=False) as tunnels:
            opener, _ = await tunnels.open_pair()
            await settle()
            raw = tunnels.connector_reads.inner.socket
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # an RST to the gateway; its reader has not run yet
            assert opener._send_now(b"x" * 1000) == 1000
            assert tunnels.gateway._aborted_here  # from inside _send_now
            path.expect_at_once(1000)
            assert "connection lost" in tunnels.gateway.close_reason
            await tunnels.gateway.wait_closed()
            assert opener.error is not None
            assert opener.error.code == ResetCode.NOT_CONNECTED


SIZES = [1, 100, 1500, FIRST_SEND_CHUNK - 1, FIRST_SEND_CHUNK + 1, 300_000]


async def test_over_tls_spliced_exchanges_keep_every_byte(pki: Pki, path: SendPath) -> None:
    """Ten TCP forwards end to end: client socket ⇄ splice ⇄ gateway stream ⇄ TLS ⇄
    connector stream ⇄ splice ⇄ backend socket, each doing request/response rounds of sizes
    around the send steps, all at the same time. Every byte arrives in order both ways."""
    connections = 10

    async def one(n: int, opener: TunnelStream, acceptor: TunnelStream) -> None:
        async with (
            socket_pair() as (client, a),
            socket_pair() as (b, backend),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(splice_streams, a, opener)
            nursery.start_soon(splice_streams, acceptor, b)
            for size in SIZES:
                request = bytes([n]) * size
                response = os.urandom(size)
                async with trio.open_nursery() as both:
                    both.start_soon(client.send_all, request)
                    assert await receive_exactly(backend, size) == request
                async with trio.open_nursery() as both:
                    both.start_soon(backend.send_all, response)
                    assert await receive_exactly(client, size) == response
            nursery.cancel_scope.cancel()

    with trio.fail_after(GUARD * 2):
        async with tls_tunnels(pki, small_buffers=False) as tunnels:
            pairs = [await tunnels.open_pair() for _ in range(connections)]
            async with trio.open_nursery() as nursery:
                for n, (opener, acceptor) in enumerate(pairs):
                    nursery.start_soon(one, n, opener, acceptor)
            assert not tunnels.gateway.closed
            assert not tunnels.connector.closed
    if path.at_once_allowed and FAST_PATH:
        assert path.at_once
    else:
        assert path.at_once == []


# --------------------------------------------------------------------------- random sequences


async def random_sequence(seed: int) -> list[object]:
    """60 random steps on four streams of one tunnel pair (credit of 8 KiB each, a random
    high-water mark and message size): reads of random sizes handed to ``_send_now`` (the
    rest to ``send_all``, as the splice does), sometimes two in one scheduler pass or right
    after a heartbeat's PING and wake, the acceptors reading, the transport held, released or
    unable to send now. Between steps every task runs until all are blocked. Returns what
    ``_send_now`` returned at each step and every message on the wire, after checking that
    each stream's bytes arrived whole and in order."""
    # trio's batch order (private: it shuffles each batch); both runs must see the same one.
    scheduler_rng = getattr(trio._core._run, "_r", None)
    if scheduler_rng is None:
        pytest.skip("trio no longer has the private batch-order RNG this comparison seeds")
    scheduler_rng.seed(seed)
    rnd = random.Random(seed)
    trace: list[object] = []
    gateway_settings = TunnelSettings(
        output_high_water=rnd.choice([16, 2048, 8192, 1 << 20]),
        max_message_size=rnd.choice([4000, 1 << 20]),
    )
    connector_settings = TunnelSettings(mux=MuxSettings(initial_window=8192, max_window=8192))
    async with recorded_pair(gateway_settings, connector_settings) as (pair, eager):
        streams = [await pair.open_pair() for _ in range(4)]
        await settle()
        eager.wire.clear()
        expected = [bytearray() for _ in streams]
        received = [bytearray() for _ in streams]
        busy = [False] * len(streams)

        async def send_rest(i: int, data: bytes) -> None:
            try:
                await streams[i][0].send_all(data)
            finally:
                busy[i] = False

        def hand_over(nursery: trio.Nursery, what: str, i: int, size: int) -> None:
            if busy[i]:  # the splice is still sending its last read's rest
                trace.append(("busy", i))
                return
            data = bytes([65 + i]) * size
            taken = streams[i][0]._send_now(data)
            trace.append((what, i, size, taken))
            expected[i] += data
            if taken < size:
                busy[i] = True
                nursery.start_soon(send_rest, i, data[taken:])

        async with trio.open_nursery() as nursery:
            for _ in range(60):
                op = rnd.random()
                if op < 0.5:
                    hand_over(
                        nursery,
                        "read",
                        rnd.randrange(len(streams)),
                        rnd.choice([1, 10, 100, 1000, 3000, 5000, 9000]),
                    )
                    if rnd.random() < 0.5:  # another splice's read in the same pass
                        hand_over(
                            nursery, "same pass", rnd.randrange(4), rnd.choice([1, 100, 2000])
                        )
                elif op < 0.65:
                    i = rnd.randrange(len(streams))
                    if streams[i][1].buffered:
                        received[i] += await streams[i][1].receive_some()
                elif op < 0.75:
                    if rnd.random() >= 0.5:
                        eager.release_sends()
                    elif eager._open.is_set():
                        eager.hold_sends()
                elif op < 0.85:
                    eager.accepting_now = rnd.random() < 0.6
                elif op < 0.9:
                    pair.gateway._mux.ping(b"12345678")
                    if rnd.random() < 0.5:  # the heartbeat's wake, then a read
                        pair.gateway._wake_writer()
                        hand_over(
                            nursery, "after a wake", rnd.randrange(4), rnd.choice([1, 100, 2000])
                        )
                await settle()
            eager.release_sends()
            eager.accepting_now = True
            pair.gateway._wake_writer()
            for i, (_, acceptor) in enumerate(streams):
                while len(received[i]) < len(expected[i]):
                    received[i] += await acceptor.receive_some()
                assert received[i] == expected[i]
        await settle()
        trace.append(shape(eager.wire))
    return trace


@pytest.mark.parametrize("seed", range(60))
async def test_random_sequences_leave_the_same_wire_either_way(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each seed's sequence run at once and queued (twice, to show the run is deterministic
    under trio's seeded batch order): the same returns and the same messages. (Seeds 0-2999
    run this way: eight differ, 70, 367, 880, 1375, 1668, 2149, 2589 and 2809, every one at a
    read handed over right after a heartbeat's wake had woken a less-served stream (taken at
    once, where the queued path took 0 and gave way): the defect of
    test_a_stream_woken_for_room_keeps_its_turn. With ``others_waiting()`` instead of
    ``len(...)`` in _send_at_once all eight agree. A seed below that starts to differ after a
    change of trio's scheduler may be the same defect.)"""
    with trio.fail_after(GUARD):
        at_once = await random_sequence(seed)
        monkeypatch.setattr(Tunnel, "_send_at_once", lambda *_: False, raising=False)
        queued = await random_sequence(seed)
        assert await random_sequence(seed) == queued
    assert at_once == queued
