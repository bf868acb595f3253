"""The frame codec: exact wire bytes, incremental decoding, and hostile input (docs/protocol.md)."""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel._proto._errors import ProtocolError, ResetCode
from backchannel._proto._frames import (
    HARD_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_REASON_BYTES,
    MAX_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    decode_go_away,
    decode_reset,
    decode_window_increment,
    encode_frame,
    encode_go_away,
    encode_header,
    encode_reset,
    encode_window_update,
)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# --------------------------------------------------------------------------- helpers


def decode_all(data: bytes, max_payload: int = HARD_MAX_PAYLOAD) -> list[Frame]:
    """Decode ``data`` in one feed and insist nothing is left over."""
    decoder = FrameDecoder(max_payload)
    frames = decoder.feed(data)
    assert decoder.at_frame_boundary
    return frames


def decode_in_pieces(data: bytes, cuts: list[int]) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        frames += decoder.feed(data[start:cut])
        start = cut
    assert decoder.at_frame_boundary
    return frames


def wire(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.stream_id, bytes(frame.payload), frame.flags)


frame_strategy = st.builds(
    Frame,
    type=st.sampled_from(FrameType),
    stream_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
    flags=st.integers(0, 0xFFFF),
)

# --------------------------------------------------------------------------- header layout


def test_header_layout_is_big_endian_version_type_flags_stream_length() -> None:
    header = encode_header(FrameType.DATA, 0x01020304, 0x0A0B0C0D, flags=0xBEEF)
    assert header == bytes.fromhex("01 03 beef 01020304 0a0b0c0d")
    assert len(header) == HEADER_SIZE == 12


def test_worked_example_from_the_specification() -> None:
    frame = bytes.fromhex("01 03 0000 00000001 00000005 68656c6c6f")
    assert encode_frame(FrameType.DATA, 1, b"hello") == frame
    assert decode_all(frame) == [Frame(FrameType.DATA, 1, b"hello")]
    match = re.search(r"On the wire: `([0-9a-f ]+)`", SPEC.read_text(encoding="utf-8"))
    assert match is not None, "docs/protocol.md lost its worked DATA example"
    assert bytes.fromhex(match.group(1)) == frame


def test_other_hex_examples_in_the_specification() -> None:
    text = SPEC.read_text(encoding="utf-8")
    block = text.split("### Other frames on the same stream", 1)[1].split("```")[1]
    examples = [bytes.fromhex(line.split("  ")[0]) for line in block.strip().splitlines()]
    assert examples == [
        encode_window_update(1, 524288),
        encode_frame(FrameType.FIN, 1),
        encode_reset(3, ResetCode.BACKEND_TIMEOUT, "slow"),
        encode_go_away(2, ResetCode.NO_ERROR, ""),
    ]


def test_frame_type_numbers_are_the_wire_values() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0,
        "OPEN": 1,
        "ACCEPT": 2,
        "DATA": 3,
        "WINDOW_UPDATE": 4,
        "FIN": 5,
        "RESET": 6,
        "PING": 7,
        "PONG": 8,
        "GO_AWAY": 9,
        "CONTROL": 10,
    }


def test_reset_code_numbers_are_the_wire_values() -> None:
    assert [(code.name, int(code)) for code in ResetCode] == [
        ("NO_ERROR", 0),
        ("CANCELLED", 1),
        ("ACCESS_DENIED", 2),
        ("NOT_CONNECTED", 3),
        ("BACKEND_UNREACHABLE", 4),
        ("BACKEND_TIMEOUT", 5),
        ("PROTOCOL_ERROR", 6),
        ("REFUSED", 7),
        ("UNAUTHENTICATED", 8),
        ("INTERNAL", 9),
        ("UNSUPPORTED_PROTOCOL", 10),
        ("FLOW_CONTROL_ERROR", 11),
    ]


def test_unknown_reset_code_from_a_newer_peer_reads_as_internal() -> None:
    assert ResetCode.from_wire(12) is ResetCode.INTERNAL
    assert ResetCode.from_wire(0xFFFF) is ResetCode.INTERNAL
    assert ResetCode.from_wire(2) is ResetCode.ACCESS_DENIED


# --------------------------------------------------------------------------- every frame type


@pytest.mark.parametrize(
    ("frame_type", "stream_id", "payload"),
    [
        (FrameType.HELLO, 0, b'{"protocol":"backchannel/1"}'),
        (FrameType.OPEN, 1, b'{"protocol":"tcp","host":"erp","port":3300}'),
        (FrameType.ACCEPT, 2, b"{}"),
        (FrameType.DATA, 3, bytes(range(256))),
        (FrameType.DATA, 5, b""),
        (FrameType.WINDOW_UPDATE, 7, struct.pack(">I", 4096)),
        (FrameType.FIN, 9, b""),
        (FrameType.RESET, 11, b"\x00\x02denied"),
        (FrameType.PING, 0, b"12345678"),
        (FrameType.PONG, 0, b"87654321"),
        (FrameType.GO_AWAY, 0, b"\x00\x00\x00\x05\x00\x00bye"),
        (FrameType.CONTROL, 0, b'{"trust":[]}'),
        (FrameType.DATA, 2**32 - 1, b"x"),
    ],
)
def test_each_frame_type_round_trips(frame_type: FrameType, stream_id: int, payload: bytes) -> None:
    data = encode_frame(frame_type, stream_id, payload)
    assert data[:HEADER_SIZE] == struct.pack(">BBHII", 1, frame_type, 0, stream_id, len(payload))
    assert data[HEADER_SIZE:] == payload
    assert decode_all(data) == [Frame(frame_type, stream_id, payload)]


def test_flags_are_carried_through() -> None:
    assert decode_all(encode_frame(FrameType.DATA, 1, b"a", flags=0x8001)) == [
        Frame(FrameType.DATA, 1, b"a", 0x8001)
    ]


def test_window_update_encoding() -> None:
    data = encode_window_update(5, 0x00010000)
    assert data == bytes.fromhex("01 04 0000 00000005 00000004 00010000")
    (frame,) = decode_all(data)
    assert decode_window_increment(frame.body) == 0x10000


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_update_payload_must_be_four_bytes(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="4 bytes"):
        decode_window_increment(payload)


@pytest.mark.parametrize("increment", [0, MAX_WINDOW + 1, 2**32 - 1])
def test_window_update_increment_out_of_range(increment: int) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        decode_window_increment(struct.pack(">I", increment))


def test_window_update_increment_limits_accepted() -> None:
    assert decode_window_increment(struct.pack(">I", 1)) == 1
    assert decode_window_increment(struct.pack(">I", MAX_WINDOW)) == MAX_WINDOW


def test_reset_encoding() -> None:
    data = encode_reset(3, ResetCode.BACKEND_TIMEOUT, "slow")
    assert data == bytes.fromhex("01 06 0000 00000003 00000006 0005") + b"slow"
    (frame,) = decode_all(data)
    assert decode_reset(frame.body) == (ResetCode.BACKEND_TIMEOUT, "slow")


def test_reset_without_reason() -> None:
    assert decode_reset(b"\x00\x07") == (7, "")


def test_go_away_encoding() -> None:
    data = encode_go_away(42, ResetCode.UNAUTHENTICATED, "bad token")
    assert data[:HEADER_SIZE] == bytes.fromhex("01 09 0000 00000000 0000000f")
    assert data[HEADER_SIZE:] == bytes.fromhex("0000002a 0008") + b"bad token"
    (frame,) = decode_all(data)
    assert decode_go_away(frame.body) == (42, ResetCode.UNAUTHENTICATED, "bad token")


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_reset_payload_too_short(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="shorter"):
        decode_reset(payload)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00\x01\x00"])
def test_go_away_payload_too_short(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="shorter"):
        decode_go_away(payload)


def test_reason_must_be_utf8() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_reset(b"\x00\x01\xff\xfe")
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_go_away(b"\x00\x00\x00\x00\x00\x01\xc3")


def test_reason_longer_than_limit_is_rejected() -> None:
    assert decode_reset(b"\x00\x01" + b"r" * MAX_REASON_BYTES)[1] == "r" * MAX_REASON_BYTES
    with pytest.raises(ProtocolError, match="longer"):
        decode_reset(b"\x00\x01" + b"r" * (MAX_REASON_BYTES + 1))
    with pytest.raises(ProtocolError, match="longer"):
        decode_go_away(b"\x00" * 6 + b"r" * (MAX_REASON_BYTES + 1))


# --------------------------------------------------------------------------- reason truncation


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])  # 1, 2, 3 and 4 UTF-8 bytes
@pytest.mark.parametrize("prefix", range(4))
def test_long_reason_is_cut_on_a_character_boundary(char: str, prefix: int) -> None:
    reason = "p" * prefix + char * 2000
    for data in (encode_reset(1, ResetCode.INTERNAL, reason), encode_go_away(0, 9, reason)):
        (frame,) = decode_all(data)
        decoded = (
            decode_reset(frame.body)[1]
            if frame.type is FrameType.RESET
            else decode_go_away(frame.body)[2]
        )
        raw = decoded.encode("utf-8")
        assert MAX_REASON_BYTES - len(char.encode()) < len(raw) <= MAX_REASON_BYTES
        assert reason.startswith(decoded)


@given(st.text(max_size=1500))
def test_any_reason_encodes_to_a_decodable_prefix(reason: str) -> None:
    (frame,) = decode_all(encode_reset(1, ResetCode.CANCELLED, reason))
    code, decoded = decode_reset(frame.body)
    assert code == ResetCode.CANCELLED
    assert len(decoded.encode("utf-8")) <= MAX_REASON_BYTES
    assert reason.startswith(decoded)  # st.text() draws no lone surrogates
    if len(reason.encode("utf-8")) <= MAX_REASON_BYTES:
        assert decoded == reason
    else:
        assert len(decoded.encode("utf-8")) > MAX_REASON_BYTES - 4


def test_lone_surrogate_in_reason_does_not_break_encoding() -> None:
    (frame,) = decode_all(encode_reset(1, ResetCode.INTERNAL, "bad \ud800 name"))
    assert decode_reset(frame.body)[1] == "bad ? name"


# --------------------------------------------------------------------------- incremental decoding


def test_byte_at_a_time_gives_the_same_frames_as_one_feed() -> None:
    data = b"".join(
        [
            encode_frame(FrameType.HELLO, 0, b'{"protocol":"backchannel/1"}'),
            encode_frame(FrameType.OPEN, 1, b'{"host":"h"}'),
            encode_frame(FrameType.DATA, 1, b"payload bytes"),
            encode_frame(FrameType.DATA, 1, b""),
            encode_window_update(1, 100),
            encode_frame(FrameType.FIN, 1),
            encode_reset(3, ResetCode.CANCELLED, "gone"),
            encode_go_away(1, 0, ""),
        ]
    )
    whole = decode_all(data)
    assert len(whole) == 8
    decoder = FrameDecoder()
    one_by_one: list[Frame] = []
    for i in range(len(data)):
        one_by_one += decoder.feed(data[i : i + 1])
        # A frame comes out exactly when its last byte arrives, never earlier.
        assert decoder.at_frame_boundary == (i + 1 == _end_of(whole, i))
    assert one_by_one == whole


def _end_of(frames: list[Frame], index: int) -> int:
    """Offset just past the frame containing byte ``index``."""
    end = 0
    for frame in frames:
        end += HEADER_SIZE + len(frame.payload)
        if index < end:
            return end
    raise AssertionError("index past the data")


def test_partial_frame_is_kept_until_completed() -> None:
    data = encode_frame(FrameType.DATA, 7, b"abcdef")
    decoder = FrameDecoder()
    assert decoder.feed(data[:5]) == []
    assert not decoder.at_frame_boundary
    assert decoder.feed(data[5:15]) == []
    assert decoder.feed(data[15:] + data[:3]) == [Frame(FrameType.DATA, 7, b"abcdef")]
    assert not decoder.at_frame_boundary
    assert decoder.feed(data[3:]) == [Frame(FrameType.DATA, 7, b"abcdef")]
    assert decoder.at_frame_boundary


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    data = encode_frame(FrameType.DATA, 1, b"xy") * 2
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(data[:13])) == []
    frames = decoder.feed(memoryview(data)[13:])
    assert frames == [Frame(FrameType.DATA, 1, b"xy")] * 2


def test_data_payloads_are_views_and_other_payloads_bytes() -> None:
    """A DATA payload is a view into what the decoder was fed (no copy of bulk bytes); every
    other frame's payload is bytes of its own."""
    message = bytearray(
        encode_frame(FrameType.DATA, 1, b"bulk") + encode_frame(FrameType.PING, 0, b"12345678")
    )
    data, ping = FrameDecoder().feed(message)
    assert isinstance(data.payload, memoryview)
    assert data.payload.obj is message
    assert bytes(data.data) == b"bulk"
    assert type(ping.payload) is bytes
    assert ping.body == b"12345678"


def test_max_frames_keeps_the_rest_buffered() -> None:
    one = encode_frame(FrameType.PING, 0, b"12345678")
    decoder = FrameDecoder()
    assert decoder.feed(one * 3, max_frames=1) == [Frame(FrameType.PING, 0, b"12345678")]
    assert not decoder.at_frame_boundary
    assert len(decoder.feed(b"", max_frames=None)) == 2
    assert decoder.at_frame_boundary


@given(st.lists(frame_strategy, max_size=12), st.data())
def test_round_trip_under_arbitrary_splits(frames: list[Frame], data: st.DataObject) -> None:
    encoded = b"".join(wire(frame) for frame in frames)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=20), label="cuts")
    assert decode_in_pieces(encoded, cuts) == frames


# --------------------------------------------------------------------------- hostile input


def test_unknown_version_is_rejected() -> None:
    data = bytearray(encode_frame(FrameType.DATA, 1, b"x"))
    data[0] = 2
    with pytest.raises(ProtocolError, match="version 2"):
        FrameDecoder().feed(bytes(data))


@pytest.mark.parametrize("raw_type", [0x0B, 0x7F, 0xFF])
def test_unknown_frame_type_is_rejected(raw_type: int) -> None:
    data = struct.pack(">BBHII", 1, raw_type, 0, 1, 0)
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(data)


def test_over_long_length_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_payload=1000)
    # Only the 12 header bytes: the payload never arrives, the decoder must object anyway.
    with pytest.raises(ProtocolError, match="1001 bytes exceeds the limit of 1000"):
        decoder.feed(encode_header(FrameType.DATA, 1, 1001))


def test_length_at_the_limit_waits_for_the_payload() -> None:
    decoder = FrameDecoder(max_payload=1000)
    assert decoder.feed(encode_header(FrameType.DATA, 1, 1000)) == []
    assert decoder.feed(b"z" * 1000) == [Frame(FrameType.DATA, 1, b"z" * 1000)]


def test_over_long_length_rejected_when_header_arrives_in_pieces() -> None:
    header = encode_header(FrameType.OPEN, 1, HARD_MAX_PAYLOAD + 1)
    decoder = FrameDecoder()
    assert decoder.feed(header[:11]) == []
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(header[11:])


def test_hard_ceiling_cannot_be_raised() -> None:
    decoder = FrameDecoder(max_payload=2**31)
    assert decoder.max_payload == HARD_MAX_PAYLOAD == 16 * 1024 * 1024
    decoder.max_payload = 2**32
    assert decoder.max_payload == HARD_MAX_PAYLOAD
    with pytest.raises(ProtocolError):
        decoder.feed(encode_header(FrameType.DATA, 1, 2**32 - 1))
    decoder.max_payload = 10
    with pytest.raises(ProtocolError):
        decoder.feed(encode_header(FrameType.DATA, 1, 11))


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_garbage_raises_nothing_but_protocol_error(garbage: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_payload=256)
    start = 0
    try:
        for cut in [*sorted(c for c in set(cuts) if c <= len(garbage)), len(garbage)]:
            for frame in decoder.feed(garbage[start:cut]):
                assert isinstance(frame.type, FrameType)
                assert len(frame.payload) <= 256
            start = cut
    except ProtocolError:
        pass


@given(st.binary(max_size=64))
def test_garbage_payloads_raise_nothing_but_protocol_error(payload: bytes) -> None:
    for decode in (decode_window_increment, decode_reset, decode_go_away):
        with contextlib.suppress(ProtocolError):
            decode(payload)
