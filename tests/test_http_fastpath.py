"""The HTTP relay's per-request fast path: a small response crosses each hop in one write (the
gateway to its client, the connector into the tunnel stream), and a kept-alive stream the
connector ended before answering is still retried.

The gateway runs against the fake GatewayServices of tests/test_http_front_door.py, whose streams
cross a real tunnel pair to a connector written here; the connector's handler runs as in
tests/test_http_handler.py, against a backend written here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel import HostPort, TunnelStream
from backchannel_http._front_door import ClientConnection, HttpProxyFrontDoor
from backchannel_http._relay import Client, HttpLimits, ProxyRouter
from backchannel_http._resources import AmbiguousPath, _normalise_slowly, normalise_request_target
from tests.test_http_front_door import AUTH, CONNECTED, FakeServices, client
from tests.test_http_handler import http_stream
from tests.tunnel_pair import TunnelPair, tunnel_pair

BODY = b"x" * 1024


async def _next(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(bytes(await stream.receive_some(65536)))
    return event


async def _answer_in_one_piece(conn: h11.Connection, stream: TunnelStream) -> None:
    head = h11.Response(status_code=200, headers=[("Content-Length", str(len(BODY)))])
    data = b"".join(conn.send(e) or b"" for e in (head, h11.Data(data=BODY), h11.EndOfMessage()))
    await stream.send_all(data)


async def _connector(pair: TunnelPair, streams: list[int], *, fin_after_first: bool) -> None:
    """Serves every stream: each request is answered with BODY in one send. With
    ``fin_after_first``, the first stream ends its sending side (FIN, no reset) after its first
    answer and reads on, answering nothing more: a kept-alive stream gone stale."""
    async with trio.open_nursery() as nursery:
        async for stream in pair.accepted:
            await stream.accept()
            streams.append(len(streams))
            nursery.start_soon(_serve, stream, len(streams) - 1, fin_after_first)


async def _serve(stream: TunnelStream, index: int, fin_after_first: bool) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while isinstance(await _next(conn, stream), h11.Request):
            while not isinstance(await _next(conn, stream), h11.EndOfMessage):
                pass
            await _answer_in_one_piece(conn, stream)
            if fin_after_first and index == 0:
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass  # the next request, never answered here
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await stream.aclose()


@asynccontextmanager
async def _running(*, fin_after_first: bool) -> AsyncIterator[tuple[FakeServices, list[int]]]:
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        streams: list[int] = []
        nursery.start_soon(lambda: _connector(pair, streams, fin_after_first=fin_after_first))
        yield FakeServices(pair, set(CONNECTED)), streams
        nursery.cancel_scope.cancel()


async def test_a_kept_alive_stream_ended_before_the_answer_is_retried_on_a_new_one() -> None:
    with trio.fail_after(10):
        async with (
            _running(fin_after_first=True) as (services, streams),
            trio.open_nursery() as nursery,
        ):
            listen = HostPort("127.0.0.1", 0)
            [proxy] = await nursery.start(HttpProxyFrontDoor(services, listen, HttpLimits()).serve)
            async with client(proxy.port) as c:
                auth = [("Proxy-Authorization", AUTH)]
                for path in ("/first", "/second"):
                    response, body = await c.request("GET", f"http://erp.virtual{path}", auth)
                    assert response.status_code == 200
                    assert body == BODY
            assert streams == [0, 1]  # the second request went on a new stream
            nursery.cancel_scope.cancel()


class _RecordingStream(trio.abc.HalfCloseableStream):
    """The gateway's end of a client connection, recording each ``send_all``."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_small_response_reaches_the_client_in_one_write() -> None:
    with trio.fail_after(10):
        async with _running(fin_after_first=False) as (services, _):
            ours, theirs = trio.testing.memory_stream_pair()
            recording = _RecordingStream(ours)
            connection = ClientConnection(
                services,
                recording,
                Client("127.0.0.1", 1),
                ProxyRouter(services),
                HttpLimits(),
                "t",
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.run)
                conn = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    if conn.our_state is h11.DONE:
                        conn.start_next_cycle()
                    headers = [("Host", "erp.virtual"), ("Proxy-Authorization", AUTH)]
                    request = h11.Request(
                        method="GET", target="http://erp.virtual/small", headers=headers
                    )
                    await theirs.send_all(
                        (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                    )
                    response = await _next(conn, theirs)
                    assert isinstance(response, h11.Response)
                    assert response.status_code == 200
                    assert await _next(conn, theirs) == h11.Data(data=BODY)
                    assert isinstance(await _next(conn, theirs), h11.EndOfMessage)
                    # Head, body and end: one write, not one per h11 event.
                    assert len(recording.writes) == 1
                    assert recording.writes[0].endswith(b"\r\n\r\n" + BODY)
                    recording.writes.clear()
                await theirs.aclose()


# --------------------------------------------------------------------------- connector side


async def _one_piece_backend(stream: trio.SocketStream) -> None:
    """Answers every request with BODY, head and body in one send."""
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while isinstance(await _next(conn, stream), h11.Request):
            while not isinstance(await _next(conn, stream), h11.EndOfMessage):
                pass
            head = h11.Response(status_code=200, headers=[("Content-Length", str(len(BODY)))])
            events = (head, h11.Data(data=BODY), h11.EndOfMessage())
            await stream.send_all(b"".join(conn.send(e) or b"" for e in events))
            conn.start_next_cycle()


async def test_the_connector_writes_an_answer_into_the_stream_in_one_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[tuple[TunnelStream, bytes]] = []
    send_all = TunnelStream.send_all

    async def recording(stream: TunnelStream, data: bytes | bytearray | memoryview) -> None:
        writes.append((stream, bytes(data)))  # the class: TunnelStream has __slots__
        await send_all(stream, data)

    monkeypatch.setattr(TunnelStream, "send_all", recording)
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, _one_piece_backend, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve)
        async with http_stream(listener.socket.getsockname()[1]) as h:

            def connector_writes() -> list[bytes]:
                return [data for stream, data in writes if stream is not h.stream]

            with trio.fail_after(10):
                # Relayed from the backend: head, body and end in one write, not one per event.
                reply = await h.client.request("GET", "/public/a")
                assert (reply.status, reply.body) == (200, BODY)
                assert len(connector_writes()) == 1
                # Made up by the connector (403): one write as well.
                writes.clear()
                reply = await h.client.request("GET", "/private")
                assert reply.status == 403
                (answer,) = connector_writes()
                assert answer.endswith(reply.body)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- resource paths


def _outcome(normalise: Callable[[str], str], target: str) -> str:
    try:
        return "ok " + normalise(target)
    except AmbiguousPath as exc:
        return "refused " + exc.reason


#: Characters each rule of the canonical-path check is about, plus ordinary ones.
_TARGET_ALPHABET = st.sampled_from(
    [*"/?#%;.\\ \t\x00\x7f\x1f\x80é~-_!$&'()*+,=:@\"<>[]{}|^`aZ09", "%2f", "%2e", "%41", ".."]
)


@settings(max_examples=2000)
@given(st.lists(_TARGET_ALPHABET, max_size=24).map("".join))
def test_the_plain_target_shortcut_decides_exactly_as_the_full_check(target: str) -> None:
    assert _outcome(normalise_request_target, target) == _outcome(_normalise_slowly, target)
    assert _outcome(normalise_request_target, "/" + target) == _outcome(
        _normalise_slowly, "/" + target
    )


def test_plain_targets_keep_their_path_and_bad_ones_are_still_refused() -> None:
    assert _outcome(normalise_request_target, "/small?x=1&y=/a#").startswith("refused")
    assert normalise_request_target("/a/b.c/~d?q=%zz") == "/a/b.c/~d"
    assert _outcome(normalise_request_target, "/a/../b").startswith("refused")
    assert _outcome(normalise_request_target, "/a//b").startswith("refused")
