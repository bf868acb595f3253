"""The C masker and the lean frame builder produce what wsproto itself would."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request
from wsproto.frame_protocol import FrameProtocol, Opcode

from backchannel import _wsspeedups

pytestmark = pytest.mark.skipif(not _wsspeedups.available(), reason="websockets speedups missing")


@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=4),
    st.binary(min_size=4, max_size=4),
)
def test_same_bytes_as_wsproto_in_pieces(data: bytes, cuts: list[int], key: bytes) -> None:
    ours, theirs = _wsspeedups.CMasker(key), _wsspeedups.PYTHON_MASKER(bytearray(key))
    edges = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for start, end in itertools.pairwise(edges):
        piece = data[start:end]
        assert ours.process(piece) == theirs.process(bytearray(piece))


def test_installed_masker_round_trips_a_large_client_message() -> None:
    assert _wsspeedups.install()
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    next(client.events())
    payload = os.urandom(300_001)
    wire = client.send(BytesMessage(data=payload))
    for index in range(0, len(wire), 16384):  # as TLS records arrive
        server.receive_data(wire[index : index + 16384])
    received = b"".join(bytes(e.data) for e in server.events() if isinstance(e, BytesMessage))
    assert received == payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.CONTINUATION])
@pytest.mark.parametrize("fin", [True, False])
def test_lean_server_frames_are_wsproto_frames(size: int, opcode: Opcode, fin: bool) -> None:
    payload = os.urandom(size)
    protocol = FrameProtocol(client=False, extensions=[])
    expected = _wsspeedups.PYTHON_SERIALIZE_FRAME(protocol, opcode, payload, fin)
    assert _wsspeedups.lean_serialize_frame(protocol, opcode, payload, fin) == expected


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65536, 300_000])
def test_lean_client_frames_decode_to_the_payload(size: int) -> None:
    payload = os.urandom(size)
    frame = _wsspeedups.lean_serialize_frame(FrameProtocol(True, []), Opcode.BINARY, payload)
    reference = _wsspeedups.PYTHON_SERIALIZE_FRAME(FrameProtocol(True, []), Opcode.BINARY, payload)
    assert len(frame) == len(reference)
    assert frame[:2] == reference[:2]
    receiver = FrameProtocol(client=False, extensions=[])
    receiver.receive_bytes(frame)
    (decoded,) = receiver.received_frames()
    assert decoded.payload == payload


def test_lean_control_frame_limit() -> None:
    with pytest.raises(ValueError, match="control frame"):
        _wsspeedups.lean_serialize_frame(FrameProtocol(False, []), Opcode.PING, b"x" * 126)
