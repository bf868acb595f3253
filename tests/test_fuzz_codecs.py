"""Fuzz targets for the parsers that read hostile bytes first: the frame decoder, the mux's receive
path and the SOCKS5 handshake parser.

Inputs are either arbitrary bytes or *structured then mutated*: well-formed frames (or SOCKS5
conversations) whose encoding is then damaged by bit flips, overwritten, inserted and deleted
bytes and truncation, so the fuzzer spends its budget past the first length check. Each is fed
in arbitrary splits. The claims: only the parser's own error escapes (``ProtocolError`` /
``SocksError``), what is buffered stays below one maximal frame (message), the bytes a mux
queues in answer stay proportional to what it was fed, and a mux that failed is dead (GO_AWAY
queued, nothing more accepted).

Short budget by default; ``pytest -m fuzz --fuzz[=N]`` for the long run (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel._proto._errors import ProtocolError
from backchannel._proto._events import (
    DataReceived,
    Event,
    StreamOpened,
)
from backchannel._proto._frames import (
    HEADER_SIZE,
    MAX_WINDOW,
    FrameDecoder,
    FrameType,
    decode_go_away,
    encode_frame,
    encode_go_away,
    encode_reset,
)
from backchannel._proto._mux import PROTOCOL_NAME, Mux, MuxSettings
from backchannel_tcp._socks5 import (
    AuthMethod,
    ConnectRequest,
    Greeting,
    SapToken,
    Socks5ServerConnection,
    SocksError,
    State,
    UsernamePassword,
)

pytestmark = pytest.mark.fuzz

#: What the mux under test promises: small, so limits are reached within one example.
SETTINGS = MuxSettings(
    initial_window=4096, max_frame_size=16 * 1024, max_concurrent_streams=4, data_chunk_size=1024
)


def run_target(
    strategy: st.SearchStrategy[Any], check: Callable[[Any], None], examples: int, short: int
) -> None:
    """Run ``check`` on ``examples`` draws of ``strategy`` (``short`` when none were asked for)."""
    budget = settings(
        max_examples=examples or short,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    budget(given(strategy)(check))()


# --------------------------------------------------------------------------- mutation


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random edits (or none: the valid input is a case too)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if not data and kind != "insert":
            continue
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        else:
            end = min(len(data), at + draw(st.integers(1, 64)))
            data[at:at] = data[at:end]
    return bytes(data)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (sometimes byte by byte)."""
    if data and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(
    st.sampled_from(["protocol", "host", "port", "principal", "attributes", "x"])
    | st.text(max_size=8),
    json_values,
    max_size=6,
).map(lambda d: json.dumps(d).encode())


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


payload_for: dict[FrameType, st.SearchStrategy[bytes]] = {
    FrameType.HELLO: json_objects,
    FrameType.OPEN: json_objects,
    FrameType.ACCEPT: json_objects,
    FrameType.CONTROL: json_objects,
    FrameType.DATA: st.binary(max_size=3000),
    FrameType.WINDOW_UPDATE: st.sampled_from([0, 1, 4096, MAX_WINDOW, 2**32 - 1]).map(_u32)
    | st.integers(0, 2**32 - 1).map(_u32),
    FrameType.FIN: st.just(b"") | st.binary(max_size=4),
    FrameType.RESET: st.tuples(st.integers(0, 20), st.text(max_size=40)).map(
        lambda t: encode_reset(1, t[0], t[1])[HEADER_SIZE:]
    ),
    FrameType.PING: st.binary(min_size=8, max_size=8) | st.binary(max_size=12),
    FrameType.PONG: st.binary(min_size=8, max_size=8),
    FrameType.GO_AWAY: st.tuples(st.integers(0, 12), st.integers(0, 12), st.text(max_size=20)).map(
        lambda t: encode_go_away(t[0], t[1], t[2])[HEADER_SIZE:]
    ),
}
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 2**31, 2**32 - 1]) | st.integers(
    0, 2**32 - 1
)


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    frame_type = draw(st.sampled_from(FrameType))
    payload = draw(payload_for[frame_type])
    flags = draw(st.just(0) | st.integers(0, 0xFFFF))
    return encode_frame(frame_type, draw(stream_ids), payload, flags)


@st.composite
def frame_sequences(draw: st.DrawFn) -> bytes:
    """Frames that a mux would plausibly see, then damaged; or plain garbage."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=2000))
    stream = b"".join(draw(st.lists(frame_bytes(), max_size=16)))
    return draw(mutated(stream))


# --------------------------------------------------------------------------- frame decoder


def test_frame_decoder_raises_only_protocol_error_and_buffers_one_frame_at_most(
    fuzz_examples: int,
) -> None:
    def check(case: tuple[int, list[bytes]]) -> None:
        limit, chunks = case
        decoder = FrameDecoder(max_payload=limit)
        for chunk in chunks:
            try:
                frames = decoder.feed(chunk)
            except ProtocolError:
                return
            for frame in frames:
                assert len(frame.payload) <= limit
            assert len(decoder._buffer) < HEADER_SIZE + limit  # the bound itself

    cases = st.tuples(st.sampled_from([0, 16, 1024, 16 * 1024]), frame_sequences()).flatmap(
        lambda t: st.tuples(st.just(t[0]), splits(t[1]))
    )
    run_target(cases, check, fuzz_examples, short=100)


# --------------------------------------------------------------------------- mux


def handshaken(initiator: bool) -> Mux:
    """A mux (connector if ``initiator``) that has exchanged HELLOs with a well-behaved peer."""
    mux = Mux(initiator=initiator, settings=SETTINGS)
    peer = Mux(initiator=not initiator, settings=SETTINGS)
    if initiator:
        mux.send_hello({"role": "connector"})
        peer.receive_data(mux.data_to_send())
        peer.send_hello({"role": "gateway"})
        mux.receive_data(peer.data_to_send())
    else:
        peer.send_hello({"role": "connector"})
        mux.receive_data(peer.data_to_send())
        mux.send_hello({"role": "gateway"})
        mux.data_to_send()
    assert mux.ready
    return mux


def react(mux: Mux, events: list[Event], opened_here: set[int]) -> None:
    """What an application would do: accept, answer with data, consume; never misuse."""
    for event in events:
        if isinstance(event, StreamOpened) and mux.is_open(event.stream_id):
            mux.accept_stream(event.stream_id)
            mux.send_data(event.stream_id, b"answer")
        elif isinstance(event, DataReceived) and mux.is_open(event.stream_id):
            mux.acknowledge(event.stream_id, len(event.data))
    assert mux.open_stream_count <= len(opened_here) + SETTINGS.max_concurrent_streams


def expect_dead(mux: Mux, error: ProtocolError) -> None:
    """After a protocol error: GO_AWAY with the error's code queued, nothing more accepted."""
    out = mux.data_to_send()
    decoder = FrameDecoder()
    frames = decoder.feed(out)
    go_aways = [f for f in frames if f.type is FrameType.GO_AWAY]
    assert go_aways, "a failed mux must tell the peer why"
    _, code, _ = decode_go_away(go_aways[-1].body)
    assert code == error.code
    assert mux.open_stream_count == 0
    assert not mux.accepting_streams
    assert mux.receive_data(encode_frame(FrameType.PING, 0, b"12345678")) == []


@st.composite
def mux_cases(draw: st.DrawFn) -> tuple[bool, int, list[bytes]]:
    initiator = draw(st.booleans())
    local_opens = draw(st.integers(0, 3))
    return initiator, local_opens, draw(splits(draw(frame_sequences())))


def test_mux_receive_path_raises_only_protocol_error_with_bounded_output(
    fuzz_examples: int,
) -> None:
    def check(case: tuple[bool, int, list[bytes]]) -> None:
        initiator, local_opens, chunks = case
        mux = handshaken(initiator)
        opened = {mux.open_stream({"protocol": "tcp", "n": n}) for n in range(local_opens)}
        for stream_id in opened:
            mux.send_data(stream_id, b"early")
        mux.data_to_send()
        for chunk in chunks:
            try:
                events = mux.receive_data(chunk)
            except ProtocolError as error:
                expect_dead(mux, error)
                return
            answer = mux.data_to_send()
            # Answers (PONG, RESET of a refused OPEN, credit) are small per frame received:
            # no input makes the mux send much more than it got.
            frames_in = len(chunk) // HEADER_SIZE + 1
            assert len(answer) <= 2 * len(chunk) + 128 * frames_in
            assert len(mux._decoder._buffer) < HEADER_SIZE + SETTINGS.max_frame_size
            react(mux, events, opened)
            mux.data_to_send()

    run_target(mux_cases(), check, fuzz_examples, short=80)


@st.composite
def hello_cases(draw: st.DrawFn) -> list[bytes]:
    """The accepting side before any HELLO: a (maybe damaged) HELLO, then anything."""
    document: dict[str, Any] = {
        "protocol": draw(st.sampled_from([PROTOCOL_NAME, "backchannel/2", ""])),
        "initial_window": draw(st.sampled_from([1, 4096, MAX_WINDOW, 0, -1, MAX_WINDOW + 1])),
        "max_frame_size": draw(st.sampled_from([16 * 1024, 16 * 1024 * 1024, 100, 2**40])),
        "max_concurrent_streams": draw(st.sampled_from([1, 100, 2**31, 0, True, "1"])),
        **draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    }
    hello = encode_frame(FrameType.HELLO, 0, json.dumps(document).encode())
    rest = b"".join(draw(st.lists(frame_bytes(), max_size=6)))
    return draw(splits(draw(mutated(hello + rest))))


def test_mux_before_the_handshake_raises_only_protocol_error(fuzz_examples: int) -> None:
    def check(chunks: list[bytes]) -> None:
        mux = Mux(initiator=False, settings=SETTINGS)
        for chunk in chunks:
            try:
                mux.receive_data(chunk)
            except ProtocolError as error:
                expect_dead(mux, error)
                return
            limit = SETTINGS.max_frame_size if mux.peer else 16 * 1024
            assert len(mux._decoder._buffer) < HEADER_SIZE + limit

    run_target(hello_cases(), check, fuzz_examples, short=60)


# --------------------------------------------------------------------------- SOCKS5


def _enc_request(host: bytes, port: int, atyp: int) -> bytes:
    target = bytes([3, len(host) & 255]) + host if atyp == 3 else bytes([atyp]) + host
    return bytes([5, 1, 0]) + target + port.to_bytes(2, "big")


@st.composite
def socks_conversations(draw: st.DrawFn) -> tuple[tuple[int, ...], bytes]:
    """A whole client side (greeting, auth, request, payload), then damaged."""
    methods = tuple(
        draw(st.lists(st.sampled_from([0, 1, 2, 0x80, 0x81, 0xFF]), min_size=1, max_size=6))
    )
    wire = bytes([5, len(methods), *methods])
    method = draw(st.sampled_from([0, 2, 0x80]))
    if method == 2:
        user = draw(st.binary(max_size=40))
        pwd = draw(st.binary(max_size=40))
        wire += bytes([1, len(user)]) + user + bytes([len(pwd)]) + pwd
    elif method == 0x80:
        token = draw(st.binary(max_size=80))
        length = draw(st.just(len(token)) | st.integers(0, 2**32 - 1))
        location = draw(st.binary(max_size=30))
        wire += b"\x01" + length.to_bytes(4, "big") + token + bytes([len(location)]) + location
    atyp = draw(st.sampled_from([1, 3, 4, 0, 5]))
    host = {
        1: draw(st.binary(min_size=4, max_size=4)),
        4: draw(st.binary(min_size=16, max_size=16)),
    }.get(atyp, draw(st.binary(max_size=40)))
    wire += _enc_request(host, draw(st.integers(0, 65535)), atyp)
    wire += draw(st.binary(max_size=40))
    accepted = tuple(
        draw(
            st.permutations(
                [AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD, AuthMethod.SAP_TOKEN]
            )
        )
    )
    return accepted[: draw(st.integers(1, 3))], draw(mutated(wire))


def drive_socks(conn: Socks5ServerConnection, chunks: list[bytes], eof: bool) -> None:
    """Answer every event as the front door does (accepting any credentials)."""
    for chunk in [*chunks, *([b""] if eof else [])]:
        if conn.state in (State.REPLY_PENDING, State.DONE, State.CLOSED):
            return
        events = conn.receive_data(chunk)
        while events:
            (event,) = events
            if isinstance(event, Greeting):
                conn.choose_method(conn.preferred_method())
            elif isinstance(event, UsernamePassword | SapToken):
                conn.auth_reply(True)
            else:
                assert isinstance(event, ConnectRequest)
                return
            events = conn.pending_events()


def test_socks5_parser_raises_only_socks_error(fuzz_examples: int) -> None:
    def check(case: tuple[tuple[tuple[int, ...], bytes], list[bytes], bool, int]) -> None:
        (accepted, _), chunks, eof, max_token = case
        conn = Socks5ServerConnection(accepted, max_token_length=max_token)
        try:
            drive_socks(conn, chunks, eof)
        except SocksError:
            assert conn.state is State.CLOSED
            assert conn.trailing_data == b""
        # Nothing past one maximal message (plus the bounded early data) is ever held.
        assert len(conn._buffer) <= 64 * 1024 + 1 + 4 + max_token + 1 + 255

    cases = socks_conversations().flatmap(
        lambda conv: st.tuples(
            st.just(conv), splits(conv[1]), st.booleans(), st.sampled_from([1, 16, 80, 16384])
        )
    )
    run_target(cases, check, fuzz_examples, short=150)
