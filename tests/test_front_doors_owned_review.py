"""Review of f8d398e: the HTTP front doors (proxy and destinations), the RFC front door and the
RFC JSON endpoint accept with ``serve_connections`` and check ``max_connections`` with
``ConnectionLimit.try_admit`` / ``release`` in their handler, which owns the accepted socket
and must close it on every path (tests/test_serve_review.py did the same for the TCP doors).

Each door is started by its own ``serve`` on 127.0.0.1 port 0, with the ``serve_connections``
of its module swapped for one that wraps the door's listeners in test_serve_review's
RecordingListener (and the HTTP door's ConnectionLimit for one the test can see): every test
checks the gateway side of each connection directly (closed: ``fileno() == -1``) and the door's
count (given back: ``active == 0``). Clients are raw sockets, h11 and the stub protocol by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import pytest
import trio
import trio.testing

from backchannel import (
    AppIdentity,
    ConnectionLimit,
    HostPort,
    TunnelStream,
    close_forcefully,
    serve_connections,
)
from backchannel._serve import OwningHandler
from backchannel_http import _front_door as http_front_door
from backchannel_http._front_door import HttpDestinationsFrontDoor, HttpProxyFrontDoor
from backchannel_http._relay import HttpLimits
from backchannel_rfc import _front_door as rfc_front_door
from backchannel_rfc import _json_endpoint as json_endpoint
from backchannel_rfc._destinations import RfcDestinations
from backchannel_rfc._front_door import RfcFrontDoor
from backchannel_rfc._json_endpoint import RfcJsonEndpoint
from backchannel_rfc._stub_protocol import MessageDecoder, encode_message
from tests.rfc_harness import LOGON
from tests.test_fault_leaks import assert_back_to, baseline
from tests.test_http_front_door import AUTH, CONNECTED, RESET_SIZE, Seen
from tests.test_http_front_door import Client as HttpClient
from tests.test_http_front_door import FakeServices as HttpFakeServices
from tests.test_http_front_door import fake_connector as http_connector
from tests.test_rfc_json_endpoint import BASIC, DESTINATIONS, Connector, make_system
from tests.test_rfc_json_endpoint import FakeServices as JsonFakeServices
from tests.test_rfc_json_endpoint import fake_connector as json_connector
from tests.test_serve_review import (
    BOOM,
    ECHO,
    HANG,
    REFUSE,
    RecordingListener,
    Services,
    echo_pair,
    read_to_end,
    receive_exactly,
    recording_listener,
    reset,
)
from tests.tunnel_pair import TunnelPair, tunnel_pair

LISTEN = HostPort("127.0.0.1", 0)

# --------------------------------------------------------------------------- instrumentation


@dataclass
class Served:
    """One door's accept loop as serve_connections was asked to run it."""

    listener: RecordingListener
    handler: OwningHandler


class Recorder:
    """Stands in for ``serve_connections`` in the doors' modules: the same function, on
    recording listeners, remembered by task name."""

    def __init__(self) -> None:
        self.served: dict[str, Served] = {}
        self.limits: dict[str, ConnectionLimit] = {}

    async def serve_connections(
        self,
        handler: OwningHandler,
        listeners: Sequence[trio.SocketListener],
        *,
        task_name: str,
        task_status: trio.TaskStatus[Sequence[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        (recording,) = [RecordingListener(listener) for listener in listeners]  # 127.0.0.1
        self.served[task_name] = Served(recording, handler)
        await serve_connections(
            handler, [recording.as_socket_listener()], task_name=task_name, task_status=task_status
        )


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    for module in (http_front_door, rfc_front_door, json_endpoint):
        monkeypatch.setattr(module, "serve_connections", recorder.serve_connections)

    class RecordingLimit(ConnectionLimit):
        def __init__(self, limit: int, label: str) -> None:
            super().__init__(limit, label)
            recorder.limits[label] = self

    monkeypatch.setattr(http_front_door, "ConnectionLimit", RecordingLimit)
    return recorder


async def settle() -> None:
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()


@dataclass
class Door:
    """A door being served: the listener it accepts on, its count, its handler."""

    name: str
    listener: RecordingListener
    limit: ConnectionLimit
    handler: OwningHandler

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.listener.port)

    async def assert_all_closed(self) -> None:
        """Every connection the door accepted is closed and its place given back."""
        await settle()
        assert self.listener.open_streams() == []
        assert self.limit.active == 0


AnyDoor = HttpProxyFrontDoor | HttpDestinationsFrontDoor | RfcFrontDoor | RfcJsonEndpoint


async def start(nursery: trio.Nursery, recorder: Recorder, door: AnyDoor) -> Door:
    """``door.serve`` in ``nursery``, as the gateway starts it."""
    [bound] = await nursery.start(door.serve)
    if isinstance(door, HttpProxyFrontDoor | HttpDestinationsFrontDoor):
        name = door._label
        limit = recorder.limits[name]
    else:
        name = door.name
        limit = door.connections
    served = recorder.served[name]
    assert served.listener.port == bound.port
    return Door(name, served.listener, limit, served.handler)


# --------------------------------------------------------------------------- the doors' set-ups


class HttpServices(HttpFakeServices):
    """The HTTP tests' services, plus hang.virtual (open_stream never answers) and
    boom.virtual (open_stream fails unexpectedly)."""

    def __init__(self, pair: TunnelPair) -> None:
        super().__init__(pair, set(CONNECTED))
        self.opening = 0

    async def open_stream(
        self,
        app: AppIdentity,
        *,
        protocol: str,
        target: HostPort,
        location: str = "",
        principal: str | None = None,
        attributes: Any = None,
        wait_accepted: bool = True,
        first_data: bytes = b"",
    ) -> TunnelStream:
        self.opening += 1
        try:
            if target.host == HANG:
                await trio.sleep_forever()
            if target.host == BOOM:
                raise RuntimeError("boom")
            return await super().open_stream(
                app,
                protocol=protocol,
                target=target,
                location=location,
                principal=principal,
                attributes=attributes,
                wait_accepted=wait_accepted,
                first_data=first_data,
            )
        finally:
            self.opening -= 1


@dataclass
class HttpEnv:
    services: HttpServices
    seen: Seen
    nursery: trio.Nursery


@asynccontextmanager
async def http_env() -> AsyncIterator[HttpEnv]:
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        seen = Seen()
        nursery.start_soon(http_connector, pair, seen)
        yield HttpEnv(HttpServices(pair), seen, nursery)
        nursery.cancel_scope.cancel()


def proxy(env: HttpEnv, **limits: Any) -> HttpProxyFrontDoor:
    return HttpProxyFrontDoor(cast(Any, env.services), LISTEN, HttpLimits(**limits))


def get(host: str, path: str = "/", *, auth: bool = True) -> bytes:
    credentials = f"Proxy-Authorization: {AUTH}\r\n" if auth else ""
    return f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{credentials}\r\n".encode()


def post_head(host: str, length: int) -> bytes:
    return (
        f"POST http://{host}/upload HTTP/1.1\r\nHost: {host}\r\n"
        f"Proxy-Authorization: {AUTH}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


WEBSOCKET = (
    b"GET http://erp.virtual/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nProxy-Authorization: " + AUTH.encode() + b"\r\n\r\n"
)


async def read_until(client: trio.SocketStream, end: bytes) -> bytes:
    """What the client receives until ``end`` came (and whatever came with it)."""
    data = bytearray()
    while end not in data:
        chunk = await client.receive_some(65536)
        assert chunk, f"EOF after {bytes(data)!r}"
        data += chunk
    return bytes(data)


async def upgraded(client: trio.SocketStream) -> None:
    """A websocket upgrade through the proxy, then one spliced round trip."""
    await client.send_all(WEBSOCKET)
    assert (await read_until(client, b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    await client.send_all(b"ping")
    assert await receive_exactly(client, 4) == b"PING"


async def relayed(client: trio.SocketStream) -> HttpClient:
    """One request relayed through the tunnel and answered; the connection kept alive (with
    its tunnel leg)."""
    http = HttpClient(client)
    response, _ = await http.request("GET", "http://erp.virtual/x", [("Proxy-Authorization", AUTH)])
    assert response.status_code == 200
    return http


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def rfc_door(services: Services, **kwargs: Any) -> RfcFrontDoor:
    kwargs.setdefault("handshake_timeout", 30)
    return RfcFrontDoor(cast(Any, services), LISTEN, RfcDestinations(), **kwargs)


def rfc_logon(host: str = ECHO, **route: str) -> dict[str, Any]:
    full = {"app": "acme/crm", "app_secret": "secret", "ashost": host, "sysnr": "00", **route}
    return {"op": "logon", **LOGON, "route": full}


@dataclass
class RfcClient:
    """The stub protocol by hand."""

    stream: trio.SocketStream
    decoder: MessageDecoder = field(default_factory=MessageDecoder)

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(encode_message(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the connection ends."""
        while (message := self.decoder.next_message()) is None:
            if self.decoder.at_eof:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.decoder.receive_data(data)
        return message


@dataclass
class JsonEnv:
    services: JsonFakeServices


@asynccontextmanager
async def json_env() -> AsyncIterator[JsonEnv]:
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        services = JsonFakeServices(pair)
        nursery.start_soon(json_connector, pair, make_system(), Connector())
        yield JsonEnv(services)
        nursery.cancel_scope.cancel()


def json_door(env: JsonEnv, **settings: Any) -> RfcJsonEndpoint:
    return RfcJsonEndpoint(cast(Any, env.services), LISTEN, DESTINATIONS, **settings)


def json_post(path: str, body: bytes, *, auth: bool = True, length: int | None = None) -> bytes:
    credentials = f"Authorization: {BASIC}\r\n" if auth else ""
    size = len(body) if length is None else length
    return (
        f"POST {path} HTTP/1.1\r\nHost: g\r\n{credentials}Content-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode() + body


PING = json_post("/rfc/ERP/RFC_PING", b"{}")
HANGING_CALL = json_post("/rfc/ERP/STFC_CONNECTION", json.dumps({"REQUTEXT": "hang"}).encode())


async def json_response(client: trio.SocketStream) -> tuple[int, bytes]:
    """One response (Content-Length framed, as the endpoint writes them)."""
    head, _, body = (await read_until(client, b"\r\n\r\n")).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    if len(body) < length:
        body += await receive_exactly(client, length - len(body))
    assert len(body) == length
    return status_of(head), body


Steps = Callable[[trio.SocketStream], Awaitable[None]]


async def run_scenarios(door: Door, scenarios: Sequence[Steps]) -> None:
    """Each scenario on a connection of its own; after each, everything is closed and given
    back."""
    for steps in scenarios:
        client = await door.connect()
        try:
            await steps(client)
        finally:
            await close_forcefully(client)
        await door.assert_all_closed()
    assert door.limit.refused == 0
    assert len(door.listener.accepted) == len(scenarios)


# --------------------------------------------------------------------------- every path closes


async def test_every_http_path_closes_the_client_and_gives_its_place_back(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Heads cut short (EOF, reset), malformed, refused (407, 502), an unexpected failure, a
    relayed exchange ended by close or reset, a body cut by a reset, a response cut by the
    backend, a websocket splice ended by EOF or reset: closed, place given back."""
    with trio.fail_after(20):
        async with http_env() as env:
            door = await start(env.nursery, recorder, proxy(env))

            async def eof_at_once(client: trio.SocketStream) -> None:
                await client.send_eof()
                assert await read_to_end(client) == b""

            async def eof_in_head(client: trio.SocketStream) -> None:
                await client.send_all(get("erp.virtual")[:20])
                await client.send_eof()
                assert await read_to_end(client) == b""

            async def reset_in_head(client: trio.SocketStream) -> None:
                await client.send_all(get("erp.virtual")[:20])
                await settle()
                reset(client)

            async def malformed(client: trio.SocketStream) -> None:
                await client.send_all(b"GET http://x/ HTTP/1.1\r\nno colon here\r\n\r\n")
                assert status_of(await read_to_end(client)) == 400

            async def no_credentials(client: trio.SocketStream) -> None:
                await client.send_all(get("erp.virtual", auth=False))
                assert status_of(await read_until(client, b"\r\n\r\n")) == 407

            async def backend_down(client: trio.SocketStream) -> None:
                await client.send_all(get("down.virtual"))
                assert status_of(await read_until(client, b"\r\n\r\n")) == 502

            async def unexpected_failure(client: trio.SocketStream) -> None:
                await client.send_all(get(BOOM))
                assert await read_to_end(client) == b""

            async def relayed_then_closed(client: trio.SocketStream) -> None:
                await relayed(client)

            async def relayed_then_reset(client: trio.SocketStream) -> None:
                await relayed(client)
                reset(client)

            async def reset_mid_body(client: trio.SocketStream) -> None:
                await client.send_all(post_head("erp.virtual", 1000) + b"x" * 10)
                await settle()
                reset(client)

            async def response_cut_off(client: trio.SocketStream) -> None:
                await client.send_all(get("erp.virtual", f"/reset/{RESET_SIZE}"))
                assert (await read_to_end(client)).startswith(b"HTTP/1.1 200 ")

            async def spliced_then_eof(client: trio.SocketStream) -> None:
                await upgraded(client)
                await client.send_eof()
                assert await read_to_end(client) == b""

            async def spliced_then_reset(client: trio.SocketStream) -> None:
                await upgraded(client)
                reset(client)

            await run_scenarios(
                door,
                [
                    eof_at_once,
                    eof_in_head,
                    reset_in_head,
                    malformed,
                    no_credentials,
                    backend_down,
                    unexpected_failure,
                    relayed_then_closed,
                    relayed_then_reset,
                    reset_mid_body,
                    response_cut_off,
                    spliced_then_eof,
                    spliced_then_reset,
                ],
            )
            assert env.services.opening == 0
    [failure] = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    assert failure.levelno == logging.ERROR  # logged with its traceback, as before
    assert failure.getMessage().startswith("http proxy 127.0.0.1:")


async def test_every_rfc_path_closes_the_client_and_gives_its_place_back(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20):
        async with echo_pair() as pair, trio.open_nursery() as nursery:
            door = await start(nursery, recorder, rfc_door(Services(pair)))

            async def eof_at_once(client: trio.SocketStream) -> None:
                await client.send_eof()
                assert await read_to_end(client) == b""

            async def not_the_stub_protocol(client: trio.SocketStream) -> None:
                await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await RfcClient(client).receive()
                assert answer is not None
                assert answer["ok"] is False

            async def reset_in_a_frame(client: trio.SocketStream) -> None:
                await client.send_all(encode_message(rfc_logon())[:10])
                await settle()
                reset(client)

            async def refused(client: trio.SocketStream, logon: dict[str, Any]) -> None:
                rfc = RfcClient(client)
                await rfc.send(logon)
                answer = await rfc.receive()
                assert answer is not None
                assert answer["ok"] is False
                assert await rfc.receive() is None

            async def no_route(client: trio.SocketStream) -> None:
                await refused(client, {"op": "logon", **LOGON})

            async def wrong_secret(client: trio.SocketStream) -> None:
                await refused(client, rfc_logon(app_secret="wrong"))

            async def backend_refused(client: trio.SocketStream) -> None:
                await refused(client, rfc_logon(REFUSE))

            async def not_connected(client: trio.SocketStream) -> None:
                await refused(client, rfc_logon(location_id="elsewhere"))

            async def unexpected_failure(client: trio.SocketStream) -> None:
                await RfcClient(client).send(rfc_logon(BOOM))
                assert await read_to_end(client) == b""

            async def spliced(client: trio.SocketStream) -> RfcClient:
                rfc = RfcClient(client)
                await rfc.send(rfc_logon())
                echoed = await rfc.receive()  # the logon as the connector got it
                assert echoed is not None
                assert echoed["op"] == "logon"
                assert "route" not in echoed
                await rfc.send({"op": "ping"})
                assert await rfc.receive() == {"op": "ping"}
                return rfc

            async def spliced_then_eof(client: trio.SocketStream) -> None:
                rfc = await spliced(client)
                await client.send_eof()
                assert await rfc.receive() is None

            async def spliced_then_reset(client: trio.SocketStream) -> None:
                await spliced(client)
                reset(client)

            await run_scenarios(
                door,
                [
                    eof_at_once,
                    not_the_stub_protocol,
                    reset_in_a_frame,
                    no_route,
                    wrong_secret,
                    backend_refused,
                    not_connected,
                    unexpected_failure,
                    spliced_then_eof,
                    spliced_then_reset,
                ],
            )
            nursery.cancel_scope.cancel()
    [failure] = [r for r in caplog.records if "connection failed" in r.getMessage()]
    assert failure.levelno == logging.ERROR
    assert failure.getMessage().startswith("RFC client 127.0.0.1:")


async def test_every_json_endpoint_path_closes_the_client_and_gives_its_place_back(
    recorder: Recorder,
) -> None:
    with trio.fail_after(20):
        async with json_env() as env, trio.open_nursery() as nursery:
            door = await start(nursery, recorder, json_door(env))

            async def eof_at_once(client: trio.SocketStream) -> None:
                await client.send_eof()
                assert await read_to_end(client) == b""

            async def eof_in_head(client: trio.SocketStream) -> None:
                await client.send_all(PING[:20])
                await client.send_eof()
                assert status_of(await read_to_end(client)) == 400  # h11: incomplete head

            async def reset_in_head(client: trio.SocketStream) -> None:
                await client.send_all(PING[:20])
                await settle()
                reset(client)

            async def malformed(client: trio.SocketStream) -> None:
                await client.send_all(b"POST /rfc HTTP/1.1\r\nno colon here\r\n\r\n")
                assert status_of(await read_to_end(client)) == 400

            async def no_credentials(client: trio.SocketStream) -> None:
                await client.send_all(json_post("/rfc/ERP/RFC_PING", b"{}", auth=False))
                assert (await json_response(client))[0] == 401

            async def called_then_closed(client: trio.SocketStream) -> None:
                await client.send_all(PING)
                assert (await json_response(client))[0] == 200

            async def called_twice_then_reset(client: trio.SocketStream) -> None:
                for _ in range(2):
                    await client.send_all(PING)
                    assert (await json_response(client))[0] == 200
                reset(client)

            async def reset_mid_body(client: trio.SocketStream) -> None:
                await client.send_all(json_post("/rfc/ERP/RFC_PING", b"{", length=100))
                await settle()
                reset(client)

            async def head_too_large(client: trio.SocketStream) -> None:
                # The endpoint answers 431 and closes with part of the head unread: the client
                # may see the reset before the answer.
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.send_all(b"POST /rfc HTTP/1.1\r\nX: " + b"a" * 200_000)
                answer = await read_to_end(client)
                assert answer == b"" or status_of(answer) == 431

            await run_scenarios(
                door,
                [
                    eof_at_once,
                    eof_in_head,
                    reset_in_head,
                    malformed,
                    no_credentials,
                    called_then_closed,
                    called_twice_then_reset,
                    reset_mid_body,
                    head_too_large,
                ],
            )
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- max_connections


async def check_refusals(door: Door, held: list[trio.SocketStream]) -> None:
    """``held`` fill the door (max_connections 2): 20 more are closed at once with nothing
    written (no 503, no error message: as with ``ConnectionLimit.wrap`` before), counted,
    and no place is lost."""
    await settle()
    assert door.limit.active == 2
    for _ in range(20):
        async with await door.connect() as refused:
            assert await read_to_end(refused) == b""
    await settle()
    assert door.limit.refused == 20
    assert door.limit.active == 2
    assert len(door.listener.open_streams()) == 2
    reset(held.pop())
    await settle()
    assert door.limit.active == 1


async def test_above_max_connections_every_door_closes_at_once_and_counts_exactly(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The HTTP proxy and destinations doors, the RFC door and the JSON endpoint with
    max_connections 2: refusals as before, the log line as before, a freed place serves."""
    with trio.fail_after(20):
        async with http_env() as env:
            limits = HttpLimits(max_connections=2)
            services = cast(Any, env.services)
            http_doors: list[tuple[AnyDoor, int]] = [
                (HttpProxyFrontDoor(services, LISTEN, limits), 407),  # asks for credentials
                (HttpDestinationsFrontDoor(services, LISTEN, [], limits), 404),  # no such one
            ]
            for door_object, status in http_doors:
                async with trio.open_nursery() as nursery:
                    door = await start(nursery, recorder, door_object)
                    held = [await door.connect() for _ in range(2)]
                    await held[0].send_all(get("erp.virtual", auth=False))
                    assert status_of(await read_until(held[0], b"\r\n\r\n")) == status
                    await check_refusals(door, held)
                    async with await door.connect() as again:  # the freed place serves
                        await again.send_all(get("erp.virtual", auth=False))
                        assert status_of(await read_until(again, b"\r\n\r\n")) == status
                    await close_forcefully(held[0])
                    await door.assert_all_closed()
                    nursery.cancel_scope.cancel()
        async with echo_pair() as pair, trio.open_nursery() as nursery:
            door = await start(nursery, recorder, rfc_door(Services(pair), max_connections=2))
            held = [await door.connect() for _ in range(2)]
            await check_refusals(door, held)
            async with await door.connect() as again:
                rfc = RfcClient(again)
                await rfc.send(rfc_logon())
                assert (await rfc.receive() or {}).get("op") == "logon"  # spliced: echoed
            await close_forcefully(held[0])
            await door.assert_all_closed()
            nursery.cancel_scope.cancel()
        async with json_env() as json_services, trio.open_nursery() as nursery:
            door = await start(nursery, recorder, json_door(json_services, max_connections=2))
            held = [await door.connect() for _ in range(2)]
            await check_refusals(door, held)
            async with await door.connect() as again:
                await again.send_all(PING)
                assert (await json_response(again))[0] == 200
            await close_forcefully(held[0])
            await door.assert_all_closed()
            nursery.cancel_scope.cancel()
    reports = {r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()}
    for label in ("http proxy", "http destinations", "rfc.pyrfc", "rfc.json"):
        assert f"{label}: 2 connections open (max_connections); refused new ones (1 so far)" in (
            reports
        )


# --------------------------------------------------------------------------- shutdown


async def shut_down(nursery: trio.Nursery, door: Door, waiting: int) -> None:
    """``waiting`` handlers wait; cancel the door as the gateway's shutdown does."""
    await settle()
    assert door.limit.active == waiting
    assert len(door.listener.open_streams()) == waiting
    nursery.cancel_scope.cancel()


async def assert_shut(door: Door, clients: list[trio.SocketStream]) -> None:
    assert door.listener.socket.fileno() == -1
    assert door.listener.open_streams() == []
    assert door.limit.active == 0
    for client in clients:
        assert await read_to_end(client) == b""  # EOF or reset: the gateway side is closed
        await client.aclose()


async def test_http_shutdown_closes_every_client_wherever_its_handler_waits(
    recorder: Recorder,
) -> None:
    """Cancelling the door (gateway shutdown) with handlers waiting for a head, in a half
    head, in open_stream, kept alive with a tunnel leg (the relay's own close is cut short
    when it drops its leg: the handler's finally closes), in a request body and in a splice."""
    with trio.fail_after(20):
        async with http_env() as env:
            clients: list[trio.SocketStream] = []
            async with trio.open_nursery() as nursery:
                door = await start(nursery, recorder, proxy(env))
                clients = [await door.connect() for _ in range(6)]
                _idle, half_head, opening, kept_alive, in_body, in_splice = clients
                await half_head.send_all(get("erp.virtual")[:20])
                await opening.send_all(get(HANG))
                await relayed(kept_alive)
                await in_body.send_all(post_head("erp.virtual", 1000) + b"x" * 10)
                await upgraded(in_splice)
                await shut_down(nursery, door, 6)
                assert env.services.opening == 1
            await assert_shut(door, clients)
            assert env.services.opening == 0
            for _ in range(3):
                await trio.testing.wait_all_tasks_blocked()
            assert all(ended.is_set() for ended in env.seen.ended)  # every leg dropped


async def test_rfc_shutdown_closes_every_client_wherever_its_handler_waits(
    recorder: Recorder,
) -> None:
    with trio.fail_after(20):
        async with echo_pair() as pair:
            services = Services(pair)
            clients: list[trio.SocketStream] = []
            async with trio.open_nursery() as nursery:
                door = await start(nursery, recorder, rfc_door(services))
                clients = [await door.connect() for _ in range(4)]
                _idle, half_frame, opening, in_splice = clients
                await half_frame.send_all(encode_message(rfc_logon())[:10])
                await RfcClient(opening).send(rfc_logon(HANG))
                rfc = RfcClient(in_splice)
                await rfc.send(rfc_logon())
                assert await rfc.receive() is not None
                await shut_down(nursery, door, 4)
                assert services.opening == 1
            await assert_shut(door, clients)
            assert services.opening == 0


async def test_json_endpoint_shutdown_closes_every_client_wherever_its_handler_waits(
    recorder: Recorder,
) -> None:
    with trio.fail_after(20):
        async with json_env() as env:
            clients: list[trio.SocketStream] = []
            async with trio.open_nursery() as nursery:
                door = await start(nursery, recorder, json_door(env))
                clients = [await door.connect() for _ in range(5)]
                _idle, half_head, kept_alive, in_body, in_call = clients
                await half_head.send_all(PING[:20])
                await kept_alive.send_all(PING)
                assert (await json_response(kept_alive))[0] == 200
                await in_body.send_all(json_post("/rfc/ERP/RFC_PING", b"{", length=100))
                await in_call.send_all(HANGING_CALL)
                await shut_down(nursery, door, 5)
            await assert_shut(door, clients)


# --------------------------------------------------------------------------- timeouts


async def test_http_header_and_body_timeouts_close_and_release(
    recorder: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    """Silent: closed after header_timeout, nothing written; half a head: 408 and closed; a
    body that does not come: 408 and closed. Nothing stays open, no place is kept."""
    with trio.fail_after(600):
        async with http_env() as env:
            door = await start(env.nursery, recorder, proxy(env, header_timeout=5, body_timeout=5))
            for _ in range(5):
                silent, half_head, no_body = [await door.connect() for _ in range(3)]
                await half_head.send_all(get("erp.virtual")[:20])
                await no_body.send_all(post_head("erp.virtual", 1000))
                start_time = trio.current_time()
                assert await read_to_end(silent) == b""
                assert status_of(await read_to_end(half_head)) == 408
                assert status_of(await read_to_end(no_body)) == 408
                assert trio.current_time() - start_time >= 5
                for client in (silent, half_head, no_body):
                    await client.aclose()
                await door.assert_all_closed()
            assert len(door.listener.accepted) == 15


async def test_rfc_handshake_timeout_closes_and_releases(
    recorder: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            door = await start(nursery, recorder, rfc_door(Services(), handshake_timeout=5))
            for _ in range(5):
                silent, half_frame = [await door.connect() for _ in range(2)]
                await half_frame.send_all(encode_message(rfc_logon())[:10])
                start_time = trio.current_time()
                for client in (silent, half_frame):
                    assert await read_to_end(client) == b""
                    await client.aclose()
                assert trio.current_time() - start_time >= 5
                await door.assert_all_closed()
            nursery.cancel_scope.cancel()


async def test_json_endpoint_request_and_idle_timeouts_close_and_release(
    recorder: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(600):
        async with json_env() as env, trio.open_nursery() as nursery:
            door = await start(
                nursery, recorder, json_door(env, request_timeout=5, idle_timeout=10)
            )
            for _ in range(3):
                silent, half_head, idle = [await door.connect() for _ in range(3)]
                await half_head.send_all(PING[:20])
                await idle.send_all(PING)
                assert (await json_response(idle))[0] == 200
                start_time = trio.current_time()
                assert await read_to_end(silent) == b""
                assert status_of(await read_to_end(half_head)) == 408
                assert await read_to_end(idle) == b""
                assert trio.current_time() - start_time >= 10
                for client in (silent, half_head, idle):
                    await client.aclose()
                await door.assert_all_closed()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- first step


@pytest.mark.parametrize("full", [False, True], ids=["admitted", "refused"])
@pytest.mark.parametrize("kind", ["http", "rfc", "json"])
async def test_a_handler_cancelled_before_its_first_step_closes_and_releases(
    recorder: Recorder, kind: str, full: bool
) -> None:
    """Shutdown between accept and the handler's first step: trio still runs the handler up
    to its first checkpoint, so its try/finally closes the socket; the count is exact."""
    with trio.fail_after(10):
        async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
            door_object: AnyDoor
            if kind == "http":
                door_object = proxy(HttpEnv(HttpServices(pair), Seen(), nursery), max_connections=1)
            elif kind == "rfc":
                door_object = rfc_door(Services(), max_connections=1)
            else:
                door_object = json_door(JsonEnv(JsonFakeServices(pair)), max_connections=1)
            door = await start(nursery, recorder, door_object)
            if full:
                assert door.limit.try_admit()
            listener = await recording_listener()
            async with listener, await trio.open_tcp_stream("127.0.0.1", listener.port) as client:
                stream = await listener.accept()
                async with trio.open_nursery() as handlers:
                    handlers.start_soon(door.handler, stream)
                    handlers.cancel_scope.cancel()
                    assert stream.socket.fileno() != -1  # not run yet
                assert stream.socket.fileno() == -1
                assert door.limit.active == (1 if full else 0)
                assert door.limit.refused == (1 if full else 0)
                assert await read_to_end(client) == b""
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- descriptors


async def test_many_refused_and_reset_connections_leave_no_descriptor_behind(
    recorder: Recorder,
) -> None:
    """On each door (max_connections 2): 40 refused, 20 reset mid-request or mid-relay, then a
    shutdown with both places taken: /proc/self/fd and the task tree are as before."""
    before = await baseline()
    with trio.fail_after(30):
        async with http_env() as env, echo_pair() as pair, json_env() as json_services:

            async def http_step(client: trio.SocketStream) -> None:
                await relayed(client)

            async def rfc_step(client: trio.SocketStream) -> None:
                rfc = RfcClient(client)
                await rfc.send(rfc_logon())
                assert await rfc.receive() is not None

            async def json_step(client: trio.SocketStream) -> None:
                await client.send_all(PING)
                assert (await json_response(client))[0] == 200

            doors: list[tuple[AnyDoor, Steps]] = [
                (proxy(env, max_connections=2), http_step),
                (rfc_door(Services(pair), max_connections=2), rfc_step),
                (json_door(json_services, max_connections=2), json_step),
            ]
            held: list[trio.SocketStream] = []
            async with trio.open_nursery() as nursery:
                for door_object, step in doors:
                    door = await start(nursery, recorder, door_object)
                    for _ in range(10):
                        clients = [await door.connect() for _ in range(2)]
                        for client in clients:
                            await step(client)
                        assert door.limit.active == 2
                        for _ in range(4):
                            async with await door.connect() as refused:
                                assert await read_to_end(refused) == b""
                        for client in clients:
                            reset(client)
                        await door.assert_all_closed()
                    assert door.limit.refused == 40
                    held += [await door.connect() for _ in range(2)]
                    await step(held[-1])
                await settle()
                nursery.cancel_scope.cancel()
            for client in held:
                assert await read_to_end(client) == b""
                await client.aclose()
    await assert_back_to(before)
