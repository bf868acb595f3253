"""The multiplexer, driven with plain bytes: two Mux objects wired to each other by hand."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from backchannel._proto._errors import ProtocolError, ResetCode
from backchannel._proto._events import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from backchannel._proto._frames import (
    HEADER_SIZE,
    MAX_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    decode_go_away,
    decode_reset,
    decode_window_increment,
    encode_frame,
    encode_reset,
    encode_window_update,
)
from backchannel._proto._mux import (
    MAX_HELLO_SIZE,
    PROTOCOL_NAME,
    Mux,
    MuxSettings,
)
from backchannel._proto._streamstate import StreamStateError

CONNECTOR_HELLO = {
    "subaccount": "acme",
    "location": "",
    "token": "t0ken",
    "software": "backchannel 0.1.0",
}
SMALL = MuxSettings(
    initial_window=1000, max_window=1000, max_frame_size=16 * 1024, data_chunk_size=300
)

# --------------------------------------------------------------------------- helpers


def frames_of(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.at_frame_boundary
    return frames


def hello_frame(**overrides: Any) -> bytes:
    document: dict[str, Any] = {
        "protocol": PROTOCOL_NAME,
        "initial_window": 65536,
        "max_frame_size": 16384,
        "max_concurrent_streams": 100,
    }
    document.update(overrides)
    document = {k: v for k, v in document.items() if v is not None}
    return encode_frame(FrameType.HELLO, 0, json.dumps(document).encode())


def is_ready(mux: Mux) -> bool:
    """``mux.ready``, read through a call so mypy does not keep an earlier narrowing."""
    return mux.ready


def go_away_in(data: bytes) -> tuple[int, int, str]:
    """The GO_AWAY among the frames in ``data`` (which must hold exactly one)."""
    (frame,) = [f for f in frames_of(data) if f.type is FrameType.GO_AWAY]
    return decode_go_away(frame.body)


class Pair:
    """A connector mux and a gateway mux; bytes move only when a test says so."""

    def __init__(
        self,
        connector_settings: MuxSettings | None = None,
        gateway_settings: MuxSettings | None = None,
    ) -> None:
        self.connector = Mux(initiator=True, settings=connector_settings)
        self.gateway = Mux(initiator=False, settings=gateway_settings)

    def handshake(self) -> None:
        self.connector.send_hello(CONNECTOR_HELLO)
        (hello,) = self.to_gateway()
        assert isinstance(hello, HelloReceived)
        self.gateway.send_hello({"gateway": "g1"})
        (hello,) = self.to_connector()
        assert isinstance(hello, HelloReceived)
        assert self.connector.ready
        assert self.gateway.ready

    def to_gateway(self) -> list[Event]:
        return self.gateway.receive_data(self.connector.data_to_send())

    def to_connector(self) -> list[Event]:
        return self.connector.receive_data(self.gateway.data_to_send())

    def sides(self, opener: str) -> tuple[Mux, Mux, Any, Any]:
        """(opener mux, acceptor mux, send opener→acceptor, send acceptor→opener)."""
        if opener == "connector":
            return self.connector, self.gateway, self.to_gateway, self.to_connector
        return self.gateway, self.connector, self.to_connector, self.to_gateway


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


@pytest.fixture
def small() -> Pair:
    """Both sides promise a 1000-byte window and send DATA in chunks of at most 300 bytes."""
    p = Pair(SMALL, SMALL)
    p.handshake()
    return p


both_openers = pytest.mark.parametrize("opener", ["connector", "gateway"])


def open_accepted(pair: Pair, opener: str = "connector") -> int:
    a, b, forward, back = pair.sides(opener)
    stream_id = a.open_stream({"protocol": "tcp"})
    (opened,) = forward()
    assert opened == StreamOpened(stream_id, {"protocol": "tcp"})
    b.accept_stream(stream_id)
    assert back() == [StreamAccepted(stream_id, {})]
    return stream_id


def expect_protocol_error(
    mux: Mux, data: bytes, match: str, code: ResetCode = ResetCode.PROTOCOL_ERROR
) -> None:
    """``data`` must make ``mux`` fail with ``code``, queue a GO_AWAY naming it, and go dead."""
    with pytest.raises(ProtocolError, match=match) as info:
        mux.receive_data(data)
    assert info.value.code == code
    _, wire_code, reason = go_away_in(mux.data_to_send())
    assert wire_code == code
    assert reason == str(info.value)[:1024]
    assert mux.open_stream_count == 0
    assert not mux.accepting_streams
    assert mux.receive_data(encode_frame(FrameType.PING, 0, b"12345678")) == []


# --------------------------------------------------------------------------- handshake


def test_handshake_exchanges_settings_and_info() -> None:
    pair = Pair(MuxSettings(initial_window=5000, max_concurrent_streams=7), MuxSettings())
    assert not pair.connector.ready
    pair.connector.send_hello(CONNECTOR_HELLO)
    (frame,) = frames_of(pair.connector.data_to_send())
    assert (frame.type, frame.stream_id) == (FrameType.HELLO, 0)
    document = json.loads(frame.body)
    assert document == {
        **CONNECTOR_HELLO,
        "protocol": "backchannel/1",
        "initial_window": 5000,
        "max_frame_size": 1024 * 1024,
        "max_concurrent_streams": 7,
    }
    (event,) = pair.gateway.receive_data(encode_frame(FrameType.HELLO, 0, frame.body))
    assert event == HelloReceived(document)
    assert pair.gateway.peer is not None
    assert pair.gateway.peer.initial_window == 5000
    assert pair.gateway.peer.max_concurrent_streams == 7
    assert not is_ready(pair.gateway)  # has not answered yet
    pair.gateway.send_hello({})
    (event,) = pair.to_connector()
    assert isinstance(event, HelloReceived)
    assert event.info["protocol"] == PROTOCOL_NAME
    assert is_ready(pair.connector)
    assert is_ready(pair.gateway)
    assert pair.connector.accepting_streams


def test_settings_in_hello_override_caller_info() -> None:
    mux = Mux(initiator=True, settings=SMALL)
    mux.send_hello({"protocol": "other/9", "initial_window": 1})
    (frame,) = frames_of(mux.data_to_send())
    assert json.loads(frame.body)["protocol"] == PROTOCOL_NAME
    assert json.loads(frame.body)["initial_window"] == 1000


def test_gateway_does_not_send_hello_first() -> None:
    with pytest.raises(ProtocolError, match="does not send it first"):
        Mux(initiator=False).send_hello({})


def test_hello_is_sent_once() -> None:
    mux = Mux(initiator=True)
    mux.send_hello({})
    with pytest.raises(ProtocolError, match="already sent"):
        mux.send_hello({})


def test_connector_rejects_hello_before_sending_its_own() -> None:
    expect_protocol_error(Mux(initiator=True), hello_frame(), "before ours")


def test_second_hello_is_rejected(pair: Pair) -> None:
    expect_protocol_error(pair.gateway, hello_frame(), "second HELLO")


def test_streams_cannot_open_before_handshake() -> None:
    pair = Pair()
    pair.connector.send_hello({})
    with pytest.raises(ProtocolError, match="handshake not complete"):
        pair.connector.open_stream({})
    pair.to_gateway()
    with pytest.raises(ProtocolError, match="handshake not complete"):
        pair.gateway.open_stream({})
    with pytest.raises(ProtocolError, match="handshake not complete"):
        pair.gateway.send_control({})


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(FrameType.OPEN, 1, b"{}"),
        encode_frame(FrameType.DATA, 1, b"x"),
        encode_frame(FrameType.PING, 0, b"12345678"),
        encode_frame(FrameType.CONTROL, 0, b"{}"),
        encode_reset(1, ResetCode.CANCELLED, ""),
    ],
    ids=lambda data: FrameType(data[1]).name,
)
def test_frames_before_hello_are_rejected(frame: bytes) -> None:
    expect_protocol_error(Mux(initiator=False), frame, "before HELLO")


def test_frames_before_hello_rejected_even_with_hello_behind_them() -> None:
    expect_protocol_error(
        Mux(initiator=False), encode_frame(FrameType.PING, 0, b"12345678") + hello_frame(), "PING"
    )


@pytest.mark.parametrize("protocol", ["backchannel/2", "Backchannel/1", "", 1, None])
def test_wrong_protocol_string_is_rejected(protocol: object) -> None:
    document = {"initial_window": 1, "max_frame_size": 16384, "max_concurrent_streams": 1}
    if protocol is not None:
        document["protocol"] = protocol  # type: ignore[assignment]
    frame = encode_frame(FrameType.HELLO, 0, json.dumps(document).encode())
    expect_protocol_error(Mux(initiator=False), frame, "this side speaks 'backchannel/1'")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("initial_window", 0),
        ("initial_window", MAX_WINDOW + 1),
        ("initial_window", "65536"),
        ("initial_window", 1.5),
        ("initial_window", True),
        ("initial_window", None),
        ("max_frame_size", 16 * 1024 - 1),
        ("max_frame_size", 16 * 1024 * 1024 + 1),
        ("max_frame_size", None),
        ("max_concurrent_streams", 0),
        ("max_concurrent_streams", 2**31 + 1),
        ("max_concurrent_streams", None),
    ],
)
def test_hello_settings_out_of_range_are_rejected(key: str, value: object) -> None:
    expect_protocol_error(Mux(initiator=False), hello_frame(**{key: value}), f"setting {key}=")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("initial_window", 1),
        ("initial_window", MAX_WINDOW),
        ("max_frame_size", 16 * 1024),
        ("max_frame_size", 16 * 1024 * 1024),
        ("max_concurrent_streams", 1),
        ("max_concurrent_streams", 2**31),
    ],
)
def test_hello_settings_at_their_limits_are_accepted(key: str, value: int) -> None:
    gateway = Mux(initiator=False)
    (event,) = gateway.receive_data(hello_frame(**{key: value}))
    assert isinstance(event, HelloReceived)
    assert gateway.peer is not None
    assert getattr(gateway.peer, key) == value


@pytest.mark.parametrize("payload", [b"[]", b"not json", b"\xff\xfe", b'"s"', b"[" * 100000])
def test_hello_must_be_a_json_object(payload: bytes) -> None:
    expect_protocol_error(
        Mux(initiator=False), encode_frame(FrameType.HELLO, 0, payload[:MAX_HELLO_SIZE]), "HELLO"
    )


def test_hello_on_a_stream_id_is_rejected() -> None:
    frame = hello_frame()
    expect_protocol_error(
        Mux(initiator=False), frame[:4] + b"\x00\x00\x00\x01" + frame[8:], "HELLO on stream 1"
    )


def test_oversized_hello_is_rejected_before_its_payload_arrives() -> None:
    header = encode_frame(FrameType.HELLO, 0, b"")[:8] + struct.pack(">I", MAX_HELLO_SIZE + 1)
    expect_protocol_error(Mux(initiator=False), header, "exceeds the limit of 16384")


def test_hello_of_exactly_the_limit_is_accepted() -> None:
    document = hello_frame()[HEADER_SIZE:-1]
    padded = document + b',"pad":"' + b"x" * (MAX_HELLO_SIZE - len(document) - 10) + b'"}'
    assert len(padded) == MAX_HELLO_SIZE
    (event,) = Mux(initiator=False).receive_data(encode_frame(FrameType.HELLO, 0, padded))
    assert isinstance(event, HelloReceived)


def test_sending_an_oversized_hello_is_refused() -> None:
    mux = Mux(initiator=True)
    with pytest.raises(ValueError, match="exceeds"):
        mux.send_hello({"token": "x" * MAX_HELLO_SIZE})
    assert mux.pending_bytes == 0


def test_gateway_refuses_connector_with_go_away() -> None:
    pair = Pair()
    pair.connector.send_hello(CONNECTOR_HELLO)
    pair.to_gateway()
    pair.gateway.go_away(ResetCode.UNAUTHENTICATED, "unknown token for subaccount acme")
    (event,) = pair.to_connector()
    assert event == GoAwayReceived(
        0, ResetCode.UNAUTHENTICATED, "unknown token for subaccount acme"
    )
    assert not pair.connector.ready
    assert not pair.connector.accepting_streams


def test_frames_after_hello_in_the_same_bytes_use_the_negotiated_limit() -> None:
    # Regression: the HELLO raises the 16 KiB pre-handshake limit; a DATA frame behind it in
    # the same message must be judged by the new limit, exactly as if it arrived separately.
    pair = Pair()
    pair.connector.send_hello({})
    pair.to_gateway()
    pair.gateway.send_hello({})
    stream_id = pair.gateway.open_stream({})
    assert pair.gateway.send_data(stream_id, b"d" * 40000) == 40000
    events = pair.to_connector()
    assert [type(e) for e in events[:2]] == [HelloReceived, StreamOpened]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"d" * 40000


def test_over_long_frame_after_hello_is_still_rejected() -> None:
    pair = Pair()
    pair.connector.send_hello({})
    pair.to_gateway()
    pair.gateway.send_hello({})
    too_big = encode_frame(FrameType.PING, 0, b"")[:8] + struct.pack(">I", 1024 * 1024 + 1)
    expect_protocol_error(pair.connector, pair.gateway.data_to_send() + too_big, "exceeds")


# --------------------------------------------------------------------------- lifecycle


@both_openers
def test_open_accept_data_fin_lifecycle(pair: Pair, opener: str) -> None:
    a, b, forward, back = pair.sides(opener)
    metadata = {"protocol": "tcp", "host": "erp.virtual", "port": 3300, "attributes": {}}
    stream_id = a.open_stream(metadata)
    assert stream_id % 2 == (1 if opener == "connector" else 0)
    assert forward() == [StreamOpened(stream_id, metadata)]
    assert a.open_stream_count == b.open_stream_count == 1

    b.accept_stream(stream_id, {"tls": True})
    assert back() == [StreamAccepted(stream_id, {"tls": True})]

    assert a.send_data(stream_id, b"request") == 7
    assert forward() == [DataReceived(stream_id, b"request")]
    assert b.send_data(stream_id, b"response") == 8
    assert back() == [DataReceived(stream_id, b"response")]

    a.send_fin(stream_id)
    assert forward() == [StreamEnded(stream_id)]
    assert a.is_open(stream_id)
    assert b.is_open(stream_id)
    assert b.send_data(stream_id, b"more") == 4  # the other direction still flows
    assert back() == [DataReceived(stream_id, b"more")]
    with pytest.raises(StreamStateError, match="after FIN was sent"):
        a.send_data(stream_id, b"late")

    b.send_fin(stream_id)
    assert back() == [StreamEnded(stream_id)]
    assert not a.is_open(stream_id)
    assert not b.is_open(stream_id)
    assert a.open_stream_count == b.open_stream_count == 0


def test_stream_ids_advance_by_two_per_side(pair: Pair) -> None:
    assert [pair.connector.open_stream({}) for _ in range(3)] == [1, 3, 5]
    assert [pair.gateway.open_stream({}) for _ in range(3)] == [2, 4, 6]
    assert len(pair.to_gateway()) == 3
    assert len(pair.to_connector()) == 3


def test_open_metadata_is_sent_as_json(pair: Pair) -> None:
    metadata = {
        "protocol": "tcp",
        "host": "erp.virtual",
        "port": 3300,
        "app": "orders",
        "subaccount": "acme",
        "location": "",
        "principal": None,
        "attributes": {"k": "ü"},
    }
    stream_id = pair.gateway.open_stream(metadata)
    (frame,) = frames_of(pair.gateway.data_to_send())
    assert (frame.type, frame.stream_id) == (FrameType.OPEN, stream_id)
    assert json.loads(frame.body.decode("utf-8")) == metadata


@both_openers
def test_early_data_and_fin_before_accept(pair: Pair, opener: str) -> None:
    a, b, forward, back = pair.sides(opener)
    stream_id = a.open_stream({})
    assert a.send_data(stream_id, b"no round trip") == 13
    a.send_fin(stream_id)
    assert forward() == [
        StreamOpened(stream_id, {}),
        DataReceived(stream_id, b"no round trip"),
        StreamEnded(stream_id),
    ]
    b.accept_stream(stream_id)
    b.send_data(stream_id, b"answer")
    b.send_fin(stream_id)
    assert back() == [
        StreamAccepted(stream_id, {}),
        DataReceived(stream_id, b"answer"),
        StreamEnded(stream_id),
    ]
    assert a.open_stream_count == b.open_stream_count == 0


@both_openers
def test_acceptor_cannot_send_before_accepting(pair: Pair, opener: str) -> None:
    a, b, forward, _ = pair.sides(opener)
    stream_id = a.open_stream({})
    forward()
    with pytest.raises(StreamStateError, match="not allowed for the acceptor while pending"):
        b.send_data(stream_id, b"x")
    with pytest.raises(StreamStateError, match="not allowed for the acceptor while pending"):
        b.send_fin(stream_id)
    assert b.pending_bytes == 0
    b.accept_stream(stream_id)
    with pytest.raises(StreamStateError, match="SEND_ACCEPT not allowed"):
        b.accept_stream(stream_id)


def test_opener_rejects_data_before_accept(pair: Pair) -> None:
    stream_id = pair.connector.open_stream({})
    pair.to_gateway()
    expect_protocol_error(
        pair.connector,
        encode_frame(FrameType.DATA, stream_id, b"x"),
        "RECV_DATA not allowed for the opener while pending",
    )


def test_opener_rejects_fin_before_accept(pair: Pair) -> None:
    stream_id = pair.connector.open_stream({})
    pair.to_gateway()
    expect_protocol_error(
        pair.connector, encode_frame(FrameType.FIN, stream_id), "RECV_FIN not allowed"
    )


def test_accept_for_a_stream_the_peer_opened_is_rejected(pair: Pair) -> None:
    stream_id = pair.gateway.open_stream({})
    pair.to_connector()
    expect_protocol_error(
        pair.connector, encode_frame(FrameType.ACCEPT, stream_id, b"{}"), "RECV_ACCEPT"
    )


def test_second_accept_is_rejected(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    expect_protocol_error(
        pair.connector, encode_frame(FrameType.ACCEPT, stream_id, b"{}"), "RECV_ACCEPT"
    )


def test_data_after_fin_is_rejected(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    pair.connector.send_fin(stream_id)
    pair.to_gateway()
    expect_protocol_error(
        pair.gateway, encode_frame(FrameType.DATA, stream_id, b"x"), "after FIN was received"
    )


def test_fin_with_payload_is_rejected(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    expect_protocol_error(pair.gateway, encode_frame(FrameType.FIN, stream_id, b"x"), "payload")


@pytest.mark.parametrize(
    "frame_type", [FrameType.OPEN, FrameType.ACCEPT, FrameType.DATA, FrameType.FIN]
)
def test_stream_frame_on_stream_zero_is_rejected(pair: Pair, frame_type: FrameType) -> None:
    expect_protocol_error(pair.gateway, encode_frame(frame_type, 0, b""), "on stream 0")


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG, FrameType.GO_AWAY])
def test_connection_frame_on_a_stream_is_rejected(pair: Pair, frame_type: FrameType) -> None:
    expect_protocol_error(pair.gateway, encode_frame(frame_type, 1, b"12345678"), "on stream 1")


@pytest.mark.parametrize("payload", [b"[1]", b"{", b"\xc3("])
def test_open_metadata_must_be_a_json_object(pair: Pair, payload: bytes) -> None:
    expect_protocol_error(pair.gateway, encode_frame(FrameType.OPEN, 1, payload), "OPEN payload")


def test_empty_open_payload_means_empty_metadata(pair: Pair) -> None:
    assert pair.gateway.receive_data(encode_frame(FrameType.OPEN, 1)) == [StreamOpened(1, {})]


# --------------------------------------------------------------------------- stream ids


def test_stream_id_reuse_is_rejected(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    expect_protocol_error(
        pair.gateway, encode_frame(FrameType.OPEN, stream_id, b"{}"), "reuses stream id"
    )


def test_stream_id_lower_than_the_last_is_rejected(pair: Pair) -> None:
    assert pair.gateway.receive_data(encode_frame(FrameType.OPEN, 7)) == [StreamOpened(7, {})]
    expect_protocol_error(pair.gateway, encode_frame(FrameType.OPEN, 5), "reuses stream id 5")


def test_stream_ids_may_skip(pair: Pair) -> None:
    assert pair.gateway.receive_data(encode_frame(FrameType.OPEN, 9)) == [StreamOpened(9, {})]
    assert pair.connector.receive_data(encode_frame(FrameType.OPEN, 2**32 - 2)) == [
        StreamOpened(2**32 - 2, {})
    ]


@pytest.mark.parametrize(("receiver", "stream_id"), [("gateway", 2), ("connector", 1)])
def test_open_with_the_wrong_parity_is_rejected(pair: Pair, receiver: str, stream_id: int) -> None:
    mux = pair.gateway if receiver == "gateway" else pair.connector
    expect_protocol_error(mux, encode_frame(FrameType.OPEN, stream_id), "wrong parity")


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(FrameType.DATA, 3, b"x"),
        encode_frame(FrameType.ACCEPT, 3, b"{}"),
        encode_frame(FrameType.FIN, 3),
        encode_window_update(3, 10),
        encode_reset(3, ResetCode.CANCELLED, ""),
        encode_frame(FrameType.DATA, 4, b"x"),
        encode_window_update(4, 10),
    ],
    ids=lambda data: f"{FrameType(data[1]).name}-{data[7]}",
)
def test_frames_for_a_never_opened_stream_are_rejected(pair: Pair, frame: bytes) -> None:
    open_accepted(pair, "connector")  # stream 1 exists; 3 was never opened
    open_accepted(pair, "gateway")  # stream 2 exists; 4 was never opened
    expect_protocol_error(pair.connector, frame, "never opened")


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(FrameType.DATA, 1, b"late data"),
        encode_frame(FrameType.FIN, 1),
        encode_window_update(1, 10),
        encode_reset(1, ResetCode.CANCELLED, "late"),
        encode_frame(FrameType.ACCEPT, 1, b"{}"),
    ],
    ids=lambda data: FrameType(data[1]).name,
)
@pytest.mark.parametrize("how", ["reset", "finished"])
def test_frames_for_a_closed_stream_are_ignored(pair: Pair, frame: bytes, how: str) -> None:
    stream_id = open_accepted(pair)
    assert stream_id == 1
    if how == "reset":
        pair.connector.reset_stream(stream_id, ResetCode.CANCELLED)
    else:
        pair.connector.send_fin(stream_id)
        pair.gateway.send_fin(stream_id)
        assert pair.to_connector() == [StreamEnded(stream_id)]
    assert not pair.connector.is_open(stream_id)
    pair.connector.data_to_send()
    assert pair.connector.receive_data(frame) == []
    assert pair.connector.pending_bytes == 0  # nothing answered, nothing torn down
    assert pair.connector.accepting_streams


# --------------------------------------------------------------------------- reset


@both_openers
def test_reset_ends_both_directions(pair: Pair, opener: str) -> None:
    a, b, _, back = pair.sides(opener)
    stream_id = open_accepted(pair, opener)
    b.reset_stream(stream_id, ResetCode.BACKEND_UNREACHABLE, "connection refused by erp:3300")
    assert not b.is_open(stream_id)
    assert back() == [
        StreamReset(stream_id, ResetCode.BACKEND_UNREACHABLE, "connection refused by erp:3300")
    ]
    assert not a.is_open(stream_id)
    assert a.open_stream_count == b.open_stream_count == 0
    for mux in (a, b):
        with pytest.raises(StreamStateError, match="not open"):
            mux.send_data(stream_id, b"x")
        with pytest.raises(StreamStateError, match="not open"):
            mux.send_fin(stream_id)
        assert mux.send_window(stream_id) == 0


def test_acceptor_refuses_a_stream_with_reset(pair: Pair) -> None:
    stream_id = pair.gateway.open_stream({"host": "nowhere"})
    pair.to_connector()
    pair.connector.reset_stream(stream_id, ResetCode.ACCESS_DENIED, "no mapping for nowhere")
    assert pair.to_gateway() == [
        StreamReset(stream_id, ResetCode.ACCESS_DENIED, "no mapping for nowhere")
    ]
    assert pair.gateway.open_stream_count == 0


def test_reset_after_own_fin_still_reaches_the_peer(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    pair.connector.send_fin(stream_id)
    pair.connector.reset_stream(stream_id, ResetCode.CANCELLED, "receiver closed the stream")
    assert pair.to_gateway() == [
        StreamEnded(stream_id),
        StreamReset(stream_id, ResetCode.CANCELLED, "receiver closed the stream"),
    ]


def test_reset_of_unknown_or_closed_stream_is_a_no_op(pair: Pair) -> None:
    pair.connector.reset_stream(99, ResetCode.CANCELLED)
    stream_id = open_accepted(pair)
    pair.connector.reset_stream(stream_id, ResetCode.CANCELLED)
    pending = pair.connector.pending_bytes
    pair.connector.reset_stream(stream_id, ResetCode.CANCELLED)
    assert pair.connector.pending_bytes == pending


def test_reset_with_unknown_code_reads_as_internal(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    assert pair.gateway.receive_data(encode_reset(stream_id, 999, "from the future")) == [
        StreamReset(stream_id, ResetCode.INTERNAL, "from the future")
    ]


# --------------------------------------------------------------------------- flow control


def test_sender_is_capped_at_the_peer_window(small: Pair) -> None:
    stream_id = open_accepted(small)
    assert small.connector.send_window(stream_id) == 1000
    assert small.connector.send_data(stream_id, b"a" * 700) == 700
    assert small.connector.send_window(stream_id) == 300
    assert small.connector.send_data(stream_id, b"b" * 500) == 300
    assert small.connector.send_window(stream_id) == 0
    assert small.connector.send_data(stream_id, b"c" * 10) == 0
    frames = frames_of(small.connector.data_to_send())
    # 1000 bytes in chunks of at most data_chunk_size (300)
    assert [len(f.payload) for f in frames] == [300, 300, 100, 300]
    assert all(f.type is FrameType.DATA for f in frames)


def test_data_chunks_respect_the_peer_max_frame_size() -> None:
    pair = Pair(MuxSettings(data_chunk_size=10**6), MuxSettings(max_frame_size=16 * 1024))
    pair.handshake()
    stream_id = open_accepted(pair)
    assert pair.connector.send_data(stream_id, bytes(40000)) == 40000
    assert [len(f.payload) for f in frames_of(pair.connector.data_to_send())] == [
        16384,
        16384,
        7232,
    ]


def test_window_update_after_half_the_window_is_consumed(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.send_data(stream_id, b"x" * 1000)
    events = small.to_gateway()
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 1000

    small.gateway.acknowledge(stream_id, 499)
    assert small.gateway.pending_bytes == 0  # below half: no control traffic yet
    small.gateway.acknowledge(stream_id, 1)
    (frame,) = frames_of(small.gateway.data_to_send())
    assert (frame.type, frame.stream_id) == (FrameType.WINDOW_UPDATE, stream_id)
    assert decode_window_increment(frame.body) == 500

    assert small.connector.receive_data(encode_window_update(stream_id, 500)) == [
        WindowUpdated(stream_id)
    ]
    assert small.connector.send_window(stream_id) == 500
    small.gateway.acknowledge(stream_id, 500)
    small.to_connector()
    assert small.connector.send_window(stream_id) == 1000


def test_acknowledge_ignores_nonsense(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.gateway.acknowledge(stream_id, 0)
    small.gateway.acknowledge(stream_id, -5)
    small.gateway.acknowledge(12345, 1000)
    assert small.gateway.pending_bytes == 0


def test_no_credit_is_returned_after_the_peer_finished(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.send_data(stream_id, b"x" * 1000)
    small.connector.send_fin(stream_id)
    small.to_gateway()
    small.gateway.acknowledge(stream_id, 1000)
    assert small.gateway.pending_bytes == 0


def test_peer_exceeding_the_window_tears_down_the_tunnel(small: Pair) -> None:
    stream_id = open_accepted(small)
    assert small.gateway.receive_data(encode_frame(FrameType.DATA, stream_id, bytes(600))) != []
    expect_protocol_error(
        small.gateway,
        encode_frame(FrameType.DATA, stream_id, bytes(401)),
        "401 bytes of DATA exceed the window of 400",
        ResetCode.FLOW_CONTROL_ERROR,
    )


def test_data_exactly_filling_the_window_is_accepted(small: Pair) -> None:
    stream_id = open_accepted(small)
    events = small.gateway.receive_data(encode_frame(FrameType.DATA, stream_id, bytes(1000)))
    assert events == [DataReceived(stream_id, bytes(1000))]
    assert small.gateway.receive_data(encode_frame(FrameType.DATA, stream_id, b"")) == []


def test_early_data_is_limited_by_the_window_too(small: Pair) -> None:
    assert small.gateway.receive_data(encode_frame(FrameType.OPEN, 1)) == [StreamOpened(1, {})]
    expect_protocol_error(
        small.gateway,
        encode_frame(FrameType.DATA, 1, bytes(1001)),
        "exceed the window",
        ResetCode.FLOW_CONTROL_ERROR,
    )


def test_window_beyond_the_maximum_is_a_flow_control_error(small: Pair) -> None:
    stream_id = open_accepted(small)
    expect_protocol_error(
        small.connector,
        encode_window_update(stream_id, MAX_WINDOW - 999),
        "window grew past",
        ResetCode.FLOW_CONTROL_ERROR,
    )


def test_window_up_to_the_maximum_is_accepted(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.receive_data(encode_window_update(stream_id, MAX_WINDOW - 1000))
    assert small.connector.send_window(stream_id) == MAX_WINDOW


@pytest.mark.parametrize("increment", [b"\x00\x00\x00\x00", b"\x00\x00\x01"])
def test_malformed_window_update_is_rejected(small: Pair, increment: bytes) -> None:
    stream_id = open_accepted(small)
    expect_protocol_error(
        small.connector, encode_frame(FrameType.WINDOW_UPDATE, stream_id, increment), "WINDOW"
    )


def test_windows_are_per_stream(small: Pair) -> None:
    first = open_accepted(small)
    second = open_accepted(small)
    assert small.connector.send_data(first, bytes(1000)) == 1000
    assert small.connector.send_window(first) == 0
    assert small.connector.send_data(second, bytes(5)) == 5


def test_each_side_uses_the_window_the_other_promised() -> None:
    pair = Pair(MuxSettings(initial_window=3000), MuxSettings(initial_window=20000))
    pair.handshake()
    stream_id = open_accepted(pair)
    assert pair.connector.send_window(stream_id) == 20000
    assert pair.gateway.send_window(stream_id) == 3000


# --------------------------------------------------------------------------- go away


def test_go_away_resets_our_streams_above_the_last_id(pair: Pair) -> None:
    mine = open_accepted(pair, "gateway")  # 2: the gateway's own stream
    served = open_accepted(pair)  # 1, seen by the gateway
    pair.connector.open_stream({})  # 3 and 5: OPEN still in flight
    pair.connector.open_stream({})
    pair.gateway.go_away(ResetCode.NO_ERROR, "restarting")
    assert pair.to_connector() == [
        GoAwayReceived(served, ResetCode.NO_ERROR, "restarting"),
        StreamReset(3, ResetCode.REFUSED, "peer is going away: restarting", remote=False),
        StreamReset(5, ResetCode.REFUSED, "peer is going away: restarting", remote=False),
    ]
    assert pair.connector.is_open(served)
    assert pair.connector.is_open(mine)
    assert pair.connector.open_stream_count == 2
    assert not pair.connector.accepting_streams
    with pytest.raises(ProtocolError, match="going away") as info:
        pair.connector.open_stream({})
    assert info.value.code == ResetCode.REFUSED
    # Existing streams keep working.
    assert pair.connector.send_data(served, b"still here") == 10


def test_go_away_names_the_highest_peer_stream(pair: Pair) -> None:
    open_accepted(pair)
    open_accepted(pair)
    pair.gateway.go_away(ResetCode.NO_ERROR, "drain")
    assert go_away_in(pair.gateway.data_to_send()) == (3, ResetCode.NO_ERROR, "drain")
    assert not pair.gateway.accepting_streams
    pair.gateway.go_away(ResetCode.INTERNAL, "again")
    assert pair.gateway.pending_bytes == 0  # only one GO_AWAY


def test_open_after_our_go_away_is_refused(pair: Pair) -> None:
    pair.gateway.go_away()
    pair.to_connector()
    # A connector that had not yet seen the GO_AWAY opens a stream with early data.
    frame = encode_frame(FrameType.OPEN, 1, b"{}") + encode_frame(FrameType.DATA, 1, b"early")
    assert pair.gateway.receive_data(frame) == []
    (reset,) = frames_of(pair.gateway.data_to_send())
    assert reset.type is FrameType.RESET
    assert decode_reset(reset.body)[0] == ResetCode.REFUSED
    assert pair.gateway.open_stream_count == 0


def test_graceful_drain_after_go_away(pair: Pair) -> None:
    stream_id = open_accepted(pair)
    pair.gateway.go_away()
    assert pair.to_connector() == [GoAwayReceived(stream_id, ResetCode.NO_ERROR, "")]
    pair.connector.send_data(stream_id, b"last request")
    pair.connector.send_fin(stream_id)
    assert pair.to_gateway() == [DataReceived(stream_id, b"last request"), StreamEnded(stream_id)]
    pair.gateway.send_fin(stream_id)
    pair.to_connector()
    assert pair.connector.open_stream_count == pair.gateway.open_stream_count == 0


# --------------------------------------------------------------------------- limits


def test_peer_open_beyond_max_concurrent_streams_is_refused() -> None:
    pair = Pair(gateway_settings=MuxSettings(max_concurrent_streams=2))
    pair.handshake()
    open_accepted(pair)
    open_accepted(pair)
    # The connector's mux would refuse locally; a misbehaving peer sends a third OPEN anyway.
    assert pair.gateway.receive_data(encode_frame(FrameType.OPEN, 5, b"{}")) == []
    (frame,) = frames_of(pair.gateway.data_to_send())
    assert (frame.type, frame.stream_id) == (FrameType.RESET, 5)
    code, reason = decode_reset(frame.body)
    assert (code, reason) == (ResetCode.REFUSED, "too many concurrent streams (limit 2)")
    assert pair.gateway.open_stream_count == 2
    assert pair.gateway.accepting_streams  # one stream refused, the tunnel lives on
    # Later frames for the refused stream are ignored, and a slot that frees up is reusable.
    assert pair.gateway.receive_data(encode_frame(FrameType.DATA, 5, b"x")) == []
    pair.connector.reset_stream(1, ResetCode.CANCELLED)
    pair.to_gateway()
    assert pair.gateway.receive_data(encode_frame(FrameType.OPEN, 7)) == [StreamOpened(7, {})]


def test_open_stream_respects_the_peer_limit() -> None:
    pair = Pair(gateway_settings=MuxSettings(max_concurrent_streams=2))
    pair.handshake()
    first = pair.connector.open_stream({})
    pair.connector.open_stream({})
    with pytest.raises(ProtocolError, match="at most 2 concurrent streams") as info:
        pair.connector.open_stream({})
    assert info.value.code == ResetCode.REFUSED
    pair.connector.reset_stream(first, ResetCode.CANCELLED)
    assert pair.connector.open_stream({}) == 5


def test_streams_the_peer_opened_do_not_count_against_our_opens() -> None:
    pair = Pair(gateway_settings=MuxSettings(max_concurrent_streams=1))
    pair.handshake()
    open_accepted(pair, "gateway")
    open_accepted(pair, "gateway")
    assert pair.connector.open_stream({}) == 1


def test_oversized_open_metadata_is_refused_locally() -> None:
    pair = Pair(gateway_settings=MuxSettings(max_frame_size=16 * 1024))
    pair.handshake()
    with pytest.raises(ValueError, match="exceeds the peer's limit"):
        pair.connector.open_stream({"attributes": {"blob": "x" * 16 * 1024}})
    assert pair.connector.open_stream_count == 0
    assert pair.connector.open_stream({}) == 1  # no id was burnt


def test_mux_settings_are_validated() -> None:
    for bad in (
        {"initial_window": 0},
        {"initial_window": MAX_WINDOW + 1},
        {"max_frame_size": 16 * 1024 - 1},
        {"max_frame_size": 16 * 1024 * 1024 + 1},
        {"max_concurrent_streams": 0},
        {"data_chunk_size": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MuxSettings(**bad)


# --------------------------------------------------------------------------- ping, control


def test_ping_is_answered_with_pong(pair: Pair) -> None:
    pair.connector.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert pair.to_gateway() == [PingReceived(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    (pong,) = frames_of(pair.gateway.data_to_send())
    assert pong == Frame(FrameType.PONG, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07")
    events = pair.connector.receive_data(encode_frame(FrameType.PONG, 0, pong.body))
    assert events == [PongReceived(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    assert pair.connector.pending_bytes == 0  # a PONG is not answered


def test_ping_payload_must_be_eight_bytes(pair: Pair) -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        pair.connector.ping(b"short")
    expect_protocol_error(pair.gateway, encode_frame(FrameType.PING, 0, b"1234567"), "8 bytes")


def test_pong_payload_must_be_eight_bytes(pair: Pair) -> None:
    expect_protocol_error(pair.gateway, encode_frame(FrameType.PONG, 0, b"123456789"), "8 bytes")


def test_control_documents_travel_both_ways(pair: Pair) -> None:
    pair.gateway.send_control({"trust": ["idp-a"]})
    assert pair.to_connector() == [ControlReceived({"trust": ["idp-a"]})]
    pair.connector.send_control({"version": 2})
    assert pair.to_gateway() == [ControlReceived({"version": 2})]


def test_control_must_be_a_json_object(pair: Pair) -> None:
    expect_protocol_error(pair.gateway, encode_frame(FrameType.CONTROL, 0, b"42"), "CONTROL")


# --------------------------------------------------------------------------- output queue


def test_urgent_frames_overtake_queued_data(small: Pair) -> None:
    first = open_accepted(small)
    second = open_accepted(small, "gateway")
    small.connector.send_data(first, bytes(600))  # queued: two DATA frames
    small.gateway.send_data(second, bytes(600))
    small.to_connector()
    small.connector.acknowledge(second, 600)  # WINDOW_UPDATE, urgent
    small.connector.receive_data(encode_frame(FrameType.PING, 0, b"pingpong"))  # PONG, urgent
    small.connector.ping(b"myping!!")  # PING, urgent
    types = [f.type for f in frames_of(small.connector.data_to_send())]
    assert types == [
        FrameType.WINDOW_UPDATE,
        FrameType.PONG,
        FrameType.PING,
        FrameType.DATA,
        FrameType.DATA,
    ]


def test_ordered_frames_keep_their_order(pair: Pair) -> None:
    stream_id = pair.connector.open_stream({})
    pair.connector.send_data(stream_id, b"1")
    pair.connector.send_data(stream_id, b"2")
    pair.connector.send_fin(stream_id)
    pair.connector.reset_stream(stream_id, ResetCode.CANCELLED)
    types = [(f.type, f.payload[:1]) for f in frames_of(pair.connector.data_to_send())]
    assert types == [
        (FrameType.OPEN, b"{"),
        (FrameType.DATA, b"1"),
        (FrameType.DATA, b"2"),
        (FrameType.FIN, b""),
        (FrameType.RESET, b"\x00"),
    ]


def _drain(mux: Mux, max_bytes: int) -> Iterator[bytes]:
    while mux.pending_bytes:
        before = mux.pending_bytes
        chunk = mux.data_to_send(max_bytes)
        assert len(chunk) == before - mux.pending_bytes
        yield chunk


def test_data_to_send_with_a_limit_returns_whole_frames(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.send_data(stream_id, bytes(1000))  # frames of 312, 312, 112, 312 bytes
    small.connector.ping(b"12345678")  # 20 bytes, urgent
    expected = small.connector.pending_bytes
    chunks = list(_drain(small.connector, 700))
    assert [len(c) for c in chunks] == [20 + 312 + 312, 112 + 312]
    decoded = [frames_of(chunk) for chunk in chunks]  # each chunk ends on a frame boundary
    assert sum(len(c) for c in chunks) == expected
    assert [f.type for f in decoded[0]] == [FrameType.PING, FrameType.DATA, FrameType.DATA]


def test_data_to_send_returns_an_oversized_frame_alone(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.send_data(stream_id, bytes(600))
    chunks = list(_drain(small.connector, 10))
    assert [len(c) for c in chunks] == [312, 312]


def test_data_to_send_limit_between_urgent_frames(small: Pair) -> None:
    stream_id = open_accepted(small)
    small.connector.ping(b"11111111")
    small.connector.ping(b"22222222")
    small.connector.send_data(stream_id, b"x")
    chunks = list(_drain(small.connector, 25))
    assert [[f.type for f in frames_of(c)] for c in chunks] == [
        [FrameType.PING],
        [FrameType.PING],
        [FrameType.DATA],
    ]


def test_data_to_send_when_empty(pair: Pair) -> None:
    assert pair.connector.data_to_send() == b""
    assert pair.connector.data_to_send(100) == b""
    assert pair.connector.pending_bytes == 0


# --------------------------------------------------------------------------- after failure


def test_after_a_protocol_error_the_mux_is_dead(pair: Pair) -> None:
    open_accepted(pair)
    expect_protocol_error(pair.gateway, encode_frame(FrameType.OPEN, 2), "wrong parity")
    with pytest.raises(ProtocolError, match="tunnel is closed") as info:
        pair.gateway.open_stream({})
    assert info.value.code == ResetCode.NOT_CONNECTED
    pair.gateway.reset_stream(1, ResetCode.CANCELLED)
    assert pair.gateway.pending_bytes == 0


def test_protocol_error_after_graceful_go_away_sends_no_second_go_away(pair: Pair) -> None:
    pair.gateway.go_away(ResetCode.NO_ERROR, "drain")
    pair.gateway.data_to_send()
    with pytest.raises(ProtocolError):
        pair.gateway.receive_data(encode_frame(FrameType.OPEN, 2))
    assert pair.gateway.data_to_send() == b""


def test_any_byte_split_gives_the_same_events(pair: Pair) -> None:
    first = pair.connector.open_stream({"protocol": "tcp"})
    pair.connector.send_data(first, b"hello world")
    pair.connector.send_fin(first)
    pair.connector.ping(b"abcdefgh")
    pair.connector.send_control({"k": 1})
    data = pair.connector.data_to_send()

    whole = Pair()
    whole.handshake()
    expected = whole.gateway.receive_data(data)
    assert len(expected) == 5
    for step in (1, 5, 12, 13):
        split = Pair()
        split.handshake()
        events: list[Event] = []
        for start in range(0, len(data), step):
            events += split.gateway.receive_data(data[start : start + step])
        assert events == expected
        assert split.gateway.at_frame_boundary


def test_queued_data_counts_what_data_to_send_has_not_taken(small: Pair) -> None:
    first, second = open_accepted(small), open_accepted(small)
    mux = small.connector
    assert mux.send_data(first, b"a" * 700) == 700  # frames of 300, 300, 100
    assert mux.send_data(second, b"b" * 50) == 50
    assert (mux.queued_data(first), mux.queued_data(second)) == (700, 50)
    taken = mux.data_to_send(max_bytes=2 * (12 + 300))  # the first two frames only
    assert len(taken) == 2 * (12 + 300)
    assert (mux.queued_data(first), mux.queued_data(second)) == (100, 50)
    mux.data_to_send()
    assert (mux.queued_data(first), mux.queued_data(second)) == (0, 0)


# --------------------------------------------------------------------------- window growth


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _growing_pair(clock: _Clock) -> Pair:
    """The gateway receives with a 1000-byte window that may grow to 4000."""
    p = Pair(SMALL, SMALL)
    grow = MuxSettings(
        initial_window=1000, max_window=4000, max_frame_size=16 * 1024, data_chunk_size=300
    )
    p.gateway = Mux(initiator=False, settings=grow, clock=clock)
    p.handshake()
    return p


def _credit_after_consuming(pair: Pair, stream_id: int, count: int) -> int:
    """The connector sends ``count`` bytes, the gateway's application consumes them all;
    returns the increment of the one WINDOW_UPDATE that follows."""
    assert pair.connector.send_data(stream_id, b"x" * count) == count
    pair.to_gateway()
    pair.gateway.acknowledge(stream_id, count)
    (frame,) = frames_of(pair.gateway.data_to_send())
    assert frame.type == FrameType.WINDOW_UPDATE
    increment = decode_window_increment(frame.body)
    pair.connector.receive_data(encode_window_update(stream_id, increment))
    return increment


def test_a_fast_reader_grows_the_window_up_to_max_window() -> None:
    clock = _Clock()
    pair = _growing_pair(clock)
    stream_id = open_accepted(pair)
    # Half of 1000 read at once: credit for it plus 1000 more (window 2000).
    assert _credit_after_consuming(pair, stream_id, 500) == 1500
    assert pair.connector.send_window(stream_id) == 2000
    # Half of 2000: window 4000, the maximum.
    assert _credit_after_consuming(pair, stream_id, 2000) == 4000
    assert pair.connector.send_window(stream_id) == 4000
    # At the maximum, only what was consumed comes back.
    assert _credit_after_consuming(pair, stream_id, 4000) == 4000
    assert pair.connector.send_window(stream_id) == 4000
    # The grown window is enforced: one byte more than the credit tears the tunnel down.
    pair.gateway.receive_data(encode_frame(FrameType.DATA, stream_id, b"y" * 4000))
    with pytest.raises(ProtocolError, match="window"):
        pair.gateway.receive_data(encode_frame(FrameType.DATA, stream_id, b"y"))


def test_a_slow_reader_keeps_the_initial_window() -> None:
    clock = _Clock()
    pair = _growing_pair(clock)
    stream_id = open_accepted(pair)
    for _ in range(3):
        clock.now += 0.2  # half a window takes longer than the growth interval
        assert _credit_after_consuming(pair, stream_id, 500) == 500
    assert pair.connector.send_window(stream_id) == 1000


def test_data_from_bytes_is_copied_once_and_from_buffers_at_once(pair: Pair) -> None:
    """DATA from bytes (or a view of bytes, as tunnel streams pass it) is queued as a view and
    copied once, when the message is joined; from a bytearray it is copied at once, so its
    owner may change it as soon as send_data returned; a caller's view of bytes may be released
    meanwhile; the frames carry what was sent."""
    stream_id = open_accepted(pair)
    payload = bytes(range(256)) * (2 * MuxSettings().data_chunk_size // 256)  # two frames
    reused = bytearray(b"before" * 1000)
    viewed = b"viewed" * 1000
    assert pair.gateway.send_data(stream_id, payload) == len(payload)
    assert pair.gateway.send_data(stream_id, reused) == len(reused)
    with memoryview(viewed) as view:
        assert pair.gateway.send_data(stream_id, view[6:]) == len(viewed) - 6
    # the caller's view is released (no BufferError: the mux's slice shares the buffer)
    reused[:] = b"after!" * 1000
    queued = pair.gateway._ordered
    views = [entry for entry in queued if isinstance(entry, tuple)]
    assert [entry[1].obj for entry in views] == [payload, payload, viewed]
    frames = frames_of(pair.gateway.data_to_send())
    data = [bytes(frame.payload) for frame in frames if frame.type == FrameType.DATA]
    assert b"".join(data) == payload + b"before" * 1000 + viewed[6:]
    assert pair.gateway.pending_bytes == 0
    assert pair.gateway.queued_data(stream_id) == 0
