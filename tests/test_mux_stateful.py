"""Two wired muxes driven by a hypothesis state machine, checked against a simple model.

Rules open, accept, send, half-close, reset and consume streams on either side, move queued
frames into a per-direction "wire" in chunks of whole frames, and deliver arbitrary prefixes of
the wire to the peer. After every step the model and both muxes must agree: every stream's
received bytes are a prefix of what the peer sent, credit windows are never negative, no receiver
holds more than its window of unconsumed bytes, and a stream is forgotten exactly when it is
finished or reset. At the end every stream is closed and both muxes must hold none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backchannel._proto._errors import ResetCode
from backchannel._proto._events import (
    DataReceived,
    Event,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from backchannel._proto._frames import FrameDecoder
from backchannel._proto._mux import Mux, MuxSettings
from backchannel._proto._streamstate import StreamStateError

SIDES = ("connector", "gateway")
#: What each side promises the other; small windows and chunks so credit runs out often.
SETTINGS = {
    "connector": MuxSettings(
        initial_window=256, max_window=1024, max_frame_size=16 * 1024, data_chunk_size=100
    ),
    "gateway": MuxSettings(
        initial_window=300, max_window=1200, max_frame_size=16 * 1024, data_chunk_size=120
    ),
}
MAX_STREAMS = 10

side_strategy = st.sampled_from(SIDES)


def other(side: str) -> str:
    return "gateway" if side == "connector" else "connector"


def pattern(stream_id: int, offset: int, count: int) -> bytes:
    """Bytes that differ by stream and position, so loss, duplication or reordering shows."""
    return bytes((stream_id * 31 + offset + i) % 251 for i in range(count))


@dataclass
class View:
    """One side's knowledge of one stream, built only from its own calls and events."""

    opener: bool
    known: bool
    accepted: bool = False  # opener: ACCEPT received; acceptor: accept_stream() called
    fin_sent: bool = False
    fin_received: bool = False
    reset: bool = False
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    consumed: int = 0

    @property
    def expected_open(self) -> bool:
        """The mux must still hold the stream: seen, not reset, not finished both ways."""
        finished = self.accepted and self.fin_sent and self.fin_received
        return self.known and not self.reset and not finished

    @property
    def may_send(self) -> bool:
        return self.expected_open and not self.fin_sent and (self.opener or self.accepted)


def awaiting_accept(view: View) -> bool:
    return not view.opener and view.expected_open and not view.accepted


def can_send(view: View) -> bool:
    return view.may_send


def is_open(view: View) -> bool:
    return view.expected_open


def has_unconsumed(view: View) -> bool:
    return len(view.received) > view.consumed


def cannot_send(view: View) -> bool:
    return view.known and not view.may_send


def exists(predicate: Callable[[View], bool]) -> Callable[[MuxPair], bool]:
    """A rule precondition: some side's view of some stream satisfies ``predicate``."""
    return lambda machine: bool(machine.views(predicate))


class MuxPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mux = {
            "connector": Mux(initiator=True, settings=SETTINGS["connector"]),
            "gateway": Mux(initiator=False, settings=SETTINGS["gateway"]),
        }
        self.wire = {side: bytearray() for side in SIDES}  # bytes sent by ``side``, in flight
        self.streams: dict[int, dict[str, View]] = {}
        self.metadata: dict[int, dict[str, Any]] = {}
        connector, gateway = self.mux["connector"], self.mux["gateway"]
        connector.send_hello({"subaccount": "acme"})
        (hello,) = gateway.receive_data(connector.data_to_send())
        assert isinstance(hello, HelloReceived)
        gateway.send_hello({})
        (hello,) = connector.receive_data(gateway.data_to_send())
        assert isinstance(hello, HelloReceived)
        assert self.mux["connector"].ready
        assert self.mux["gateway"].ready

    # ------------------------------------------------------------------ helpers

    def pick(self, data: st.DataObject, predicate: Callable[[View], bool]) -> tuple[int, str]:
        return data.draw(st.sampled_from(self.views(predicate)), label="stream, side")

    def views(self, predicate: Callable[[View], bool]) -> list[tuple[int, str]]:
        return sorted(
            (stream_id, side)
            for stream_id, by_side in self.streams.items()
            for side, view in by_side.items()
            if predicate(view)
        )

    def window(self, receiver: str) -> int:
        """The most a receiver's window may grow to (it starts at initial_window)."""
        return max(SETTINGS[receiver].max_window, SETTINGS[receiver].initial_window)

    def flush(self, side: str, max_bytes: int | None) -> None:
        mux = self.mux[side]
        before = mux.pending_bytes
        chunk = mux.data_to_send(max_bytes)
        assert len(chunk) == before - mux.pending_bytes
        if max_bytes is not None and len(chunk) > max_bytes:
            assert len(FrameDecoder().feed(chunk)) == 1  # only a single oversized frame
        checker = FrameDecoder()
        checker.feed(chunk)
        assert checker.at_frame_boundary, "data_to_send() cut a frame"
        self.wire[side] += chunk

    def flush_all(self, side: str) -> None:
        while self.mux[side].pending_bytes:
            self.flush(side, None)

    def deliver(self, sender: str, count: int) -> None:
        chunk = bytes(self.wire[sender][:count])
        del self.wire[sender][:count]
        receiver = other(sender)
        for event in self.mux[receiver].receive_data(chunk):
            self.on_event(receiver, event)

    def deliver_all(self, sender: str) -> None:
        self.deliver(sender, len(self.wire[sender]))

    def settle(self) -> None:
        while any(self.wire.values()) or any(m.pending_bytes for m in self.mux.values()):
            for side in SIDES:
                self.flush_all(side)
                self.deliver_all(side)

    def on_event(self, side: str, event: Event) -> None:
        if isinstance(event, PingReceived | PongReceived):
            return
        assert isinstance(
            event,
            StreamOpened
            | StreamAccepted
            | DataReceived
            | StreamEnded
            | StreamReset
            | WindowUpdated,
        ), event
        view = self.streams[event.stream_id][side]
        peer = self.streams[event.stream_id][other(side)]
        if isinstance(event, StreamOpened):
            assert not view.opener
            assert not view.known
            assert event.metadata == self.metadata[event.stream_id]
            view.known = True
            return
        assert view.known
        assert not view.reset, f"{event} for a stream this side reset"
        if isinstance(event, StreamAccepted):
            assert view.opener
            assert not view.accepted
            view.accepted = True
        elif isinstance(event, DataReceived):
            assert not view.fin_received
            view.received += event.data
            assert peer.sent.startswith(view.received), "bytes lost, duplicated or reordered"
        elif isinstance(event, StreamEnded):
            assert peer.fin_sent
            assert view.received == peer.sent, "FIN overtook data"
            view.fin_received = True
        elif isinstance(event, StreamReset):
            assert event.remote
            assert peer.reset
            view.reset = True

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: len(self.streams) < MAX_STREAMS)
    @rule(side=side_strategy, port=st.integers(1, 65535))
    def open_stream(self, side: str, port: int) -> None:
        metadata = {"protocol": "tcp", "host": "erp.virtual", "port": port}
        stream_id = self.mux[side].open_stream(metadata)
        assert stream_id not in self.streams
        assert stream_id % 2 == (1 if side == "connector" else 0)
        self.metadata[stream_id] = metadata
        self.streams[stream_id] = {
            side: View(opener=True, known=True),
            other(side): View(opener=False, known=False),
        }

    @precondition(exists(awaiting_accept))
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        stream_id, side = self.pick(data, awaiting_accept)
        self.mux[side].accept_stream(stream_id, {"side": side})
        self.streams[stream_id][side].accepted = True

    @precondition(exists(can_send))
    @rule(data=st.data(), size=st.sampled_from([1, 128, 300, 600]) | st.integers(0, 600))
    def send(self, data: st.DataObject, size: int) -> None:
        stream_id, side = self.pick(data, can_send)
        view = self.streams[stream_id][side]
        mux = self.mux[side]
        window = mux.send_window(stream_id)
        payload = pattern(stream_id, len(view.sent), size)
        taken = mux.send_data(stream_id, payload)
        assert taken == min(size, window), "send_data must take exactly what the credit allows"
        assert mux.send_window(stream_id) == window - taken
        view.sent += payload[:taken]

    @precondition(exists(is_open))
    @rule(data=st.data(), code=st.sampled_from(ResetCode))
    def fin_or_reset(self, data: st.DataObject, code: ResetCode) -> None:
        """Half-close a direction (FIN) or abort both (RESET); one rule so streams live longer."""
        if exists(can_send)(self) and data.draw(st.booleans(), label="fin"):
            stream_id, side = self.pick(data, can_send)
            self.mux[side].send_fin(stream_id)
            self.streams[stream_id][side].fin_sent = True
            return
        stream_id, side = self.pick(data, is_open)
        self.mux[side].reset_stream(stream_id, code, "test reset")
        self.streams[stream_id][side].reset = True
        assert not self.mux[side].is_open(stream_id)

    @precondition(exists(has_unconsumed))
    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        # Mostly streams still receiving: that is where consuming returns credit.
        receiving = exists(lambda v: has_unconsumed(v) and v.expected_open and not v.fin_received)
        if receiving(self) and data.draw(st.booleans(), label="receiving stream"):
            stream_id, side = self.pick(data, lambda v: has_unconsumed(v) and v.expected_open)
        else:
            stream_id, side = self.pick(data, has_unconsumed)
        view = self.streams[stream_id][side]
        available = len(view.received) - view.consumed
        count = data.draw(st.just(available) | st.integers(1, available))
        self.mux[side].acknowledge(stream_id, count)
        view.consumed += count

    @precondition(exists(cannot_send))
    @rule(data=st.data())
    def misuse(self, data: st.DataObject) -> None:
        """A local call the stream's state forbids raises StreamStateError and queues nothing."""
        stream_id, side = self.pick(data, cannot_send)
        mux = self.mux[side]
        before = mux.pending_bytes
        try:
            if data.draw(st.booleans()):
                mux.send_data(stream_id, b"x")
            else:
                mux.send_fin(stream_id)
        except StreamStateError:
            pass
        else:
            raise AssertionError("illegal send was accepted")
        assert mux.pending_bytes == before

    @rule(
        sender=side_strategy,
        max_bytes=st.none() | st.integers(0, 1000),
        ping=st.booleans(),
        data=st.data(),
    )
    def deliver_partial_bytes(
        self, sender: str, max_bytes: int | None, ping: bool, data: st.DataObject
    ) -> None:
        """Maybe move whole frames onto the wire, then hand the peer any prefix of the wire."""
        if ping:  # an urgent frame that must overtake queued DATA without breaking anything
            self.mux[sender].ping(b"pingpong")
        if max_bytes != 0:
            self.flush(sender, max_bytes)
        pending = len(self.wire[sender])
        self.deliver(sender, data.draw(st.just(pending) | st.integers(0, pending), label="bytes"))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def streams_open_exactly_when_the_model_says(self) -> None:
        for side, mux in self.mux.items():
            expected = {sid for sid, v in self.streams.items() if v[side].expected_open}
            actual = {sid for sid in self.streams if mux.is_open(sid)}
            assert actual == expected, side
            assert mux.open_stream_count == len(expected), side

    @invariant()
    def received_bytes_are_a_prefix_of_sent_bytes(self) -> None:
        for by_side in self.streams.values():
            for side in SIDES:
                assert by_side[other(side)].sent.startswith(by_side[side].received)

    @invariant()
    def windows_are_never_negative(self) -> None:
        for mux in self.mux.values():
            for stream_id in self.streams:
                assert mux.send_window(stream_id) >= 0
                state = mux._streams.get(stream_id)
                if state is not None:
                    assert state.send_window >= 0
                    assert state.receive_window >= 0
                    assert state.unacknowledged >= 0

    @invariant()
    def nobody_holds_more_than_its_window_unconsumed(self) -> None:
        for by_side in self.streams.values():
            for receiver in SIDES:
                view = by_side[receiver]
                sent = len(by_side[other(receiver)].sent)
                # Sent (received or still in flight) but not consumed is bounded by the window.
                assert sent - view.consumed <= self.window(receiver)
                assert len(view.received) - view.consumed <= self.window(receiver)

    @invariant()
    def the_tunnel_stays_up(self) -> None:
        for mux in self.mux.values():
            assert mux.accepting_streams

    # ------------------------------------------------------------------ the end

    def teardown(self) -> None:
        """Finish every stream the polite way; both muxes must then forget all of them."""
        self.settle()
        for stream_id, side in self.views(lambda v: v.expected_open and not v.accepted):
            if not self.streams[stream_id][side].opener:
                self.mux[side].accept_stream(stream_id)
                self.streams[stream_id][side].accepted = True
        for stream_id, side in self.views(lambda v: v.may_send):
            self.mux[side].send_fin(stream_id)
            self.streams[stream_id][side].fin_sent = True
        self.settle()
        for stream_id, by_side in self.streams.items():
            if not any(view.reset for view in by_side.values()):
                for side in SIDES:
                    assert by_side[side].received == by_side[other(side)].sent, stream_id
                    assert by_side[side].fin_received
        self.streams_open_exactly_when_the_model_says()
        assert self.mux["connector"].open_stream_count == 0
        assert self.mux["gateway"].open_stream_count == 0


MuxPair.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMuxPair = MuxPair.TestCase
