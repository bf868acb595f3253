"""Review of the tunnel's own TLS and WebSocket layers (_tlschannel, _wslink) over real sockets.

Every test runs over TLS on 127.0.0.1 (port 0), with a throwaway CA: our links against each
other, against raw frames a hostile peer writes, against wsproto's sans-IO connection and
against the ``websockets`` library's client and server (in a worker thread). Four of them
were written failing, each for a defect the review found (a WebSocket ping during a long send
broke the tunnel; tiny or empty fragments cost memory far beyond the message limit; aclose
from a second task raised BusyResourceError; a refused HTTP head left accept_tunnel waiting
for the handshake time-out); they pass since the fixes.
"""

from __future__ import annotations

import os
import ssl
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import websockets.sync.client
import websockets.sync.server
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws_events
from wsproto.frame_protocol import FrameProtocol, Opcode

from backchannel._pki import CertificateAuthority, TlsMaterial, write_throwaway_tls_material
from backchannel._proto._mux import Mux
from backchannel._tlschannel import TlsChannel
from backchannel._transport import (
    accept_tunnel,
    server_ssl_context,
    verifying_client_context,
)
from backchannel._tunnel import TunnelSettings
from backchannel._wslink import (
    CLOSE_ABNORMAL,
    HandshakeStream,
    WebSocketClosed,
    WebSocketLink,
    mask,
)

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]
GUARD = 20  # seconds: a fail_after guard against hangs, never a synchronisation


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class Pki:
    material: TlsMaterial
    client_ca: Path
    client_cert: Path
    client_key: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    material = write_throwaway_tls_material(tmp_path / "server")
    authority = CertificateAuthority.create("review connector CA", valid_days=2)
    client_ca, _ = authority.save(tmp_path / "client-ca")
    cert, key = authority.issue_client_certificate("connector-1", valid_days=2).save(
        tmp_path / "client", "connector"
    )
    return Pki(material, client_ca, cert, key)


def server_context(
    pki: Pki, version: ssl.TLSVersion | None = None, *, client_certs: bool = False
) -> ssl.SSLContext:
    context = server_ssl_context(pki.material.cert_file, pki.material.key_file)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if client_certs:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(pki.client_ca))
    return context


def client_context(
    pki: Pki, version: ssl.TLSVersion | None = None, *, certificate: bool = False
) -> ssl.SSLContext:
    context = verifying_client_context(pki.material.ca_file)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


# --------------------------------------------------------------------------- sockets and TLS


@asynccontextmanager
async def listener() -> AsyncIterator[tuple[trio.SocketListener, int]]:
    (listening,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        yield listening, listening.socket.getsockname()[1]
    finally:
        await listening.aclose()


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    async with listener() as (listening, port):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listening.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


@asynccontextmanager
async def tls_pair(
    pki: Pki,
    version: ssl.TLSVersion | None = None,
    *,
    tcp: tuple[trio.SocketStream, trio.SocketStream] | None = None,
) -> AsyncIterator[tuple[TlsChannel, TlsChannel]]:
    """Two TLS channels over one real TCP connection (``tcp``, else a new one), handshakes
    done."""
    client_tcp, server_tcp = tcp or await tcp_pair()
    client = TlsChannel(client_tcp, client_context(pki, version), server_hostname="localhost")
    server = TlsChannel(server_tcp, server_context(pki, version), server_side=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def upgrade_both(
    nursery: trio.Nursery, client_tls: TlsChannel, server_tls: TlsChannel
) -> tuple[WebSocketLink, WebSocketLink]:
    """The upgrade as _transport does it (trio-websocket over HandshakeStream), then our links."""
    client_hs = HandshakeStream(client_tls, client=True)
    server_hs = HandshakeStream(server_tls, client=False)

    async def server_side() -> None:
        request = await trio_websocket.wrap_server_stream(nursery, server_hs)
        await request.accept()

    async with trio.open_nursery() as both:
        both.start_soon(server_side)
        await trio_websocket.wrap_client_stream(
            nursery,
            client_hs,  # type: ignore[arg-type]  # any trio stream works
            "localhost",
            "/tunnel",
        )
    client = WebSocketLink(
        client_tls,
        client=True,
        max_message_size=1 << 24,
        buffered=client_hs.take_over(),
        on_close=client_hs.release,
    )
    server = WebSocketLink(
        server_tls,
        client=False,
        max_message_size=1 << 24,
        buffered=server_hs.take_over(),
        on_close=server_hs.release,
    )
    return client, server


# --------------------------------------------------------------------------- raw frames


def frame(opcode: int, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    """One frame as a (possibly hostile) peer writes it."""
    size = len(payload)
    if size <= 125:
        length = bytes([size])
    elif size <= 0xFFFF:
        length = bytes([126]) + struct.pack("!H", size)
    else:
        length = bytes([127]) + struct.pack("!Q", size)
    first = (0x80 if fin else 0) | opcode
    second = length[0] | (0x80 if masked else 0)
    if not masked:
        return bytes([first, second]) + length[1:] + payload
    key = os.urandom(4)
    return bytes([first, second]) + length[1:] + key + mask(payload, key)


class FrameReader:
    """Reads and decodes what our link sends, as its peer (wsproto's frame parser)."""

    def __init__(self, stream: trio.abc.ReceiveStream, *, link_is_client: bool) -> None:
        self.stream = stream
        self.protocol = FrameProtocol(client=not link_is_client, extensions=[])
        self.frames: list[Any] = []

    async def _piece(self) -> Any:
        while not self.frames:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            self.protocol.receive_bytes(bytes(data))
            self.frames.extend(self.protocol.received_frames())
        return self.frames.pop(0)

    async def next_frame(self) -> Frame:
        """One whole frame (wsproto hands big ones over in pieces)."""
        piece = await self._piece()
        opcode, parts = piece.opcode, [piece.payload]
        while not piece.frame_finished:
            piece = await self._piece()
            parts.append(piece.payload)
        if opcode == Opcode.CLOSE:
            return Frame(opcode, parts[0])
        return Frame(opcode, b"".join(parts))


@dataclass(frozen=True)
class Frame:
    opcode: Opcode
    payload: Any  # bytes, or (code, reason) for a close frame


@contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Bytes allocated (and still held) since entering, as a callable."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield lambda: tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


# =========================================================================== findings


async def test_tiny_fragments_do_not_cost_more_memory_than_their_payload(pki: Pki) -> None:
    """A peer splits one message into 1-byte fragments (7 bytes on the wire each): the link
    must hold about the payload, not a list of one bytes object per fragment."""
    count = 50_000
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client_tls, server_tls):
            link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
            peer = FrameReader(client_tls, link_is_client=False)
            wire = frame(Opcode.BINARY, b"a", masked=True, fin=False) + b"".join(
                frame(Opcode.CONTINUATION, b"b", masked=True, fin=False) for _ in range(count)
            )
            received: list[bytes | bytearray | str] = []
            with traced() as held:
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        received.append(await link.get_message())

                    nursery.start_soon(read)
                    await client_tls.send_all(wire)
                    # The pong proves the link parsed every fragment before the ping.
                    await client_tls.send_all(frame(Opcode.PING, b"sync", masked=True))
                    pong = await peer.next_frame()
                    assert pong.opcode == Opcode.PONG
                    growth = held()
                    await client_tls.send_all(frame(Opcode.CONTINUATION, b"c", masked=True))
            assert received == [b"a" + b"b" * count + b"c"]
            # Payload 50 KB (about 60 KB held with one buffer; 2.1 MB with a list).
            assert growth < 500_000, f"{growth} bytes held for a {count + 2}-byte message"


async def test_empty_fragments_are_not_collected_without_limit(pki: Pki) -> None:
    """Zero-length continuation frames never reach max_message_size: the link must not keep
    one list slot per frame (an endless fragmented message, before or after authentication)."""
    count = 120_000
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client_tls, server_tls):
            link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
            peer = FrameReader(client_tls, link_is_client=False)
            empty = frame(Opcode.CONTINUATION, b"", masked=True, fin=False)
            with traced() as held:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.get_message)
                    await client_tls.send_all(frame(Opcode.BINARY, b"x", masked=True, fin=False))
                    for _ in range(4):
                        await client_tls.send_all(empty * (count // 4))
                    await client_tls.send_all(frame(Opcode.PING, b"sync", masked=True))
                    assert (await peer.next_frame()).opcode == Opcode.PONG
                    growth = held()
                    nursery.cancel_scope.cancel()
            # One list slot per frame: 1 MB here, growing with every frame (one buffer: ~7 KB).
            assert growth < 300_000, f"{growth} bytes held after {count} empty fragments"


@pytest.mark.parametrize("control", ["ping", "close"])
@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_control_frame_during_a_long_send_is_answered_after_it(
    pki: Pki, version: ssl.TLSVersion, control: str
) -> None:
    """The peer pings (or closes) while our writer is in the middle of a big message that the
    peer has not read yet. TlsChannel marks itself broken for the whole duration of every
    send, so the pong (or the close echo) the reader sends meanwhile fails and the link
    reports 1006 ("TLS channel broke during an earlier send"): a live tunnel dies, or a clean
    close loses its echo. The reply must follow the message instead, and the reader must not
    wait for the writer either (the commit's own rule): the peer reads only after its data
    message got through, as the mux's windows make a real peer do."""
    big = b"z" * (24 << 20)  # more than the loopback socket buffers hold
    with trio.fail_after(GUARD):
        async with tls_pair(pki, version) as (client_tls, server_tls):
            link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
            peer = FrameReader(client_tls, link_is_client=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.send_message, big)
                await trio.testing.wait_all_tasks_blocked()  # the socket buffers are full
                if control == "ping":
                    await client_tls.send_all(frame(Opcode.PING, b"p", masked=True))
                    await client_tls.send_all(frame(Opcode.BINARY, b"data", masked=True))
                    with trio.move_on_after(5) as waited:
                        assert await link.get_message() == b"data"
                    assert not waited.cancelled_caught, "the reader waited for the writer"
                    assert link.closed is None
                else:
                    close = struct.pack("!H", 1000) + b"bye"
                    await client_tls.send_all(frame(Opcode.CLOSE, close, masked=True))
                    with trio.move_on_after(5) as waited, pytest.raises(WebSocketClosed) as seen:
                        await link.get_message()
                    assert not waited.cancelled_caught, "the reader waited for the writer"
                    assert (seen.value.code, seen.value.reason) == (1000, "bye")
                first = await peer.next_frame()
                assert (first.opcode, len(first.payload)) == (Opcode.BINARY, len(big))
            # The writer is done: our close (or the end of the connection) comes after the reply.
            async with trio.open_nursery() as closing:
                closing.start_soon(link.aclose)
                reply = await peer.next_frame()  # EOFError if the reply was lost
                if control == "ping":
                    assert (reply.opcode, reply.payload) == (Opcode.PONG, b"p")
                else:
                    assert reply.opcode == Opcode.CLOSE
                    assert reply.payload[0] == 1000
                closing.cancel_scope.cancel()


async def test_aclose_from_another_task_while_the_reader_waits(pki: Pki) -> None:
    """The docstring allows aclose "from anywhere": while the tunnel's reader waits in
    get_message, aclose from another task must finish the close handshake without an error
    (it now calls get_message itself: two tasks in one socket's receive_some)."""
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client_tls, server_tls):
            ours = WebSocketLink(client_tls, client=True, max_message_size=1 << 20)
            theirs = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
            reader_saw: list[BaseException] = []

            async def reader() -> None:
                try:
                    await ours.get_message()
                except WebSocketClosed as exc:
                    reader_saw.append(exc)

            async def peer() -> None:
                with pytest.raises(WebSocketClosed):
                    await theirs.get_message()
                await theirs.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(peer)
                await trio.testing.wait_all_tasks_blocked()
                await ours.aclose(1001, "going")  # BusyResourceError with the defect
            assert len(reader_saw) == 1


# =========================================================================== checked and fine


async def accept_link(
    nursery: trio.Nursery, listening: trio.SocketListener, context: ssl.SSLContext
) -> WebSocketLink:
    """The gateway's way to a server link, for one connection on ``listening``."""
    tcp = await listening.accept()
    tls = TlsChannel(tcp, context, server_side=True)
    await tls.do_handshake()
    handshake = HandshakeStream(tls, client=False)
    request = await trio_websocket.wrap_server_stream(nursery, handshake)
    await request.accept()
    return WebSocketLink(
        tls,
        client=False,
        max_message_size=1 << 24,
        buffered=handshake.take_over(),
        on_close=handshake.release,
    )


async def dial_link(nursery: trio.Nursery, port: int, context: ssl.SSLContext) -> WebSocketLink:
    """The connector's way to a client link."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TlsChannel(tcp, context, server_hostname="localhost")
    await tls.do_handshake()
    handshake = HandshakeStream(tls, client=True)
    await trio_websocket.wrap_client_stream(
        nursery,
        handshake,  # type: ignore[arg-type]  # any trio stream works
        "localhost",
        "/tunnel",
    )
    return WebSocketLink(
        tls,
        client=True,
        max_message_size=1 << 24,
        buffered=handshake.take_over(),
        on_close=handshake.release,
    )


async def echo(link: WebSocketLink) -> WebSocketClosed:
    """Echo every message until the link closes; returns why it closed."""
    while True:
        try:
            message = await link.get_message()
        except WebSocketClosed as closed:
            await link.aclose()
            return closed
        await link.send_message(message)


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 300_000, 3_000_000]


@pytest.mark.parametrize("compression", [None, "deflate"])
@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_websockets_client_against_our_server_link(
    pki: Pki, version: ssl.TLSVersion, compression: str | None
) -> None:
    """The ``websockets`` library as the connector (in a thread), our link as the gateway:
    sizes around every length encoding, text, ping, a fragmented message, a close code. With
    its default compression offer too: the upgrade must refuse permessage-deflate (our link
    refuses RSV1)."""
    closed: list[WebSocketClosed] = []
    client_log: list[Any] = []

    def client(port: int) -> None:
        with websockets.sync.client.connect(
            f"wss://localhost:{port}/tunnel",
            ssl=client_context(pki, version),
            compression=compression,
            max_size=None,
            proxy=None,
            open_timeout=GUARD,
        ) as ws:
            assert ws.response is not None
            client_log.append(ws.response.headers.get("Sec-WebSocket-Extensions"))
            for size in SIZES:
                payload = os.urandom(size)
                ws.send(payload)
                assert ws.recv(timeout=GUARD) == payload
            ws.send("grüße ✓")
            assert ws.recv(timeout=GUARD) == "grüße ✓"
            assert ws.ping(b"hi").wait(GUARD)
            ws.send([b"frag", b"ment", b"ed" * 70_000])
            assert ws.recv(timeout=GUARD) == b"fragment" + b"ed" * 70_000
            ws.send(["te", "xt ✓"])
            assert ws.recv(timeout=GUARD) == "text ✓"
            ws.close(4001, "bye")
            client_log.append((ws.close_code, ws.close_reason))

    with trio.fail_after(GUARD):
        async with listener() as (listening, port), trio.open_nursery() as nursery:

            async def server() -> None:
                link = await accept_link(nursery, listening, server_context(pki, version))
                closed.append(await echo(link))

            nursery.start_soon(server)
            await trio.to_thread.run_sync(client, port)
    assert client_log == [None, (4001, "")]
    assert (closed[0].code, closed[0].reason) == (4001, "bye")


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_our_client_link_against_a_websockets_server(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    """Our link as the connector, the ``websockets`` server (in a thread) as the gateway:
    echoes of every size, fragmented messages and pings from the server, its close code."""
    server_saw: list[Any] = []

    def handler(ws: websockets.sync.server.ServerConnection) -> None:
        with suppress(WsConnectionClosed):
            serve(ws)
        server_saw.append((ws.close_code, ws.close_reason))

    def serve(ws: websockets.sync.server.ServerConnection) -> None:
        for message in ws:
            if message == "fragments":
                ws.send([b"a" * 70_000, b"", b"b" * 3])
                ws.send(["grü", "ße"])
            elif message == "ping":
                server_saw.append(ws.ping(b"server").wait(GUARD))
                ws.send("pinged")
            elif message == "close":
                ws.close(4002, "server bye")
            else:
                ws.send(message)

    server = websockets.sync.server.serve(
        handler, "127.0.0.1", 0, ssl=server_context(pki, version), max_size=None
    )
    port = server.socket.getsockname()[1]
    try:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial_run_sync(server.serve_forever))
                link = await dial_link(nursery, port, client_context(pki, version))
                for size in SIZES:
                    payload = os.urandom(size)
                    await link.send_message(payload)
                    assert await link.get_message() == payload
                await link.send_message("fragments")
                assert await link.get_message() == b"a" * 70_000 + b"bbb"
                assert await link.get_message() == "grüße"
                await link.send_message("ping")
                assert await link.get_message() == "pinged"
                await link.send_message("close")
                with pytest.raises(WebSocketClosed) as seen:
                    await link.get_message()
                assert (seen.value.code, seen.value.reason) == (4002, "server bye")
                await link.aclose()
                server.shutdown()
    finally:
        server.shutdown()
    assert server_saw == [True, (4002, "")]  # our echo carries the code only


def partial_run_sync(function: Callable[[], None]) -> Callable[[], Any]:
    async def run() -> None:
        await trio.to_thread.run_sync(function)

    return run


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_wsproto_fragments_and_controls_over_tls(pki: Pki, version: ssl.TLSVersion) -> None:
    """wsproto (sans-IO) as the client: messages split into fragments with pings between them,
    then a close with a reason; and our server link's messages as wsproto receives them."""
    with trio.fail_after(GUARD):
        async with listener() as (listening, port), trio.open_nursery() as nursery:
            served: list[WebSocketClosed] = []

            async def server() -> None:
                link = await accept_link(nursery, listening, server_context(pki, version))
                served.append(await echo(link))

            nursery.start_soon(server)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = TlsChannel(tcp, client_context(pki, version), server_hostname="localhost")
            await tls.do_handshake()
            ws = WSConnection(ConnectionType.CLIENT)
            await tls.send_all(ws.send(ws_events.Request(host="localhost", target="/tunnel")))
            received: list[Any] = []

            async def events_until(done: Callable[[Any], bool]) -> None:
                while not any(done(e) for e in received):
                    data = await tls.receive_some()
                    ws.receive_data(bytes(data) if data else None)
                    received.extend(ws.events())

            await events_until(lambda e: isinstance(e, ws_events.AcceptConnection))
            pieces = [os.urandom(n) for n in (0, 1, 125, 70_000, 3)]
            for index, piece in enumerate(pieces):
                last = index == len(pieces) - 1
                await tls.send_all(ws.send(ws_events.Message(data=piece, message_finished=last)))
                await tls.send_all(ws.send(ws_events.Ping(payload=bytes([index]))))
            await events_until(lambda e: isinstance(e, ws_events.Pong) and e.payload == b"\x04")
            data = b"".join(e.data for e in received if isinstance(e, ws_events.BytesMessage))
            pongs = [e.payload for e in received if isinstance(e, ws_events.Pong)]
            await tls.send_all(ws.send(ws_events.CloseConnection(code=1001, reason="later")))
            await events_until(lambda e: isinstance(e, ws_events.CloseConnection))
            await tls.aclose()
    assert data == b"".join(pieces)
    assert pongs == [bytes([i]) for i in range(len(pieces))]
    assert (served[0].code, served[0].reason) == (1001, "later")


UPGRADE = (
    b"GET /tunnel HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@asynccontextmanager
async def gateway(
    pki: Pki,
    outcome: list[Any],
    *,
    handshake_timeout: float = GUARD,
    client_certs: bool = False,
    returned: trio.Event | None = None,
) -> AsyncIterator[int]:
    """accept_tunnel for one connection (as the gateway runs it); its result lands in
    ``outcome`` (with the client certificate it saw), then its nursery is cancelled."""

    async def authenticate(hello: dict[str, Any], peer: str, der: bytes | None) -> dict[str, Any]:
        outcome.append(der)
        return {"role": "gateway"}

    async with listener() as (listening, port), trio.open_nursery() as outer:

        async def serve() -> None:
            tcp = await listening.accept()
            assert isinstance(tcp, trio.SocketStream)
            async with trio.open_nursery() as nursery:
                result = await accept_tunnel(
                    nursery,
                    tcp,
                    ssl_context=server_context(pki, client_certs=client_certs),
                    path="/tunnel",
                    settings=TunnelSettings(handshake_timeout=handshake_timeout),
                    authenticate=authenticate,
                )
                outcome.append(result)
                if returned is not None:
                    returned.set()
                if result is not None:
                    await result[0].aclose()
                nursery.cancel_scope.cancel()

        outer.start_soon(serve)
        yield port


def hello_frame() -> bytes:
    mux = Mux(initiator=True)
    mux.send_hello({"role": "connector", "subaccount": "s"})
    return frame(Opcode.BINARY, mux.data_to_send(), masked=True)


async def raw_client(pki: Pki, port: int, *, certificate: bool = False) -> TlsChannel:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TlsChannel(tcp, client_context(pki, certificate=certificate), server_hostname="localhost")
    await tls.do_handshake()
    return tls


async def test_upgrade_request_and_hello_in_one_record_reach_the_link(pki: Pki) -> None:
    """No byte is lost at the handoff from trio-websocket to our link (gateway side): the
    upgrade request and HELLO arrive in one TLS record."""
    outcome: list[Any] = []
    with trio.fail_after(GUARD):
        async with gateway(pki, outcome) as port:
            tls = await raw_client(pki, port)
            await tls.send_all(UPGRADE + hello_frame())
            reader = bytearray()
            while b"\r\n\r\n" not in reader:
                reader += await tls.receive_some()
            assert reader.startswith(b"HTTP/1.1 101 ")
            await tls.aclose()
    der, result = outcome
    assert der is None
    assert result is not None
    assert result[2]["subaccount"] == "s"


async def test_answer_and_first_message_in_one_record_reach_the_link(pki: Pki) -> None:
    """The same handoff on the connector's side: 101 and a message in one TLS record."""
    with trio.fail_after(GUARD):
        async with listener() as (listening, port), trio.open_nursery() as nursery:

            async def server() -> None:
                tcp = await listening.accept()
                tls = TlsChannel(tcp, server_context(pki), server_side=True)
                await tls.do_handshake()
                ws = WSConnection(ConnectionType.SERVER)
                while True:
                    ws.receive_data(bytes(await tls.receive_some()))
                    if any(isinstance(e, ws_events.Request) for e in ws.events()):
                        break
                await tls.send_all(
                    ws.send(ws_events.AcceptConnection())
                    + ws.send(ws_events.Message(data=b"early"))
                    + ws.send(ws_events.Message(data="second"))
                )
                await _drain(tls)

            nursery.start_soon(server)
            link = await dial_link(nursery, port, client_context(pki))
            assert await link.get_message() == b"early"
            assert await link.get_message() == "second"
            await link.aclose()


async def _drain(stream: trio.abc.Stream) -> None:
    """Read until the end (a ragged one too: TlsChannel ends without close_notify alike)."""
    while await stream.receive_some():
        pass
    await stream.aclose()


async def test_an_endless_http_head_is_refused_without_buffering(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A client sends 4 MB of one header line: the gateway answers 400 long before the end,
    holds little memory and accept_tunnel returns None (no traceback)."""
    outcome: list[Any] = []
    with trio.fail_after(GUARD), traced() as held:
        async with gateway(pki, outcome, handshake_timeout=1) as port:
            answer = await _send_endless_head(pki, port)
        assert held() < 2_000_000
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert outcome == [None]
    assert not [r for r in caplog.records if r.exc_info]


async def refused_before(
    stream: trio.abc.SendStream,
    chunk: bytes,
    times: int,
    check: Callable[[], bool] = lambda: True,
) -> bool:
    """Send ``chunk`` up to ``times`` times; True once the peer refused more (it closed)."""
    try:
        for _ in range(times):
            await stream.send_all(chunk)
            assert check()
    except trio.BrokenResourceError:
        return True
    return False


async def _send_endless_head(pki: Pki, port: int) -> bytes:
    tls = await raw_client(pki, port)
    await tls.send_all(b"GET /tunnel HTTP/1.1\r\nX-Filler: ")
    answer = bytearray()
    assert await refused_before(tls, b"a" * 65536, 64)  # the gateway stops reading
    while data := await tls.receive_some():
        answer += data
    await tls.aclose()
    return bytes(answer)


async def test_a_refused_http_head_ends_accept_tunnel_at_once(pki: Pki) -> None:
    """After trio-websocket answered 400 and closed the connection, accept_tunnel still waits
    for a request that cannot come, until the handshake time-out (10 s by default): the
    connection's task and TLS state stay that long, and the log says "did not complete the
    handshake" instead of what happened. The client side races the upgrade against the end
    of the stream; the gateway side does not."""
    outcome: list[Any] = []
    returned = trio.Event()
    with trio.fail_after(GUARD):
        async with gateway(pki, outcome, handshake_timeout=GUARD, returned=returned) as port:
            answer = await _send_endless_head(pki, port)
            assert answer.startswith(b"HTTP/1.1 400 ")
            with trio.move_on_after(3):
                await returned.wait()
            assert returned.is_set(), "accept_tunnel still waits for the request"
    assert outcome == [None]


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_aclose_ends_when_the_peer_stops_reading(pki: Pki, version: ssl.TLSVersion) -> None:
    """The peer reads nothing while we close (our writer had filled its buffers): aclose
    gives up within its time-outs and closes the socket; a second aclose returns at once."""
    async with tls_pair(pki, version) as (_, server_tls):
        link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send_message, b"z" * (24 << 20))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # half a record on the wire: the channel is broken
        start = trio.current_time()
        with trio.fail_after(GUARD):
            await link.aclose()
            await link.aclose()
        assert trio.current_time() - start < 3
        assert link.closed is not None
        with pytest.raises(WebSocketClosed):
            await link.send_message(b"after")
        with pytest.raises(trio.ClosedResourceError):
            await server_tls.send_all(b"x")


async def test_a_send_cut_short_breaks_the_link_and_the_peer_never_decrypts_garbage(
    pki: Pki,
) -> None:
    """A send cancelled half-way leaves half a TLS record: our next send must fail (1006), and
    the peer must see a TLS error or the end, never a wrong message."""
    async with tls_pair(pki) as (client_tls, server_tls):
        ours = WebSocketLink(server_tls, client=False, max_message_size=1 << 26)
        theirs = WebSocketLink(client_tls, client=True, max_message_size=1 << 26)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.send_message, b"z" * (24 << 20))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        with pytest.raises(WebSocketClosed) as seen:
            await ours.send_message(b"next")
        assert seen.value.code == CLOSE_ABNORMAL
        await trio.aclose_forcefully(server_tls)
        with trio.fail_after(GUARD), pytest.raises(WebSocketClosed) as peer_saw:
            await theirs.get_message()
        assert peer_saw.value.code == CLOSE_ABNORMAL


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x17\x03\x03\x00\x20" + b"\x00" * 32, id="bad-record-mac"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="plaintext"),
    ],
)
async def test_tls_garbage_after_the_handshake_is_a_clean_1006(pki: Pki, garbage: bytes) -> None:
    """Bytes that are not a valid TLS record: WebSocketClosed(1006) naming the TLS error,
    never an ssl.SSLError."""
    async with tls_pair(pki) as (client_tls, server_tls):
        link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
        await client_tls.transport.send_all(garbage)
        with trio.fail_after(GUARD), pytest.raises(WebSocketClosed) as seen:
            await link.get_message()
        assert seen.value.code == CLOSE_ABNORMAL
        assert "TLS error" in seen.value.reason
        assert isinstance(seen.value.__cause__, trio.BrokenResourceError)
        assert isinstance(seen.value.__cause__.__cause__, ssl.SSLError)


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_ragged_eof_inside_a_frame_is_abnormal(pki: Pki, version: ssl.TLSVersion) -> None:
    """The TCP connection ends (no close_notify) in the middle of a frame: 1006, not a
    message and not a hang."""
    async with tls_pair(pki, version) as (client_tls, server_tls):
        link = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
        whole = frame(Opcode.BINARY, b"q" * 1000, masked=True)
        await client_tls.send_all(whole[:500])
        await client_tls.transport.aclose()
        with trio.fail_after(GUARD), pytest.raises(WebSocketClosed) as seen:
            await link.get_message()
        assert seen.value.code == CLOSE_ABNORMAL


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("certificate", [True, False])
async def test_the_gateway_sees_the_client_certificate(
    pki: Pki, version: ssl.TLSVersion, certificate: bool
) -> None:
    """Mutual TLS through accept_tunnel: authenticate gets the connector's DER certificate,
    or None without one."""
    outcome: list[Any] = []
    with trio.fail_after(GUARD):
        async with gateway(pki, outcome, client_certs=True) as port:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            context = client_context(pki, version, certificate=certificate)
            tls = TlsChannel(tcp, context, server_hostname="localhost")
            await tls.do_handshake()
            await tls.send_all(UPGRADE + hello_frame())
            await _drain(tls)
    der, result = outcome
    assert result is not None
    if certificate:
        expected = ssl.PEM_cert_to_DER_cert(
            pki.client_cert.read_text().split("-----END")[0] + "-----END CERTIFICATE-----\n"
        )
        assert der == expected
    else:
        assert der is None


async def test_the_upgrade_reader_finishes_after_aclose(pki: Pki) -> None:
    """trio-websocket's reader, parked after the upgrade, ends once our link closed: the
    nursery exits by itself (no task left per tunnel, no cancel needed)."""
    with trio.fail_after(GUARD):
        async with tls_pair(pki) as (client_tls, server_tls):
            async with trio.open_nursery() as nursery:
                client, server = await upgrade_both(nursery, client_tls, server_tls)
                await client.send_message(b"x")
                assert await server.get_message() == b"x"
                async with trio.open_nursery() as closing:
                    closing.start_soon(client.aclose)
                    closing.start_soon(server.aclose)
            assert client.closed is not None
            assert client.closed.code == 1000


async def test_a_ping_flood_before_hello_holds_little_memory(pki: Pki) -> None:
    """Before authentication a client sends 2 MB of pings and reads nothing: the gateway
    answers until its socket is full, then stops reading (its memory stays small) and
    gives up at the handshake time-out."""
    outcome: list[Any] = []
    ping = frame(Opcode.PING, b"p" * 125, masked=True)
    with trio.fail_after(GUARD), traced() as held:
        async with gateway(pki, outcome, handshake_timeout=2) as port:
            tls = await raw_client(pki, port)
            await tls.send_all(UPGRADE)
            assert await refused_before(tls, ping * 160, 100, check=lambda: held() < 4_000_000)
            await trio.aclose_forcefully(tls)
    assert outcome == [None]
