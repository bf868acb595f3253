"""Slowloris on every front door: a client that trickles a valid prefix one byte at a time, and
one that connects and sends nothing, are both cut off after the front door's configured timeout
(short here), while other clients are served in the meantime.

One gateway with every front door (HTTP proxy, SOCKS5, a port forward, the RFC front door, the
RFC JSON endpoint, and the tunnel endpoint itself) and one connector, in process, on 127.0.0.1.
The slow clients sleep between their bytes because being slow is the behaviour under test; no
test waits on a timer to synchronise, and none asserts how long anything took.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from python_socks import ProxyError

from backchannel import (
    ConfigError,
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    open_connector,
    open_gateway,
)
from backchannel._transport import client_ssl_context
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._stub_server import serve_stub
from tests.harness import (
    APP_SECRET,
    connector_document,
    echo_server,
    gateway_document,
    receive_exactly,
    socks_connect,
    tls_material,
)
from tests.rfc_harness import LOGON, VIRTUAL_HOST, in_thread

#: The configured timeout of every front door under test (seconds).
TIMEOUT = 2.0
#: Pause between the bytes of a trickling client.
TICK = 0.05
#: A generous bound on how long a cut-off may take: a front door that never cuts fails here.
GIVE_UP = 20
APP_BASIC = "Basic " + base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()


# --------------------------------------------------------------------------- the set-up


async def serve_http_backend(stream: trio.SocketStream) -> None:
    """A tiny HTTP/1.1 backend: 200 ``ok`` to every request."""
    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.EndOfMessage):
                    head = h11.Response(status_code=200, headers=[("Content-Length", "2")])
                    data = (conn.send(head) or b"") + (conn.send(h11.Data(data=b"ok")) or b"")
                    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        pass


@dataclass
class Doors:
    gateway: Gateway
    connector: Connector
    tunnel: HostPort
    ca_file: Path

    def address(self, name: str) -> HostPort:
        for key, addresses in self.gateway.front_door_addresses.items():
            if key == name or (name == "tcp.forward" and key.startswith("tcp.forward")):
                return addresses[0]
        raise KeyError(name)


@asynccontextmanager
async def every_front_door(
    tmp_path: Path,
    tcp_extra: dict[str, Any] | None = None,
    web_extra: dict[str, Any] | None = None,
    rfc_extra: dict[str, Any] | None = None,
    http_extra: dict[str, Any] | None = None,
) -> AsyncIterator[Doors]:
    tls = tls_material(tmp_path / "tls")
    async with trio.open_nursery() as nursery, echo_server() as echo_port:
        [http_listener] = await nursery.start(
            partial(trio.serve_tcp, serve_http_backend, 0, host="127.0.0.1")
        )
        http_port = http_listener.socket.getsockname()[1]
        stub_port = await nursery.start(serve_stub, demo_system(), "127.0.0.1", 0)
        forward = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": "echo.virtual:7"}
        document = gateway_document(
            tls,
            tmp_path / "gateway.jsonl",
            forwards=[forward],
            tunnel={"handshake_timeout": TIMEOUT},
        )
        document["plugins"]["tcp"].update(handshake_timeout=TIMEOUT, **(tcp_extra or {}))
        document["plugins"]["http"] = {
            "proxy_listen": "127.0.0.1:0",
            "header_timeout": TIMEOUT,
            **(http_extra or {}),
        }
        document["plugins"]["rfc"] = {
            "listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "handshake_timeout": TIMEOUT,
            "http_request_timeout": TIMEOUT,
            **(rfc_extra or {}),
            "destinations": [
                {
                    "name": "ERP",
                    "subaccount": "acme",
                    "ashost": VIRTUAL_HOST,
                    "sysnr": "00",
                    "client": "100",
                    "authentication": "BasicAuthentication",
                    "user": LOGON["user"],
                    "password": LOGON["passwd"],
                }
            ],
        }
        async with open_gateway(GatewayConfig.from_mapping(document, source="gw.toml")) as gateway:
            assert gateway.tunnel_address is not None
            mappings: list[dict[str, Any]] = [
                {
                    "virtual": "echo.virtual:7",
                    "internal": f"127.0.0.1:{echo_port}",
                    "protocol": "tcp",
                },
                {
                    "virtual": "web.virtual:80",
                    "internal": f"127.0.0.1:{http_port}",
                    "protocol": "http",
                    "resources": [{"path": "/"}],
                    **(web_extra or {}),
                },
                {
                    "protocol": "rfc",
                    "virtual": f"{VIRTUAL_HOST}:3300",
                    "internal": f"127.0.0.1:{stub_port}",
                    "functions": [{"name": "STFC_CONNECTION"}],
                },
            ]
            connector = connector_document(
                tls, gateway.tunnel_address.port, tmp_path / "connector.jsonl", mappings
            )
            connector["plugins"] = {"rfc": {"backend": "stub"}}
            config = ConnectorConfig.from_mapping(connector, source="connector.toml")
            async with open_connector(config) as running:
                with trio.fail_after(10):
                    await running.wait_connected()
                yield Doors(gateway, running, gateway.tunnel_address, tls.ca_file)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- slow clients


@dataclass
class SlowClient:
    """How a slow client's connection ended: ``answer`` is all it received."""

    answer: bytes = b""
    ended: str = ""
    bytes_sent: int = 0


async def slow_client(
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    trickle: bytes,
    result: SlowClient,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect, then send ``trickle`` one byte per TICK (nothing if empty) until the front door
    closes the connection; record what came back."""
    stream = await connect()
    task_status.started()
    async with stream, trio.open_nursery() as nursery:

        async def dribble() -> None:
            try:
                for index in range(len(trickle)):
                    await stream.send_all(trickle[index : index + 1])
                    result.bytes_sent += 1
                    await trio.sleep(TICK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.sleep_forever()  # keep the connection: closing is the front door's job

        nursery.start_soon(dribble)
        try:
            while data := await stream.receive_some(65536):
                result.answer += data
            result.ended = "eof"
        except trio.BrokenResourceError:
            result.ended = "reset"
        nursery.cancel_scope.cancel()


def tcp_to(address: HostPort) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(address.host, address.port)

    return connect


async def cut_off_while_others_are_served(
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    trickle: bytes,
    serve_another: Callable[[], Awaitable[None]],
) -> tuple[SlowClient, SlowClient]:
    """A silent and a trickling client; another client is served while both hang on; then both
    must be cut off. Returns (silent, trickling)."""
    silent, trickling = SlowClient(), SlowClient()
    with trio.fail_after(GIVE_UP):
        async with trio.open_nursery() as nursery:
            await nursery.start(slow_client, connect, b"", silent)
            await nursery.start(slow_client, connect, trickle, trickling)
            await serve_another()
    assert silent.ended
    assert trickling.ended
    assert trickling.bytes_sent < len(trickle), "the trickle ran out before the cut-off"
    return silent, trickling


class LogText(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_text() -> Iterator[LogText]:
    handler = LogText()
    logger = logging.getLogger("backchannel")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def said(log: LogText, text: str) -> int:
    return sum(text in line for line in log.lines)


# --------------------------------------------------------------------------- the front doors


async def test_http_proxy(tmp_path: Path, log_text: LogText) -> None:
    async with every_front_door(tmp_path) as doors:
        proxy = doors.address("http.proxy")

        async def get() -> None:
            request = (
                f"GET http://web.virtual/ HTTP/1.1\r\nHost: web.virtual\r\n"
                f"Proxy-Authorization: {APP_BASIC}\r\nConnection: close\r\n\r\n"
            )
            answer = await exchange(proxy, request.encode())
            assert answer.startswith(b"HTTP/1.1 200 "), answer

        trickle = b"GET http://web.virtual/ HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        silent, trickling = await cut_off_while_others_are_served(tcp_to(proxy), trickle, get)
    assert silent.answer == b""
    assert trickling.answer.startswith(b"HTTP/1.1 408 "), trickling.answer
    assert said(log_text, "no request head within") >= 2


async def test_http_proxy_stalled_body_gets_504_after_backend_timeout(tmp_path: Path) -> None:
    """A head, then silence: the connector's backend_timeout ends the exchange."""
    result = SlowClient()
    async with every_front_door(tmp_path, web_extra={"backend_timeout": TIMEOUT}) as doors:
        proxy = doors.address("http.proxy")
        head = (
            f"POST http://web.virtual/ HTTP/1.1\r\nHost: web.virtual\r\n"
            f"Proxy-Authorization: {APP_BASIC}\r\nContent-Length: 100000\r\n\r\n"
        ).encode()

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            await stream.send_all(head)
            return stream

        with trio.fail_after(GIVE_UP):
            await slow_client(connect, b"", result)
    assert result.answer.startswith(b"HTTP/1.1 504 "), result.answer


def test_http_proxy_slow_body_is_cut_off(tmp_path: Path) -> None:
    trio.run(http_proxy_slow_body, tmp_path)


async def http_proxy_slow_body(tmp_path: Path) -> None:
    result = SlowClient()
    async with every_front_door(
        tmp_path, web_extra={"backend_timeout": TIMEOUT}, http_extra={"body_timeout": TIMEOUT}
    ) as doors:
        proxy = doors.address("http.proxy")
        head = (
            f"POST http://web.virtual/ HTTP/1.1\r\nHost: web.virtual\r\n"
            f"Proxy-Authorization: {APP_BASIC}\r\nContent-Length: 100000\r\n\r\n"
        ).encode()

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            await stream.send_all(head)
            return stream

        # Hang detection only: well past both configured timeouts.
        with trio.move_on_after(5 * TIMEOUT) as scope:
            await slow_client(connect, b"a" * 100_000, result)
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"still open after {result.bytes_sent} body bytes")
    assert result.answer.startswith(b"HTTP/1.1 408 "), result.answer


async def test_socks5(tmp_path: Path, log_text: LogText) -> None:
    async with every_front_door(tmp_path) as doors:
        socks = doors.address("tcp.socks5")

        async def echo() -> None:
            stream = await socks_connect(socks, "echo.virtual", 7)
            async with stream:
                await stream.send_all(b"served")
                assert await receive_exactly(stream, 6) == b"served"

        # A greeting offering 255 methods: valid, and long enough to outlast the timeout.
        trickle = b"\x05\xff" + b"\x02" * 255
        silent, trickling = await cut_off_while_others_are_served(tcp_to(socks), trickle, echo)
    assert silent.answer == trickling.answer == b""
    assert said(log_text, "no complete handshake within") >= 2


def test_port_forward_idle_client_is_cut_off_after_idle_timeout(tmp_path: Path) -> None:
    # Run by hand (not as a trio test), so the failure leaves trio.run as itself rather than
    # wrapped in the test runner's ExceptionGroup, and xfail's ``raises`` can check it.
    trio.run(port_forward_idle_client, tmp_path)


async def port_forward_idle_client(tmp_path: Path) -> None:
    async with (
        unwrapped(),
        every_front_door(tmp_path, tcp_extra={"idle_timeout": TIMEOUT}) as doors,
    ):
        forward = doors.address("tcp.forward")

        async def echo() -> None:
            stream = await trio.open_tcp_stream(forward.host, forward.port)
            async with stream:
                await stream.send_all(b"served")
                assert await receive_exactly(stream, 6) == b"served"

        # Only a silent client: trickled bytes are traffic, and keep a connection from idling.
        silent = SlowClient()
        with trio.fail_after(GIVE_UP):
            async with trio.open_nursery() as nursery:
                await nursery.start(slow_client, tcp_to(forward), b"", silent)
                await echo()
        assert silent.ended
        assert silent.answer == b""


async def echoed_through(socks: HostPort) -> bool:
    """Whether a SOCKS5 client gets a byte echoed (False: refused or cut, in any way)."""
    try:
        stream = await socks_connect(socks, "echo.virtual", 7)
        async with stream:
            await stream.send_all(b"x")
            return await stream.receive_some(1) == b"x"
    except (ProxyError, OSError, trio.BrokenResourceError):
        return False


@asynccontextmanager
async def unwrapped() -> AsyncIterator[None]:
    """Re-raise the first ConfigError, TooSlowError or AssertionError out of nursery groups, so
    that an xfail test run with ``trio.run`` can name the failure it expects."""
    failure: Exception | None = None
    try:
        yield
    except* (ConfigError, trio.TooSlowError, AssertionError) as group:
        failure = first_leaf(group)
    if failure is not None:
        raise failure


def test_rfc_json_endpoint_idle_keep_alive_timeout_is_configurable(tmp_path: Path) -> None:
    trio.run(rfc_json_idle_keep_alive, tmp_path)


async def rfc_json_idle_keep_alive(tmp_path: Path) -> None:
    extra = {"http_idle_timeout": TIMEOUT}
    async with unwrapped(), every_front_door(tmp_path, rfc_extra=extra) as doors:
        endpoint = doors.address("rfc.json")
        body = json.dumps({"REQUTEXT": "x"}).encode()
        request = (
            f"POST /rfc/ERP/STFC_CONNECTION HTTP/1.1\r\nHost: gw\r\nAuthorization: {APP_BASIC}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            await stream.send_all(request + body)
            return stream

        kept = SlowClient()
        with trio.fail_after(GIVE_UP):
            await slow_client(connect, b"", kept)
        assert kept.answer.startswith(b"HTTP/1.1 200 ")


def test_socks5_front_door_limits_its_connections(tmp_path: Path) -> None:
    trio.run(socks5_connection_limit, tmp_path)


async def socks5_connection_limit(tmp_path: Path) -> None:
    async with unwrapped(), every_front_door(tmp_path, tcp_extra={"max_connections": 2}) as doors:
        socks = doors.address("tcp.socks5")
        with trio.fail_after(GIVE_UP):
            held = [await socks_connect(socks, "echo.virtual", 7) for _ in range(2)]
            # A third connection is closed before anything is read from it.
            refused = await trio.open_tcp_stream(socks.host, socks.port)
            async with refused:
                assert await refused.receive_some(1) == b""
            await held.pop().aclose()
            await trio.testing.wait_all_tasks_blocked()  # the gateway saw that one go
            again = await socks_connect(socks, "echo.virtual", 7)
            for stream in [*held, again]:
                await stream.aclose()


async def test_rfc_front_door(tmp_path: Path, log_text: LogText) -> None:
    async with every_front_door(tmp_path) as doors:
        door = doors.address("rfc.pyrfc")

        async def call() -> None:
            def run() -> str:
                params = {"gateway": str(door), "app": "acme/crm", "app_secret": APP_SECRET}
                with Connection(None, dest="ERP", **params) as connection:
                    text: str = connection.call("STFC_CONNECTION", REQUTEXT="served")["ECHOTEXT"]
                    return text

            assert await in_thread(run) == "served"

        # A length prefix announcing 4 KiB of logon, then the JSON trickling in.
        trickle = (4096).to_bytes(4, "big") + b'{"a": "' + b"a" * 10_000
        silent, trickling = await cut_off_while_others_are_served(tcp_to(door), trickle, call)
    assert silent.answer == trickling.answer == b""
    assert said(log_text, "sent no logon within") >= 2


async def test_rfc_json_endpoint(tmp_path: Path) -> None:
    async with every_front_door(tmp_path) as doors:
        endpoint = doors.address("rfc.json")

        async def post() -> None:
            body = json.dumps({"REQUTEXT": "served"}).encode()
            request = (
                f"POST /rfc/ERP/STFC_CONNECTION HTTP/1.1\r\nHost: gw\r\n"
                f"Authorization: {APP_BASIC}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            answer = await exchange(endpoint, request + body)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert b'"ECHOTEXT":"served"' in answer.replace(b" ", b"")

        trickle = b"POST /rfc/ERP/STFC_CONNECTION HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        silent, trickling = await cut_off_while_others_are_served(tcp_to(endpoint), trickle, post)
    assert silent.answer == b""
    assert trickling.answer.startswith(b"HTTP/1.1 408 "), trickling.answer


async def test_rfc_json_endpoint_slow_body(tmp_path: Path) -> None:
    """The JSON endpoint's request_timeout covers the body too: a trickled body gets 408."""
    async with every_front_door(tmp_path) as doors:
        endpoint = doors.address("rfc.json")
        head = (
            f"POST /rfc/ERP/STFC_CONNECTION HTTP/1.1\r\nHost: gw\r\nAuthorization: {APP_BASIC}\r\n"
            "Content-Type: application/json\r\nContent-Length: 20000\r\n\r\n"
        ).encode()

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            await stream.send_all(head)
            return stream

        result = SlowClient()
        with trio.fail_after(GIVE_UP):
            await slow_client(connect, b'{"REQUTEXT": "' + b"a" * 10_000, result)
    assert result.answer.startswith(b"HTTP/1.1 408 "), result.answer


async def test_tunnel_endpoint_handshake(tmp_path: Path, log_text: LogText) -> None:
    """Silent TCP, and TLS completed but the WebSocket upgrade trickled: both are dropped after
    the tunnel's handshake_timeout, while the connector (dropped on purpose) gets back in."""
    async with every_front_door(tmp_path) as doors:

        async def tls_connect() -> trio.abc.Stream:
            tcp = await trio.open_tcp_stream(doors.tunnel.host, doors.tunnel.port)
            tls = trio.SSLStream(
                tcp, client_ssl_context(doors.ca_file), server_hostname="localhost"
            )
            await tls.do_handshake()
            return tls

        async def reconnect() -> None:
            tunnel = doors.connector.status["acme"].tunnel
            assert tunnel is not None
            tunnel.abort("dropped by the test")
            await doors.connector.wait_disconnected()
            await doors.connector.wait_connected()
            assert doors.connector.status["acme"].connects == 2
            stream = await socks_connect(doors.address("tcp.socks5"), "echo.virtual", 7)
            async with stream:
                await stream.send_all(b"served")
                assert await receive_exactly(stream, 6) == b"served"

        trickle = b"GET /tunnel HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 10_000
        silent = SlowClient()
        with trio.fail_after(GIVE_UP):
            async with trio.open_nursery() as nursery:
                await nursery.start(slow_client, tcp_to(doors.tunnel), b"", silent)
                _, trickling = await cut_off_while_others_are_served(
                    tls_connect, trickle, reconnect
                )
    assert silent.ended
    assert trickling.ended
    assert said(log_text, "did not complete the handshake within") >= 3


# --------------------------------------------------------------------------- helpers


def first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first exception inside (nested) exception groups."""
    inner = group.exceptions[0]
    return first_leaf(inner) if isinstance(inner, BaseExceptionGroup) else inner


async def exchange(address: HostPort, data: bytes) -> bytes:
    """Send a whole request, read until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(address.host, address.port)
        async with stream:
            await stream.send_all(data)
            answer = bytearray()
            while chunk := await stream.receive_some(65536):
                answer += chunk
            return bytes(answer)
