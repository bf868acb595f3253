"""Flood limits in the multiplexer: PING and RESET floods close the tunnel with a
PROTOCOL_ERROR that names the limit; opens faster than allowed are refused one by one, and the
budget refills with time (a fake clock, no sleeping)."""

from __future__ import annotations

import pytest

from backchannel._proto._errors import ProtocolError, ResetCode
from backchannel._proto._events import StreamOpened
from backchannel._proto._frames import FrameType, decode_reset, encode_frame, encode_reset
from backchannel._proto._mux import Mux, MuxSettings
from tests.test_mux import CONNECTOR_HELLO, frames_of, go_away_in


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _connected(settings: MuxSettings, clock: Clock) -> tuple[Mux, Mux]:
    """(connector mux with ``settings`` and ``clock``, gateway mux), past the handshake."""
    connector = Mux(initiator=True, settings=settings, clock=clock)
    gateway = Mux(initiator=False)
    connector.send_hello(CONNECTOR_HELLO)
    gateway.receive_data(connector.data_to_send())
    gateway.send_hello({"gateway": "g1"})
    connector.receive_data(gateway.data_to_send())
    assert connector.ready
    return connector, gateway


def test_a_ping_flood_closes_the_tunnel_naming_the_limit() -> None:
    clock = Clock()
    connector, _ = _connected(MuxSettings(max_pings_per_second=5), clock)
    ping = encode_frame(FrameType.PING, 0, b"12345678")
    connector.receive_data(ping * 5)  # the burst allowance
    with pytest.raises(ProtocolError, match=r"PING flood: more than 5 per second"):
        connector.receive_data(ping)
    _, code, reason = go_away_in(connector.data_to_send())
    assert code == ResetCode.PROTOCOL_ERROR
    assert "max_pings_per_second" in reason


def test_pings_at_the_allowed_rate_go_on_for_ever() -> None:
    clock = Clock()
    connector, _ = _connected(MuxSettings(max_pings_per_second=5), clock)
    ping = encode_frame(FrameType.PING, 0, b"12345678")
    for _ in range(100):
        connector.receive_data(ping)
        clock.now += 0.2  # 5 per second
    pongs = [f for f in frames_of(connector.data_to_send()) if f.type is FrameType.PONG]
    assert len(pongs) == 100


def test_a_reset_flood_closes_the_tunnel() -> None:
    clock = Clock()
    connector, _ = _connected(MuxSettings(max_resets_per_second=10), clock)
    # Rapid reset: OPEN then RESET, over and over (the gateway opens even ids).
    burst = b"".join(
        encode_frame(FrameType.OPEN, stream_id, b"{}")
        + encode_reset(stream_id, ResetCode.CANCELLED, "never mind")
        for stream_id in range(2, 2 + 2 * 10, 2)
    )
    connector.receive_data(burst)
    with pytest.raises(ProtocolError, match="RESET flood: more than 10 streams per second"):
        connector.receive_data(
            encode_frame(FrameType.OPEN, 100, b"{}") + encode_reset(100, ResetCode.CANCELLED, "")
        )


def test_opens_above_the_rate_are_refused_and_the_budget_refills() -> None:
    clock = Clock()
    connector, _ = _connected(MuxSettings(max_stream_opens_per_second=3), clock)
    opens = b"".join(encode_frame(FrameType.OPEN, sid, b"{}") for sid in (2, 4, 6, 8))
    events = connector.receive_data(opens)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [2, 4, 6]
    (refusal,) = [f for f in frames_of(connector.data_to_send()) if f.type is FrameType.RESET]
    assert refusal.stream_id == 8
    code, reason = decode_reset(refusal.body)
    assert code == ResetCode.REFUSED
    assert "max_stream_opens_per_second" in reason
    clock.now += 1.0  # a second later the budget is back
    events = connector.receive_data(encode_frame(FrameType.OPEN, 10, b"{}"))
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [10]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pings_per_second"):
        MuxSettings(max_pings_per_second=0)


def test_ordinary_closes_do_not_count_as_a_reset_flood() -> None:
    clock = Clock()
    connector, _ = _connected(
        MuxSettings(max_resets_per_second=10, max_stream_opens_per_second=1000), clock
    )
    ids = range(2, 2 + 2 * 100, 2)
    connector.receive_data(b"".join(encode_frame(FrameType.OPEN, sid, b"{}") for sid in ids))
    for sid in ids:
        connector.accept_stream(sid)
    # 100 RESETs in one go, all of streams we had answered: closes, not a rapid reset.
    events = connector.receive_data(
        b"".join(encode_reset(sid, ResetCode.CANCELLED, "closed") for sid in ids)
    )
    assert len(events) == 100
