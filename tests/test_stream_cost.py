"""What the per-stream cost cuts must not change (docs/performance.md, "Per-stream cost").

Repeated OPEN documents are decoded once but every stream still gets a document of its own; a
stream waits with one task slot per direction, and a cancelled wait leaves it usable; the TCP
handler's direct connect reports a refusal as trio.open_tcp_stream does.
"""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from backchannel import is_connection_refused
from backchannel._proto._events import StreamAccepted, StreamOpened
from backchannel_tcp._handler import _open_tcp
from tests.test_mux import Pair
from tests.tunnel_pair import tunnel_pair


def test_each_stream_gets_its_own_copy_of_a_repeated_open_document() -> None:
    pair = Pair()
    pair.handshake()
    metadata = {"protocol": "tcp", "attributes": {"tags": ["a"]}, "port": 1}
    pair.gateway.open_stream(metadata)
    pair.gateway.open_stream(metadata)
    first, second = pair.to_connector()
    assert isinstance(first, StreamOpened)
    assert isinstance(second, StreamOpened)
    assert first.metadata == second.metadata == metadata
    first.metadata["attributes"]["tags"].append("changed")
    first.metadata["port"] = 2
    assert second.metadata == metadata
    pair.gateway.open_stream(metadata)
    (third,) = pair.to_connector()
    assert isinstance(third, StreamOpened)
    assert third.metadata == metadata


def test_accept_attributes_are_not_shared_between_streams() -> None:
    pair = Pair()
    pair.handshake()
    ids = [pair.gateway.open_stream({"protocol": "tcp"}) for _ in range(2)]
    pair.to_connector()
    for stream_id in ids:
        pair.connector.accept_stream(stream_id, {"k": "v"})
    first, second = pair.to_gateway()
    assert isinstance(first, StreamAccepted)
    assert isinstance(second, StreamAccepted)
    first.attributes["k"] = "changed"
    assert second.attributes == {"k": "v"}


def test_a_broken_document_is_refused_every_time() -> None:
    """A payload that failed to decode is not remembered as good."""
    from backchannel._proto._errors import ProtocolError
    from backchannel._proto._mux import _Documents

    documents = _Documents()
    for _ in range(2):
        with pytest.raises(ProtocolError, match="OPEN payload is not valid UTF-8 JSON"):
            documents.decode(b'{"protocol": ', "OPEN")


async def test_a_cancelled_wait_leaves_the_stream_usable() -> None:
    with trio.fail_after(10):
        async with tunnel_pair() as pair:
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(acceptor.receive_some, 10)
                await trio.testing.wait_all_tasks_blocked()  # it waits for data now
                nursery.cancel_scope.cancel()
            # and that task is gone
            # Data while nobody waits: the cancelled wait must not be woken again.
            await opener.send_all(b"hello")
            while acceptor.buffered < 5:
                await trio.testing.wait_all_tasks_blocked()
            assert await acceptor.receive_some(10) == b"hello"
            async with trio.open_nursery() as nursery:
                received: list[bytes] = []

                async def receive() -> None:
                    received.append(await acceptor.receive_some(10))

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                await opener.send_all(b"again")
            assert received == [b"again"]
            assert not hasattr(acceptor, "__dict__")  # slots: no instance dict per stream
            await opener.aclose()
            await acceptor.aclose()


async def test_direct_connect_reports_a_refusal_like_open_tcp_stream() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    message = f"^all attempts to connect to 127.0.0.1:{port} failed$"
    with pytest.raises(OSError, match=message) as ours:
        await _open_tcp("127.0.0.1", port)
    with pytest.raises(OSError, match=message) as trios:
        await trio.open_tcp_stream("127.0.0.1", port)
    for caught in (ours, trios):
        assert is_connection_refused(caught.value)
        cause = caught.value.__cause__
        assert isinstance(cause, ExceptionGroup)
        (inner,) = cause.exceptions
        assert isinstance(inner, OSError)
        assert inner.errno == errno.ECONNREFUSED
