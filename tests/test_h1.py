"""HTTP/1.1 heads without h11 (backchannel_http._h1) and the relay's plain exchanges.

The module's claim is checked against h11 itself: whatever it parses, h11 parses the same way
(method, target, status, reason, fields, body length), and whatever it writes, h11 writes
byte for byte, with None wherever h11 would refuse or frame otherwise. End to end, a plain
exchange through the proxy crosses the gateway and the connector without h11 on either side;
an answer that is not plain (chunked) still comes through, by h11, on the same connection.
"""

from __future__ import annotations

import sys
from functools import partial

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from backchannel import HostPort, TunnelStream
from backchannel_http._front_door import HttpProxyFrontDoor
from backchannel_http._h1 import (
    head_end,
    parse_request,
    parse_response,
    read_head,
    request_bytes,
    response_bytes,
)
from backchannel_http._relay import HttpLimits
from tests.nginx import PUBLIC_BODY
from tests.test_http_e2e import (  # noqa: F401 (fixtures)
    BASIC_APP,
    Chain,
    chain,
    files_dir,
    nginx,
    pki,
)
from tests.test_http_front_door import AUTH, CONNECTED, FakeServices, client
from tests.test_http_handler import http_stream
from tests.tunnel_pair import TunnelPair, tunnel_pair

# Pieces chosen around the grammar's edges: obs-text, control bytes, whitespace, commas.
_NAMES = st.sampled_from(
    [
        b"Host",
        b"host",
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"Connection",
        b"Expect",
        b"Upgrade",
        b"X-A",
        b"x-b",
        b"X A",
        b"X:A",
        b"",
        b"\xe9",
    ]
)
_VALUES = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | (
    st.sampled_from(
        [
            b"0",
            b"5",
            b"05",
            b"5, 5",
            b"-1",
            b"chunked",
            b"close",
            b"keep-alive",
            b"Upgrade",
            b"100-continue",
            b" a ",
            b"\ta\t",
            b"a  b",
            b"\xff\x80",
            b"\x01",
            b"\x7f",
            b"web.virtual",
        ]
    )
)
_SEPARATORS = st.sampled_from([b": ", b":", b" : ", b":\t", b" :"])
_FIELDS = st.lists(st.tuples(_NAMES, _SEPARATORS, _VALUES), max_size=5)


def _head(first_line: bytes, fields: list[tuple[bytes, bytes, bytes]]) -> bytes:
    lines = [first_line] + [name + separator + value for name, separator, value in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _h11_events(conn: h11.Connection, data: bytes) -> list[h11.Event]:
    conn.receive_data(data)
    events: list[h11.Event] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        assert isinstance(event, h11.Event)
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


def _body_length(events: list[h11.Event]) -> int:
    assert isinstance(events[-1], h11.EndOfMessage), events
    return sum(len(e.data) for e in events if isinstance(e, h11.Data))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"M-1", b"G T", b"CONNECT", b""]),
    target=st.sampled_from([b"/", b"/a?b=c", b"http://h:80/x", b"/\x80", b"/a b", b"*"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1 ", b"http/1.1"]),
    fields=_FIELDS,
)
def test_what_parse_request_accepts_h11_reads_the_same_way(
    method: bytes, target: bytes, version: bytes, fields: list[tuple[bytes, bytes, bytes]]
) -> None:
    head = _head(method + b" " + target + b" " + version, fields)
    ours = parse_request(head)
    if ours is None:
        return
    assert head_end(head) == len(head)
    events = _h11_events(h11.Connection(h11.SERVER), head + b"x" * ours.body_length)
    request = events[0]
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (ours.method, ours.target)
    assert list(request.headers) == list(ours.headers)
    assert request.headers.raw_items() == ours.headers.raw_items()
    assert _body_length(events) == ours.body_length


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    status=st.sampled_from([b"200", b"204", b"304", b"404", b"599", b"100", b"101", b"600"]),
    reason=st.sampled_from([b" OK", b"", b" ", b" a\tb", b" \xe9", b" \x01", b"  x"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    fields=_FIELDS,
)
def test_what_parse_response_accepts_h11_reads_the_same_way(
    method: bytes,
    status: bytes,
    reason: bytes,
    version: bytes,
    fields: list[tuple[bytes, bytes, bytes]],
) -> None:
    head = _head(version + b" " + status + reason, fields)
    ours = parse_response(head, method)
    if ours is None:
        return
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "h")]))
    conn.send(h11.EndOfMessage())
    events = _h11_events(conn, head + b"x" * ours.body_length)
    response = events[0]
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (ours.status_code, ours.reason)
    assert list(response.headers) == list(ours.headers)
    assert _body_length(events) == ours.body_length
    assert conn.their_state is h11.DONE  # kept alive: the next exchange may follow


_OUT_NAMES = st.sampled_from([b"Host", b"Content-Length", b"X-A", b"x b", b"Connection", b"TE"])
_OUT_VALUES = st.sampled_from([b"h", b"12", b"", b" a", b"a ", b"a\tb", b"\xe9", b"\x00", b"1x"])


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"G T"]),
    target=st.sampled_from([b"/", b"/a?b", b"/\x80", b"/a b"]),
    headers=st.lists(st.tuples(_OUT_NAMES, _OUT_VALUES), max_size=4),
)
def test_request_bytes_are_what_h11_writes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    ours = request_bytes(method, target, headers)
    try:
        conn = h11.Connection(h11.CLIENT)
        theirs = conn.send(h11.Request(method=method, target=target, headers=headers))
    except h11.LocalProtocolError:
        assert ours is None
        return
    if ours is not None:
        assert ours == theirs
        assert conn.our_state is h11.SEND_BODY  # framed by Content-Length (or empty)


@settings(max_examples=400, deadline=None)
@given(
    status=st.sampled_from([200, 204, 304, 404, 999, 101]),
    reason=st.sampled_from([b"OK", b"", b"a\tb", b"\xe9", b"\x01"]),
    headers=st.lists(st.tuples(_OUT_NAMES, _OUT_VALUES), max_size=4),
)
def test_response_bytes_are_what_h11_writes_on_a_kept_alive_connection(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    ours = response_bytes(status, reason, headers)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    conn.next_event()
    conn.next_event()
    try:
        theirs = conn.send(h11.Response(status_code=status, reason=reason, headers=headers))
    except h11.LocalProtocolError:
        assert ours is None
        return
    if ours is not None:
        assert ours == theirs


def test_plain_heads_are_read() -> None:
    request = parse_request(
        b"POST /x?y HTTP/1.1\r\nHost: web.virtual\r\nContent-Length:  3 \r\nX-A: \xe9\r\n\r\n"
    )
    assert request is not None
    assert (request.method, request.target, request.body_length) == (b"POST", b"/x?y", 3)
    assert list(request.headers) == [
        (b"host", b"web.virtual"),
        (b"content-length", b"3"),
        (b"x-a", b"\xe9"),
    ]
    assert request.headers.raw_items()[1] == (b"Content-Length", b"3")
    response = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", b"HEAD")
    assert response is not None
    assert response.body_length == 0  # HEAD: no body
    response = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", b"GET")
    assert response is not None
    assert response.body_length == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_requests_h11_must_handle_are_not_plain(head: bytes) -> None:
    assert parse_request(head) is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # until the connection closes
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 600 X\r\nContent-Length: 1\r\n\r\n",
    ],
)
def test_responses_h11_must_handle_are_not_plain(head: bytes) -> None:
    assert parse_response(head, b"GET") is None


# ---------------------------------------------------------------------------- end to end


class _H11Calls:
    """Counts the h11 calls the HTTP plugin makes in this process (not the backends' or the
    test's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("receive_data", "send", "next_event"):
            original = getattr(h11.Connection, name)

            def counted(self_: h11.Connection, *args: object, _f: object = original) -> object:
                if sys._getframe(1).f_globals["__name__"].startswith("backchannel_http"):
                    self.count += 1
                return _f(self_, *args)  # type: ignore[operator]

            monkeypatch.setattr(h11.Connection, name, counted)


def _get(path: str) -> bytes:
    return (
        f"GET http://web.virtual:8080{path} HTTP/1.1\r\nHost: web.virtual:8080\r\n"
        f"Proxy-Authorization: {BASIC_APP}\r\n\r\n"
    ).encode()


async def _exchange(stream: trio.SocketStream, request: bytes) -> bytes:
    """Send ``request`` and read one Content-Length or chunked response (raw bytes)."""
    await stream.send_all(request)
    data = b""
    while (end := data.find(b"\r\n\r\n")) == -1:
        data += await stream.receive_some(65536)
    head = data[: end + 4].lower()
    if b"content-length:" in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(data) < end + 4 + length:
            data += await stream.receive_some(65536)
    else:
        while not data.endswith(b"0\r\n\r\n"):
            data += await stream.receive_some(65536)
    return data


@pytest.mark.integration
async def test_plain_exchanges_cross_both_sides_without_h11_and_others_still_by_h11(
    chain: Chain,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _H11Calls(monkeypatch)
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", chain.proxy)
        async with stream:
            for _ in range(3):
                response = await _exchange(stream, _get("/public/hello.txt"))
                assert response.startswith(b"HTTP/1.1 200 ")
                assert response.endswith(PUBLIC_BODY)
            assert calls.count == 0  # nginx's Content-Length answers: plain all the way
            # A chunked answer (the Python backend echoes a chunked upload chunked): h11 on both
            # sides, and the connection goes on.
            upload = (
                "POST http://py.virtual:9000/echo HTTP/1.1\r\nHost: py.virtual:9000\r\n"
                f"Proxy-Authorization: {BASIC_APP}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ).encode()
            response = await _exchange(stream, upload)
            assert response.startswith(b"HTTP/1.1 200 ")
            assert b"\r\n3\r\nabc\r\n" in response
            assert calls.count > 0
            response = await _exchange(stream, _get("/public/hello.txt"))
            assert response.startswith(b"HTTP/1.1 200 ")
            assert response.endswith(PUBLIC_BODY)


class _EarlyAnswerBackend(trio.abc.Stream):
    """A backend that takes ``room`` bytes, answers 413 at once and closes: more of the body
    than that meets a reset."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken = 0
        self.answer = [
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
            b"too big\n",
            b"",
        ]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.taken += len(data)
        if self.taken > self.room:
            raise trio.BrokenResourceError("connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.answer.pop(0) if self.answer else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("split", [False, True], ids=["plain", "h11"])
async def test_a_backend_answering_early_and_closing_is_relayed_not_a_502(
    monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    """A backend that refuses a body (413) after its first bytes and resets the rest: its
    answer reaches the gateway on both paths (split: the body follows the head, h11's way)."""
    backends: list[_EarlyAnswerBackend] = []

    async def connect(*args: object) -> trio.abc.Stream:
        backends.append(_EarlyAnswerBackend(4096))
        return backends[-1]

    monkeypatch.setattr("backchannel_http._handler._connect", connect)
    body = b"b" * 8192
    request = (
        b"POST /public/upload HTTP/1.1\r\nHost: erp.virtual:8000\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    )
    async with http_stream(1) as h:
        with trio.fail_after(5):
            if split:
                await h.stream.send_all(request)
                await wait_all_tasks_blocked()
                await h.stream.send_all(body)
            else:
                await h.stream.send_all(request + body)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
            while not isinstance(event := conn.next_event(), h11.Response):
                assert event is h11.NEED_DATA, event
                conn.receive_data(bytes(await h.stream.receive_some(65536)))
    assert event.status_code == 413
    assert len(backends) == 1  # not retried, not answered 502


class _Pieces(trio.abc.ReceiveStream):
    """Gives ``pieces`` one per read, then the end."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("cut", range(1, 24))
async def test_read_head_finds_the_end_wherever_the_reads_cut_it(cut: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    into = bytearray()
    assert await read_head(
        _Pieces(head[:cut], head[cut:] + b"body"), into, limit=100, chunk=10
    ) == (len(head), False)
    assert into == head + b"body"


async def test_read_head_reports_the_end_and_the_limit() -> None:
    into = bytearray()
    assert await read_head(_Pieces(b"GET / HT"), into, limit=100, chunk=10) == (-1, True)
    assert into == b"GET / HT"  # what came before the end stays
    into = bytearray()
    assert await read_head(_Pieces(b"x" * 60, b"y" * 60), into, limit=100, chunk=64) == (-1, False)
    assert len(into) == 120


# ------------------------------------------------------------- bytes past an answer (h11 path)

#: A chunked answer (the h11 path on both sides) with a whole second answer glued after it.
_CHUNKED_AND_MORE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
)
_GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"


class _AsSocket:
    """A tunnel stream where _serve_junk_then_good expects a socket stream."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def __aenter__(self) -> _AsSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()


async def _serve_junk_then_good(
    connections: list[int], stream: trio.SocketStream | _AsSocket
) -> None:
    """Answers the first request of the first connection with _CHUNKED_AND_MORE, every other
    with _GOOD."""
    index = len(connections)
    connections.append(index)
    answers = 0
    data = b""
    async with stream:
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                await stream.send_all(_CHUNKED_AND_MORE if index == answers == 0 else _GOOD)
                answers += 1
        except trio.BrokenResourceError:
            pass


async def test_a_backend_sending_past_its_answer_is_not_asked_again() -> None:
    """The connector: bytes past a backend's answer would be read by h11 as the answer to the
    next request on that connection; the connection is closed instead."""
    connections: list[int] = []
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, partial(_serve_junk_then_good, connections), 0)
        [listener] = await nursery.start(partial(serve, host="127.0.0.1"))
        async with http_stream(listener.socket.getsockname()[1]) as h:
            with trio.fail_after(10):
                first = await h.client.request("GET", "/public/a")
                second = await h.client.request("GET", "/public/b")
        nursery.cancel_scope.cancel()
    assert (first.status, first.body) == (200, b"fine")
    assert (second.status, second.body) == (200, b"good")
    assert connections == [0, 1]


async def _connector_sending_past_its_answer(pair: TunnelPair, streams: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        async for stream in pair.accepted:
            await stream.accept()
            socket_like = _AsSocket(stream)
            nursery.start_soon(_serve_junk_then_good, streams, socket_like)


async def test_a_connector_sending_past_its_answer_loses_the_stream() -> None:
    """The gateway: bytes past the connector's answer would be read as the answer to the
    client's next request; the stream is dropped and the next request gets a new one."""
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        streams: list[int] = []
        nursery.start_soon(_connector_sending_past_its_answer, pair, streams)
        services = FakeServices(pair, set(CONNECTED))
        door = HttpProxyFrontDoor(services, HostPort("127.0.0.1", 0), HttpLimits())
        [proxy] = await nursery.start(door.serve)
        async with client(proxy.port) as c:
            with trio.fail_after(10):
                auth = [("Proxy-Authorization", AUTH)]
                first = await c.request("GET", "http://erp.virtual/a", auth)
                second = await c.request("GET", "http://erp.virtual/b", auth)
        nursery.cancel_scope.cancel()
    assert (first[0].status_code, first[1]) == (200, b"fine")
    assert (second[0].status_code, second[1]) == (200, b"good")
    assert streams == [0, 1]
