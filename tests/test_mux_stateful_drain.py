"""The mux state machine of tests/test_mux_stateful.py, extended where it had no rules: GO_AWAY
from either side at any moment (opens crossing it on the wire, graceful drain of the streams
below the last id) and a concurrent-stream limit of one, so that it is hit all the time.

The model learns two new facts: GO_AWAY resets, locally and with REFUSED, our streams above the
peer's last id (the peer never saw them); and after GO_AWAY (sent or received), or with the
peer's limit reached, ``open_stream`` refuses with REFUSED and queues nothing. Every invariant of
the base machine still holds, including "a remote reset means the peer reset it": the peer's mux
never refuses an OPEN that its own accounting should have let through.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from backchannel._proto._errors import ProtocolError, ResetCode
from backchannel._proto._events import (
    Event,
    GoAwayReceived,
    HelloReceived,
    StreamOpened,
    StreamReset,
)
from backchannel._proto._mux import Mux, MuxSettings
from tests.test_mux_stateful import MAX_STREAMS, SIDES, MuxPair, other, side_strategy

#: At most this many concurrent streams opened by the other side (both sides promise it).
LIMIT = 1
DRAIN_SETTINGS = {
    "connector": MuxSettings(
        initial_window=256,
        max_window=1024,
        max_frame_size=16 * 1024,
        data_chunk_size=100,
        max_concurrent_streams=LIMIT,
    ),
    "gateway": MuxSettings(
        initial_window=300,
        max_window=1200,
        max_frame_size=16 * 1024,
        data_chunk_size=120,
        max_concurrent_streams=LIMIT,
    ),
}


class DrainingMuxPair(MuxPair):
    def __init__(self) -> None:
        super().__init__()
        # The same handshake as the base machine, with the small stream limit.
        self.mux = {
            "connector": Mux(initiator=True, settings=DRAIN_SETTINGS["connector"]),
            "gateway": Mux(initiator=False, settings=DRAIN_SETTINGS["gateway"]),
        }
        connector, gateway = self.mux["connector"], self.mux["gateway"]
        connector.send_hello({"subaccount": "acme"})
        (hello,) = gateway.receive_data(connector.data_to_send())
        assert isinstance(hello, HelloReceived)
        gateway.send_hello({})
        (hello,) = connector.receive_data(gateway.data_to_send())
        assert isinstance(hello, HelloReceived)
        self.went_away: set[str] = set()  # sides that sent GO_AWAY
        self.told: dict[str, int] = {}  # side -> last stream id in the GO_AWAY it received

    def window(self, receiver: str) -> int:
        """The most a receiver's window may grow to (it starts at initial_window)."""
        settings = DRAIN_SETTINGS[receiver]
        return max(settings.max_window, settings.initial_window)

    def local_opens(self, side: str) -> int:
        """Streams ``side`` opened that its mux still holds (what the limit counts)."""
        return sum(
            1
            for by_side in self.streams.values()
            if by_side[side].opener and by_side[side].expected_open
        )

    def on_event(self, side: str, event: Event) -> None:
        # No REFUSED ever arrives for a stream the peer's application did not see: the wire is
        # ordered, so the peer forgets a stream (and frees its slot under the limit) no later
        # than the opener does, and a GO_AWAY overtakes the refusals it causes. The base
        # machine's check (a remote reset means the peer's view reset) stays in force.
        if isinstance(event, GoAwayReceived):
            assert other(side) in self.went_away
            assert side not in self.told
            self.told[side] = event.last_stream_id
            return
        if isinstance(event, StreamOpened):
            assert side not in self.went_away, "an OPEN after our GO_AWAY was surfaced"
        if isinstance(event, StreamReset):
            view = self.streams[event.stream_id][side]
            peer = self.streams[event.stream_id][other(side)]
            if not event.remote:
                # Our GO_AWAY bookkeeping: a stream we opened above the peer's last id.
                assert side in self.told
                assert view.opener
                assert event.stream_id > self.told[side]
                assert event.code is ResetCode.REFUSED
                assert not peer.known
                view.reset = True
                return
        super().on_event(side, event)

    @precondition(lambda self: len(self.streams) < MAX_STREAMS)
    @rule(side=side_strategy, port=st.integers(1, 65535))
    def open_stream(self, side: str, port: int) -> None:
        going_away = side in self.went_away or side in self.told
        if going_away or self.local_opens(side) >= LIMIT:
            before = self.mux[side].pending_bytes
            with pytest.raises(ProtocolError) as refused:
                self.mux[side].open_stream({"protocol": "tcp", "port": port})
            assert refused.value.code is ResetCode.REFUSED
            assert self.mux[side].pending_bytes == before
            return
        super().open_stream(side, port)

    @precondition(lambda self: len(self.went_away) < len(SIDES))
    @rule(data=st.data())
    def go_away(self, data: st.DataObject) -> None:
        side = data.draw(st.sampled_from([s for s in SIDES if s not in self.went_away]))
        self.mux[side].go_away(ResetCode.NO_ERROR, "draining")
        self.went_away.add(side)

    @invariant()
    def the_tunnel_stays_up(self) -> None:
        # Overrides the base invariant: after GO_AWAY the tunnel takes no new streams.
        for side, mux in self.mux.items():
            assert mux.accepting_streams == (side not in self.went_away and side not in self.told)


DrainingMuxPair.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDrainingMuxPair = DrainingMuxPair.TestCase
