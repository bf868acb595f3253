"""Review of the plain (h11-free) HTTP exchanges (backchannel_http._h1 and its callers).

Differential throughout: the same request and the same answer go once through the plain path and
once through h11 (forced by pipelining two requests in one write, which never takes the plain
path), and what the peers see must be the same bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel import ResetCode, TunnelStream
from backchannel_http._front_door import ClientConnection
from backchannel_http._h1 import (
    head_end,
    parse_request,
    parse_response,
    request_bytes,
    response_bytes,
)
from backchannel_http._handler import _StreamServer
from backchannel_http._relay import Client, HttpLimits, ProxyRouter
from tests.test_http_front_door import AUTH, CONNECTED, FakeServices
from tests.test_http_handler import http_stream
from tests.tunnel_pair import tunnel_pair

# --------------------------------------------------------------------------- gateway harness


@pytest.fixture
def plain_bodies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every plain response relayed without h11 ("gateway" / "connector"), so that a
    differential test knows it compared the plain path with h11 and not h11 with itself."""
    seen: list[str] = []
    for cls, side in ((ClientConnection, "gateway"), (_StreamServer, "connector")):
        original = cls._relay_plain_body

        async def recording(
            self: object, *args: object, _o: object = original, _s: str = side
        ) -> object:
            seen.append(_s)
            return await _o(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(cls, "_relay_plain_body", recording)
    return seen


Action = bytes | tuple[str, bytes]


@dataclass
class ConnectorLog:
    """What the scripted connector received, and on how many streams."""

    received: bytearray = field(default_factory=bytearray)
    streams: int = 0
    requests: int = 0


async def _read_request(
    stream: trio.abc.ReceiveStream, buffer: bytearray, log: ConnectorLog | BackendLog
) -> bool:
    """Read one whole request into ``buffer`` (raw); False at the stream's end."""
    while True:
        conn = h11.Connection(h11.SERVER)
        if buffer:  # b"" would mean the end of the stream
            conn.receive_data(bytes(buffer))
        try:
            event = conn.next_event()
            while event is not h11.NEED_DATA and not isinstance(event, h11.EndOfMessage):
                if isinstance(event, h11.ConnectionClosed):
                    return False
                event = conn.next_event()
        except h11.RemoteProtocolError:
            return False
        if isinstance(event, h11.EndOfMessage):
            rest = conn.trailing_data[0]
            del buffer[: len(buffer) - len(rest)]
            return True
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if not data:
            return False
        log.received += data
        buffer += data


async def _scripted_stream(
    stream: TunnelStream, actions: Callable[[int], Action], log: ConnectorLog
) -> None:
    buffer = bytearray()
    try:
        while await _read_request(stream, buffer, log):
            log.requests += 1
            action = actions(log.requests - 1)
            if isinstance(action, bytes):
                await stream.send_all(action)
                continue
            kind, data = action
            if data:
                await stream.send_all(data)
            if kind == "fin":
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass  # not logged: when the peer gives up on it is a race
                return
            if kind == "reset":
                await stream.reset(ResetCode.CANCELLED, "stale")
                return
            raise AssertionError(kind)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


@asynccontextmanager
async def gateway(
    actions: Callable[[int], Action],
) -> AsyncIterator[tuple[trio.abc.HalfCloseableStream, ConnectorLog]]:
    """A ClientConnection (proxy router) whose client end is returned, its streams served by
    a connector that answers the n-th request with ``actions(n)``."""
    log = ConnectorLog()
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:

        async def connector() -> None:
            async with trio.open_nursery() as inner:
                async for stream in pair.accepted:
                    await stream.accept()
                    log.streams += 1
                    inner.start_soon(_scripted_stream, stream, actions, log)

        nursery.start_soon(connector)
        services = FakeServices(pair, set(CONNECTED))
        ours, theirs = trio.testing.memory_stream_pair()
        connection = ClientConnection(
            services, ours, Client("127.0.0.1", 1), ProxyRouter(services), HttpLimits(), "t"
        )
        nursery.start_soon(connection.run)
        yield theirs, log
        nursery.cancel_scope.cancel()


def request(
    method: bytes = b"GET", path: bytes = b"/a", body: bytes = b"", extra: bytes = b""
) -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method + b" http://erp.virtual" + path + b" HTTP/1.1\r\nHost: erp.virtual\r\n"
        b"Proxy-Authorization: " + AUTH.encode() + b"\r\n" + extra + length + b"\r\n" + body
    )


async def read_responses(
    stream: trio.abc.ReceiveStream, methods: list[bytes]
) -> tuple[bytes, list[tuple[int, bytes]], bool]:
    """Read the answers to ``methods`` (as far as they go): the raw bytes, (status, body) of
    each complete one, and whether the connection ended."""
    conn = h11.Connection(h11.CLIENT)
    raw = bytearray()
    answers: list[tuple[int, bytes]] = []
    closed = False
    for method in methods:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, body = 0, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return bytes(raw), answers, True
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError as exc:  # a reset stream
                    return bytes(raw) + b"<reset: %s>" % str(exc).encode(), answers, True
                raw += data
                conn.receive_data(bytes(data))
                closed = closed or not data
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answers.append((status, bytes(body)))
                break
            elif isinstance(event, h11.ConnectionClosed):
                return bytes(raw), answers, True
    return bytes(raw), answers, closed


async def run_gateway(
    requests: list[bytes], actions: Callable[[int], Action], *, pipelined: bool
) -> tuple[bytes, list[tuple[int, bytes]], bytes, int]:
    """Send ``requests`` one at a time (plain where they can be) or all in one write (h11):
    (bytes to the client, answers, bytes to the connector, streams opened)."""
    methods = [r.split(b" ", 1)[0] for r in requests]
    with trio.fail_after(10):
        async with gateway(actions) as (client, log):
            if pipelined:
                await client.send_all(b"".join(requests))
                raw, answers, _ = await read_responses(client, methods)
            else:
                raw_parts, answers = bytearray(), []
                for req, method in zip(requests, methods, strict=True):
                    await client.send_all(req)
                    part, got, closed = await read_responses(client, [method])
                    raw_parts += part
                    answers += got
                    if closed or not got:
                        break
                raw = bytes(raw_parts)
            await client.aclose()
            return raw, answers, bytes(log.received), log.streams


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


_TWO_GETS = [request(path=b"/one"), request(path=b"/two")]
_RESPONSES: dict[str, list[Action]] = {
    "plain": [ok(b"one"), ok(b"two")],
    "no reason": [b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx", ok()],
    "obs-text reason": [b"HTTP/1.1 299 \xe9t\xe9 \t x\r\nContent-Length: 1\r\n\r\nx", ok()],
    "odd fields": [
        b"HTTP/1.1 200 OK\r\nX-A:\t\xff\x80 a\t\r\nx-empty:\r\nCoNtEnT-LeNgTh: 003\r\n\r\nabc",
        ok(),
    ],
    "204": [b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n", ok()],
    "304 with length": [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", ok()],
    "connection close": [ok(extra=b"Connection: close\r\n"), ok()],
    "connection names a field": [ok(extra=b"Connection: x-a\r\nX-A: 1\r\nX-B: 2\r\n"), ok()],
    "keep-alive field": [ok(extra=b"Keep-Alive: timeout=5\r\n"), ok()],
    "chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ok(),
    ],
    "early hints": [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(), ok()],
    "no framing": [("fin", b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), ok()],
    "status 600": [b"HTTP/1.1 600 Odd\r\nContent-Length: 1\r\n\r\nx", ok()],
    "http/1.0 answer": [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", ok()],
    "body cut off": [("fin", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), ok()],
    "head cut off": [("fin", b"HTTP/1.1 200 OK\r\nContent-Le"), ok()],
    "reset in the head": [("reset", b"HTTP/1.1 200 OK\r\nContent-Le"), ok()],
    "reset in the body": [("reset", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), ok()],
    "fin after the answer": [("fin", ok(b"one")), ok(b"two")],
    "malformed head": [b"HTTP/1.1 200 OK\r\nBad Field: x\r\n\r\n", ok()],
}


@pytest.mark.parametrize("case", sorted(_RESPONSES))
async def test_the_client_sees_the_same_bytes_plain_or_through_h11(
    case: str, plain_bodies: list[str]
) -> None:
    script = _RESPONSES[case]

    def actions(index: int) -> Action:
        return script[index] if index < len(script) else ok()

    through_h11 = await run_gateway(_TWO_GETS, actions, pipelined=True)
    assert plain_bodies == []
    plain = await run_gateway(_TWO_GETS, actions, pipelined=False)
    assert plain[:3] == through_h11[:3]
    if case == "plain":
        assert plain_bodies == ["gateway", "gateway"]


# --------------------------------------------------------------------------- connector harness


@dataclass
class BackendLog:
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    requests: int = 0


async def _scripted_backend(
    actions: Callable[[int], Action], log: BackendLog, stream: trio.SocketStream
) -> None:
    log.connections += 1
    buffer = bytearray()
    try:
        while await _read_request(stream, buffer, log):
            log.requests += 1
            action = actions(log.requests - 1)
            if isinstance(action, bytes):
                await stream.send_all(action)
                continue
            kind, data = action
            if data:
                await stream.send_all(data)
            if kind == "fin":
                return
            if kind == "hang":
                await trio.sleep_forever()
            raise AssertionError(kind)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def origin_request(
    method: bytes = b"GET", path: bytes = b"/public/a", body: bytes = b"", extra: bytes = b""
) -> bytes:
    """A request as the gateway writes it on a stream (h11's serialisation)."""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: erp.virtual:8000\r\n"
        + extra
        + length
        + b"\r\n"
        + body
    )


async def run_connector(
    requests: list[bytes],
    actions: Callable[[int], Action],
    *,
    pipelined: bool,
    table: dict[str, object] | None = None,
) -> tuple[bytes, list[tuple[int, bytes]], bytes, int]:
    """Like :func:`run_gateway`, for the connector's handler in front of a scripted backend."""
    methods = [r.split(b" ", 1)[0] for r in requests]
    log = BackendLog()
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, partial(_scripted_backend, actions, log), 0)
        [listener] = await nursery.start(partial(serve, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10):
            async with http_stream(port, table) as h:
                if pipelined:
                    await h.stream.send_all(b"".join(requests))
                    raw, answers, _ = await read_responses(h.stream, methods)
                else:
                    parts, answers = bytearray(), []
                    for req, method in zip(requests, methods, strict=True):
                        await h.stream.send_all(req)
                        part, got, closed = await read_responses(h.stream, [method])
                        parts += part
                        answers += got
                        if closed or not got:
                            break
                    raw = bytes(parts)
        nursery.cancel_scope.cancel()
    return raw, answers, bytes(log.received), log.connections


_TWO_ORIGIN_GETS = [origin_request(path=b"/public/one"), origin_request(path=b"/public/two")]


@pytest.mark.parametrize("case", sorted(_RESPONSES))
async def test_the_gateway_sees_the_same_bytes_plain_or_through_h11(
    case: str, plain_bodies: list[str]
) -> None:
    # A backend cannot reset: it closes.
    script = [
        ("fin", a[1]) if isinstance(a, tuple) and a[0] == "reset" else a for a in _RESPONSES[case]
    ]

    def actions(index: int) -> Action:
        return script[index] if index < len(script) else ok()

    through_h11 = await run_connector(_TWO_ORIGIN_GETS, actions, pipelined=True)
    assert plain_bodies == []
    plain = await run_connector(_TWO_ORIGIN_GETS, actions, pipelined=False)
    assert plain[:3] == through_h11[:3]
    if case == "plain":
        assert plain_bodies == ["connector", "connector"]


_REQUEST_PAIRS: dict[str, list[bytes]] = {
    "posts with bodies": [request(b"POST", body=b"abc"), request(b"POST", body=b"de")],
    "get then post": [request(), request(b"POST", body=b"xyz")],
    "odd fields": [
        request(
            extra=b"X-Odd:\t\xe9 v \t\r\nx-EMPTY:\r\nConnection: keep-alive, X-Drop\r\n"
            b"X-Drop: 1\r\nKeep-Alive: 5\r\n"
        ),
        request(b"PUT", body=b"0123456789", extra=b"cOnTeNt-TyPe: a/b\r\n"),
    ],
    "leading zeros": [
        request(b"POST", extra=b"Content-Length: 003\r\n") + b"abc",
        request(b"POST", extra=b"Content-Length: 0\r\n"),
    ],
    "control headers": [
        request(extra=b"SAP-Connectivity-SCC-Location_ID: loc1\r\n"),
        request(extra=b"X-Backchannel-Location: loc2\r\n"),
    ],
}
_ANSWERS: dict[str, list[Action]] = {
    "plain": [ok(b"one"), ok(b"two")],
    "fin after the answer": [("fin", ok(b"one")), ok(b"two")],
    "chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ok(),
    ],
}


@pytest.mark.parametrize("answers", sorted(_ANSWERS))
@pytest.mark.parametrize("requests", sorted(_REQUEST_PAIRS))
async def test_requests_reach_the_connector_the_same_plain_or_through_h11(
    requests: str, answers: str, plain_bodies: list[str]
) -> None:
    script = _ANSWERS[answers]
    pair = _REQUEST_PAIRS[requests]

    def actions(index: int) -> Action:
        return script[index] if index < len(script) else ok()

    through_h11 = await run_gateway(pair, actions, pipelined=True)
    assert plain_bodies == []
    plain = await run_gateway(pair, actions, pipelined=False)
    if answers == "plain" and not requests.endswith("then allowed"):
        assert len(plain_bodies) == 2
    assert plain == through_h11


_ORIGIN_PAIRS: dict[str, list[bytes]] = {
    "gets": _TWO_ORIGIN_GETS,
    "posts with bodies": [
        origin_request(b"POST", body=b"abc"),
        origin_request(b"POST", body=b"de"),
    ],
    "odd fields": [
        origin_request(extra=b"X-Odd:\t\xe9 v \t\r\nx-EMPTY:\r\nX-Forwarded-For: 1.2.3.4\r\n"),
        origin_request(b"PUT", body=b"0123456789", extra=b"cOnTeNt-TyPe: a/b\r\n"),
    ],
    "denied then allowed": [origin_request(path=b"/private"), origin_request()],
    "misdirected then allowed": [
        origin_request().replace(b"erp.virtual:8000", b"other:1"),
        origin_request(b"POST", body=b"abc"),
    ],
}


@pytest.mark.parametrize("answers", sorted(_ANSWERS))
@pytest.mark.parametrize("requests", sorted(_ORIGIN_PAIRS))
async def test_requests_reach_the_backend_the_same_plain_or_through_h11(
    requests: str, answers: str, plain_bodies: list[str]
) -> None:
    script = _ANSWERS[answers]
    pair = _ORIGIN_PAIRS[requests]

    def actions(index: int) -> Action:
        return script[index] if index < len(script) else ok()

    through_h11 = await run_connector(pair, actions, pipelined=True)
    assert plain_bodies == []
    plain = await run_connector(pair, actions, pipelined=False)
    if answers == "plain" and not requests.endswith("then allowed"):
        assert len(plain_bodies) == 2
    assert plain[:3] == through_h11[:3]


# --------------------------------------------------------------------------- targeted cases


async def test_after_a_fallback_the_next_exchange_is_plain_again_on_the_same_stream(
    plain_bodies: list[str],
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    script: list[Action] = [chunked, ok(b"two"), ok(b"three")]
    requests = [request(path=b"/1"), request(b"POST", body=b"x"), request(path=b"/3")]
    _, answers, received, streams = await run_gateway(
        requests, lambda i: script[i], pipelined=False
    )
    assert answers == [(200, b"abc"), (200, b"two"), (200, b"three")]
    assert streams == 1
    assert plain_bodies == ["gateway", "gateway"]
    assert received.count(b"HTTP/1.1\r\n") == 3


async def test_bytes_after_a_plain_answer_retire_the_stream(plain_bodies: list[str]) -> None:
    # h11 would keep them for the next exchange (and read them as its answer); the plain path
    # does not use the stream again.
    script: list[Action] = [ok(b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", ok()]
    _, answers, _, streams = await run_gateway(_TWO_GETS, lambda i: script[i], pipelined=False)
    assert answers == [(200, b"one"), (200, b"hello")]
    assert streams == 2


async def test_a_stale_kept_alive_stream_is_retried_for_a_plain_get(
    plain_bodies: list[str],
) -> None:
    script: list[Action] = [("fin", ok(b"one")), ok(b"two")]
    _, answers, _, streams = await run_gateway(_TWO_GETS, lambda i: script[i], pipelined=False)
    assert answers == [(200, b"one"), (200, b"two")]
    assert streams == 2
    assert plain_bodies == ["gateway"]  # the retry goes through h11


async def test_a_stale_kept_alive_stream_is_not_retried_for_a_plain_post() -> None:
    script: list[Action] = [("fin", ok(b"one")), ok(b"two")]
    requests = [request(), request(b"POST", body=b"abc")]
    _, answers, _, streams = await run_gateway(requests, lambda i: script[i], pipelined=False)
    assert [status for status, _ in answers] == [200, 502]
    assert streams == 1


async def test_a_request_split_inside_its_empty_line_is_still_relayed_plain(
    plain_bodies: list[str],
) -> None:
    whole = request(b"POST", body=b"abc")
    cut = whole.index(b"\r\n\r\n") + 3  # between the last CR and LF

    with trio.fail_after(10):
        async with gateway(lambda i: ok()) as (client, log):
            await client.send_all(whole[:cut])
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(whole[cut:])
            _, answers, _ = await read_responses(client, [b"POST"])
    assert answers == [(200, b"hello")]
    assert bytes(log.received).endswith(b"Content-Length: 3\r\n\r\nabc")
    assert plain_bodies == ["gateway"]


async def test_a_head_answer_with_a_length_has_no_body_plain_or_not(
    plain_bodies: list[str],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    requests = [request(b"HEAD"), request(b"HEAD")]
    plain = await run_gateway(requests, lambda i: head, pipelined=False)
    assert plain_bodies == ["gateway", "gateway"]
    through_h11 = await run_gateway(requests, lambda i: head, pipelined=True)
    assert plain == through_h11
    assert plain[1] == [(200, b""), (200, b"")]


async def test_a_stale_backend_connection_is_retried_for_a_plain_get(
    plain_bodies: list[str],
) -> None:
    script: list[Action] = [("fin", ok(b"one")), ok(b"two")]
    _, answers, _, connections = await run_connector(
        _TWO_ORIGIN_GETS, lambda i: script[i], pipelined=False
    )
    assert answers == [(200, b"one"), (200, b"two")]
    assert connections == 2


async def test_a_backend_silent_past_backend_timeout_gets_504_on_the_plain_path(
    plain_bodies: list[str],
) -> None:
    script: list[Action] = [("hang", b""), ok(b"two")]
    with trio.fail_after(5):
        _, answers, _, _ = await run_connector(
            _TWO_ORIGIN_GETS,
            lambda i: script[i],
            pipelined=False,
            table={"backend_timeout": 0.2},
        )
    assert [status for status, _ in answers] == [504, 200]
    assert plain_bodies == ["connector"]


class _FullBackend(trio.abc.Stream):
    """A backend that takes ``room`` bytes (its socket buffers) and then reads no more, and
    never answers."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.received = bytearray()
        self.head_seen = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        taken = bytes(data[: max(0, self.room - len(self.received))])
        self.received += taken
        if b"\r\n\r\n" in self.received:
            self.head_seen.set()
        if len(taken) < len(data):
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _post_to_a_full_backend(monkeypatch: pytest.MonkeyPatch, *, split: bool) -> list[int]:
    """POST 8 KiB to a backend with 4 KiB of room (backend_timeout 0.2 s): the statuses that
    came back within 2 s. ``split``: the body follows once the head reached the backend, so
    the connector takes the h11 path."""
    backend = _FullBackend(4096)

    async def connect(*args: object) -> trio.abc.Stream:
        return backend

    monkeypatch.setattr("backchannel_http._handler._connect", connect)
    whole = origin_request(b"POST", body=b"b" * 8192)
    cut = whole.index(b"\r\n\r\n") + 5
    answers: list[tuple[int, bytes]] = []
    async with http_stream(1, {"backend_timeout": 0.2}) as h:
        with trio.move_on_after(2):
            if split:
                await h.stream.send_all(whole[:cut])
                await backend.head_seen.wait()
                await h.stream.send_all(whole[cut:])
            else:
                await h.stream.send_all(whole)
            _, answers, _ = await read_responses(h.stream, [b"POST"])
    return [status for status, _ in answers]


async def test_through_h11_a_backend_that_stops_reading_the_body_gets_504(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _post_to_a_full_backend(monkeypatch, split=True) == [504]


async def test_plain_a_backend_that_stops_reading_the_body_gets_504(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _post_to_a_full_backend(monkeypatch, split=False) == [504]


# --------------------------------------------------------------------------- _h1 against h11

_NAMES = st.sampled_from(
    [
        b"Host",
        b"hOsT",
        b"Content-Length",
        b"Connection",
        b"Expect",
        b"Upgrade",
        b"TE",
        b"Transfer-Encoding",
        b"X",
        b"Keep-Alive",
        b"X Y",
        b"",
    ]
)
_VALUES = st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | (
    st.sampled_from(
        [
            b"0",
            b"3",
            b"003",
            b"3, 3",
            b"+3",
            b"close",
            b"Close ",
            b"keep-alive, CLOSE",
            b"upgrade",
            b"100-continue",
            b" x ",
            b"chunked",
            b"\xff\x80",
            b"a\t b",
        ]
    )
)
_SEPARATORS = st.sampled_from([b": ", b":", b":\t", b" :", b": \t "])
_FIELD_LINES = st.lists(st.tuples(_NAMES, _SEPARATORS, _VALUES), max_size=5).map(
    lambda fields: b"".join(n + s + v + b"\r\n" for n, s, v in fields)
)


def _h11_request(data: bytes) -> tuple[h11.Request, int, h11.Connection] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        assert isinstance(request, h11.Request), request
        length = 0
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            length += len(event.data)
    except h11.RemoteProtocolError:
        return None
    return request, length, conn


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", b"get", b"G T", b"OPTIONS"]),
    st.sampled_from([b"/", b"http://a/b?c", b"*", b"/\x80", b"/a b", b"a:1"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.10", b"http/1.1", b"HTTP/2.0"]),
    _FIELD_LINES,
)
def test_what_parse_request_accepts_h11_reads_the_same(
    method: bytes, target: bytes, version: bytes, fields: bytes
) -> None:
    head = method + b" " + target + b" " + version + b"\r\n" + fields + b"\r\n"
    ours = parse_request(head)
    if ours is None:
        return
    theirs = _h11_request(head + b"b" * ours.body_length)
    assert theirs is not None, head
    event, length, conn = theirs
    assert (event.method, event.target) == (ours.method, ours.target)
    assert list(event.headers) == list(ours.headers)
    assert event.headers.raw_items() == ours.headers.raw_items()
    assert length == ours.body_length
    # Nothing h11 would treat specially: kept alive, no 100-continue, no switch proposed.
    assert conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.SEND_RESPONSE}
    assert not conn.they_are_waiting_for_100_continue
    assert conn.trailing_data == (b"", False)
    assert b"close" not in b" ".join(v.lower() for n, v in event.headers if n == b"connection")


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"http/1.1"]),
    st.sampled_from([b"200", b"204", b"304", b"100", b"101", b"199", b"600", b"20", b"599"]),
    st.sampled_from([b"", b" ", b" OK", b" \xe9", b"  two  ", b" a\tb", b" \x01", b" \x7f"]),
    _FIELD_LINES,
)
def test_what_parse_response_accepts_h11_reads_the_same(
    method: bytes, version: bytes, status: bytes, reason: bytes, fields: bytes
) -> None:
    head = version + b" " + status + reason + b"\r\n" + fields + b"\r\n"
    ours = parse_response(head, method)
    if ours is None:
        return
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"b" * ours.body_length)
    response = conn.next_event()
    assert isinstance(response, h11.Response), head
    assert (response.status_code, response.reason) == (ours.status_code, ours.reason)
    assert list(response.headers) == list(ours.headers)
    length = 0
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), (head, event)
        length += len(event.data)
    assert length == ours.body_length
    assert conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}  # kept alive


_OUT_FIELDS = st.lists(
    st.tuples(
        st.sampled_from([b"Host", b"host", b"Content-Length", b"Connection", b"X", b"X Y", b""]),
        st.binary(max_size=6) | st.sampled_from([b"0", b"3", b"close", b" x", b"x ", b"a b"]),
    ),
    max_size=4,
)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([b"GET", b"G T", b"", b"POST"]),
    st.sampled_from([b"/", b"/a b", b""]),
    _OUT_FIELDS,
)
def test_request_bytes_writes_what_h11_writes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    ours = request_bytes(method, target, headers)
    if ours is None:
        return
    conn = h11.Connection(h11.CLIENT)
    assert conn.send(h11.Request(method=method, target=target, headers=headers)) == ours


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([b"GET", b"HEAD"]),
    st.sampled_from([200, 204, 304, 404, 999, 1000, 100]),
    st.sampled_from([b"", b"OK", b"a\tb", b"\xe9", b" x", b"\x01"]),
    _OUT_FIELDS,
)
def test_response_bytes_writes_what_h11_writes(
    method: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    ours = response_bytes(status, reason, headers)
    if ours is None:
        return
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    response = h11.Response(status_code=status, reason=reason, headers=headers)
    assert conn.send(response) == ours


def test_head_end_finds_an_empty_line_split_across_reads() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"
    for cut in range(len(data)):
        buffer = bytearray(data[:cut])
        end = head_end(buffer)
        buffer += data[cut:]
        if end == -1:
            end = head_end(buffer, max(0, cut - 3))
        assert end == data.index(b"\r\n\r\n") + 4
