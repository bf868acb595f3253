"""The C masker matches wsproto's own, byte for byte, also when a payload arrives in pieces."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from backchannel import _wsmask

pytestmark = pytest.mark.skipif(not _wsmask.available(), reason="websockets speedups missing")


@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=4),
    st.binary(min_size=4, max_size=4),
)
def test_same_bytes_as_wsproto_in_pieces(data: bytes, cuts: list[int], key: bytes) -> None:
    ours, theirs = _wsmask.CMasker(key), _wsmask.PYTHON_MASKER(bytearray(key))
    edges = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for start, end in itertools.pairwise(edges):
        piece = data[start:end]
        assert ours.process(piece) == theirs.process(bytearray(piece))


def test_installed_masker_round_trips_a_large_client_message() -> None:
    assert _wsmask.install()
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
