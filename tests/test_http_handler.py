"""The HTTP plugin's connector handler: tunnel stream → HTTP(S) backend, and its header rewrites.

Requests travel as the gateway sends them, over a real TunnelStream (two Tunnels joined by an
in-memory WebSocket, ``tests/tunnel_pair.py``), to real h11 backends on 127.0.0.1 port 0.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio_websocket

from backchannel import (
    AuditLog,
    CertificateAuthority,
    ConfigError,
    HostPort,
    ResetCode,
    Role,
    Session,
    SystemMapping,
    TableReader,
    TunnelStream,
)
from backchannel._identity import PrincipalResolver
from backchannel._proto._mux import MuxSettings
from backchannel_http._handler import HttpHandler, HttpOptions
from backchannel_http._resources import ResourceRule
from backchannel_http._rewrite import (
    Origin,
    has_body,
    host_matches,
    map_cookie_domain,
    map_location,
    request_headers,
    response_headers,
)
from tests.tunnel_pair import tunnel_pair

VHOST, VPORT = "erp.virtual", 8000
SYSTEM = f"{VHOST}:{VPORT}"
CLIENT_IP = "203.0.113.7"
MiB = 1024 * 1024
BLOCK = hashlib.sha256(b"seed").digest() * (256 * 1024 // 32)  # 256 KiB of pattern

RULES: list[dict[str, Any]] = [
    {"path": "/public", "match": "prefix"},
    {"path": "/exact", "match": "exact"},
    {"path": "/suspended", "match": "prefix", "active": False},
    {"path": "/ws", "websocket": True},
    {"path": "/ws-plain"},
]


def pattern(size: int) -> Iterator[bytes]:
    """``size`` deterministic bytes in 256 KiB pieces (never all in memory at once)."""
    while size > 0:
        piece = BLOCK[: min(size, len(BLOCK))]
        size -= len(piece)
        yield piece


# --------------------------------------------------------------------------- backend


@dataclass
class Backend:
    """A small h11 web server; ``host`` and ``port`` once it listens."""

    port: int = 0
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    peer_names: list[str] = field(default_factory=list)


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(64 * 1024)))


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    while True:
        event = await _next(conn, stream)
        if isinstance(event, h11.Data):
            digest.update(event.data)
            size += len(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            trailers = [[k.decode(), v.decode()] for k, v in event.headers]
            return {"sha256": digest.hexdigest(), "size": size, "trailers": trailers}


async def _respond(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    head = [*(headers or []), ("content-length", str(len(body)))]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=head)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _route(
    backend: Backend, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request
) -> bool:
    """Serve one request; False when the connection must end afterwards."""
    path = request.target.decode()
    send = stream.send_all
    if path == "/public/hang":
        await trio.sleep_forever()
    if path == "/public/continue" and conn.they_are_waiting_for_100_continue:
        await send(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
    if path == "/public/reject":
        await _respond(conn, stream, 401, b"no")
        return False
    if path.startswith("/public/truncated"):
        framing = ("content-length", "100000") if path.endswith("length") else ("x", "y")
        await send(conn.send(h11.Response(status_code=200, headers=[framing])) or b"")
        await send(conn.send(h11.Data(data=b"x" * 1000)) or b"")
        return False
    if path.startswith("/public/download/"):
        size = int(path.rsplit("/", 1)[1])
        head = h11.Response(status_code=200, headers=[("content-length", str(size))])
        await send(conn.send(head) or b"")
        for piece in pattern(size):
            await send(conn.send(h11.Data(data=piece)) or b"")
        await send(conn.send(h11.EndOfMessage()) or b"")
        return True
    seen = {
        "method": request.method.decode(),
        "target": path,
        "headers": [[k.decode(), v.decode()] for k, v in request.headers],
        **(await _read_body(conn, stream)),
    }
    backend.requests.append(seen)
    internal = f"127.0.0.1:{backend.port}"
    if path == "/public/redirect":
        await _respond(
            conn,
            stream,
            302,
            b"",
            [
                ("location", f"http://{internal}/public/landing?x=1"),
                ("content-location", "http://elsewhere.example/a"),
                ("set-cookie", "sid=1; Domain=127.0.0.1; Path=/; HttpOnly"),
                ("set-cookie", "other=2; Domain=elsewhere.example"),
            ],
        )
    elif path == "/public/hop":
        hop = [("connection", "close, x-internal"), ("x-internal", "1"), ("keep-alive", "5")]
        await _respond(conn, stream, 200, b"hop", [*hop, ("x-kept", "yes")])
        return False
    elif path == "/public/chunked":
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await send(conn.send(head) or b"")
        for part in (b"one,", b"two,", b"three"):
            await send(conn.send(h11.Data(data=part)) or b"")
        await send(conn.send(h11.EndOfMessage(headers=[("x-trailer", "done")])) or b"")
    elif path == "/public/whoami":
        await _respond(conn, stream, 200, ",".join(backend.peer_names).encode())
    else:
        await _respond(conn, stream, 200, json.dumps(seen).encode())
    return path != "/public/once"


async def _serve_connection(backend: Backend, stream: trio.abc.Stream) -> None:
    backend.connections += 1
    conn = h11.Connection(h11.SERVER)
    try:
        if isinstance(stream, trio.SSLStream):
            await stream.do_handshake()
            cert = stream.getpeercert() or {}
            backend.peer_names += [v for rdn in cert.get("subject", ()) for k, v in rdn]
        while True:
            event = await _next(conn, stream)
            if not isinstance(event, h11.Request):
                return
            if not await _route(backend, conn, stream, event):
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def start_backend(nursery: trio.Nursery, context: ssl.SSLContext | None = None) -> Backend:
    backend = Backend()
    handler = partial(_serve_connection, backend)
    if context is None:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    else:
        serve = partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
        listeners = await nursery.start(serve)
    listener = listeners[0].transport_listener if context else listeners[0]
    backend.port = listener.socket.getsockname()[1]
    return backend


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    return await start_backend(nursery)


# --------------------------------------------------------------------------- the gateway side


class RecordingAudit(AuditLog):
    def __init__(self) -> None:
        super().__init__(Role.CONNECTOR)
        self.denials_seen: list[dict[str, Any]] = []

    def denied(self, event: str, reason: str, **fields: Any) -> None:
        self.denials_seen.append({"event": event, "reason": reason, **fields})
        super().denied(event, reason, **fields)


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    informational: list[int]
    reason: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """The gateway's end: h11 over the tunnel stream."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> Any:
        return await _next(self.conn, self.stream)

    async def start(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        all_headers = [("host", SYSTEM), *headers]
        await self.send(h11.Request(method=method, target=target, headers=all_headers))

    async def reply(self, *, sink: Any = None) -> Reply:
        informational: list[int] = []
        while True:
            event = await self.next_event()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                continue
            assert isinstance(event, h11.Response), event
            break
        body = bytearray()
        while True:
            part = await self.next_event()
            if isinstance(part, h11.Data):
                if sink is None:
                    body += part.data
                else:
                    sink(part.data)
                continue
            assert isinstance(part, h11.EndOfMessage)
            break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(
            event.status_code,
            list(event.headers),
            bytes(body),
            list(part.headers),
            informational,
            event.reason,
        )

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        extra = [("content-length", str(len(body)))] if body or method == "POST" else []
        await self.start(method, target, [*(headers or []), *extra])
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.reply()


@dataclass
class Harness:
    client: Client
    stream: TunnelStream
    audit: RecordingAudit
    done: trio.Event


def parse_options(
    table: dict[str, Any], base_dir: Path = Path("."), protocol: str = "http"
) -> HttpOptions:
    reader = TableReader("connector.toml", "mappings[0]", {"protocol": protocol, **table}, base_dir)
    return HttpHandler().parse_mapping_options(reader)


def http_session(
    port: int,
    audit: AuditLog,
    table: dict[str, Any] | None = None,
    *,
    protocol: str = "http",
    base_dir: Path = Path("."),
    attributes: dict[str, Any] | None = None,
    app: str = "app1",
    principal: str | None = None,
    principal_resolver: PrincipalResolver | None = None,
) -> Session:
    """The connector's session of one stream for ``erp.virtual:8000`` → ``127.0.0.1:port``."""
    options = parse_options({"resources": RULES, **(table or {})}, base_dir, protocol)
    mapping = SystemMapping(
        "acme", protocol, VHOST, range(VPORT, VPORT + 1), "127.0.0.1", port, options=options
    )
    return Session(
        protocol="http",
        subaccount="acme",
        location="",
        app=app,
        virtual=HostPort(VHOST, VPORT),
        internal=HostPort("127.0.0.1", port),
        mapping=mapping,
        audit=audit,
        principal=principal,
        attributes={"client_ip": CLIENT_IP, "scheme": "http"} if attributes is None else attributes,
        principal_resolver=principal_resolver,
    )


@asynccontextmanager
async def serving(session: Session) -> AsyncIterator[tuple[TunnelStream, trio.Event]]:
    """The HTTP handler serving one tunnel stream of ``session``: the gateway's end of the
    stream, and an event set when the handler is done."""
    attributes = dict(session.attributes)
    metadata = {"protocol": "http", "host": VHOST, "port": VPORT, "attributes": attributes}
    async with tunnel_pair(accept=False) as pair:
        opener, acceptor = await pair.open_pair(metadata, wait_accepted=False)
        done = trio.Event()

        async def run() -> None:
            try:
                await HttpHandler(connect_timeout=5).handle(session, acceptor)
            finally:
                await acceptor.aclose()
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield opener, done
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def http_stream(
    port: int,
    table: dict[str, Any] | None = None,
    *,
    protocol: str = "http",
    base_dir: Path = Path("."),
    attributes: dict[str, Any] | None = None,
) -> AsyncIterator[Harness]:
    """A handler serving one tunnel stream for ``erp.virtual:8000`` → ``127.0.0.1:port``."""
    audit = RecordingAudit()
    session = http_session(
        port, audit, table, protocol=protocol, base_dir=base_dir, attributes=attributes
    )
    async with serving(session) as (opener, done):
        with trio.fail_after(30):
            yield Harness(Client(opener), opener, audit, done)


async def read_to_eof(stream: TunnelStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


# --------------------------------------------------------------------------- access control


async def test_allowed_request_is_forwarded_with_its_query(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", "/public/a%7eb/c?q=1&r=%2F")
    assert reply.status == 200
    seen = reply.json()
    # Unreserved escapes are decoded (the canonical path that was checked), the query is kept.
    assert (seen["method"], seen["target"]) == ("GET", "/public/a~b/c?q=1&r=%2F")


@pytest.mark.parametrize(
    "target",
    [
        "/private",
        "/publicity",  # a prefix rule covers sub-paths, not longer names
        "/exact/below",
        "/suspended/x",
        "/public/../admin",
        "/public/%2e%2E/admin",
        "/public//admin",
        "/public%2Fadmin",
        "/public/..;/admin",
        "/public/%252e%252e/admin",
        "/public/a\\..\\admin",
    ],
)
async def test_denied_paths_get_403_naming_the_virtual_system(
    backend: Backend, target: str
) -> None:
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", target)
        # The stream stays usable after a refusal.
        assert (await h.client.request("GET", "/exact")).status == 200
    assert reply.status == 403
    assert reply.reason == b"Forbidden"
    text = reply.body.decode()
    first, reason = text.rstrip("\n").split("\n")
    assert first == f"Access denied to resource http://{SYSTEM}{target} on system {SYSTEM}"
    assert reason
    assert "127.0.0.1" not in text
    assert str(backend.port) not in text
    assert [r["target"] for r in backend.requests] == ["/exact"]
    (denial,) = h.audit.denials_seen
    assert denial["event"] == "http_request"
    assert (denial["subaccount"], denial["app"], denial["target"]) == ("acme", "app1", SYSTEM)
    assert denial["path"] == target
    assert denial["reason"] == reason


async def test_denied_request_body_is_skipped_and_the_stream_stays_usable(
    backend: Backend,
) -> None:
    async with http_stream(backend.port) as h:
        denied = await h.client.request("POST", "/private", body=b"x" * 300_000)
        allowed = await h.client.request("POST", "/public/p", body=b"ok")
    assert (denied.status, allowed.status) == (403, 200)
    assert allowed.json()["size"] == 2


async def test_host_header_for_another_system_is_misdirected(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        await h.client.send(
            h11.Request(method="GET", target="/public/x", headers=[("host", "other:8000")])
        )
        await h.client.send(h11.EndOfMessage())
        reply = await h.client.reply()
    assert reply.status == 421
    assert backend.requests == []
    assert h.audit.denials_seen[0]["reason"].startswith("the Host header names other:8000")


async def test_malformed_request_gets_400_and_the_stream_ends(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        await h.stream.send_all(b"GET /public/x HTTP/1.1\r\nHost erp.virtual\r\n\r\n")
        answer = await read_to_eof(h.stream)
        await h.done.wait()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()
    assert backend.connections == 0


# --------------------------------------------------------------------------- headers


async def test_virtual_host_header_and_forwarded_headers(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", "/public/h", [("x-forwarded-for", "10.0.0.1")])
    headers = dict(reply.json()["headers"])
    assert headers["host"] == SYSTEM
    # A client's own X-Forwarded-For is not believed: only the gateway's view of it counts.
    assert headers["x-forwarded-for"] == CLIENT_IP
    assert headers["x-forwarded-proto"] == "http"
    assert "x-forwarded-host" not in headers


async def test_internal_host_header_mode(backend: Backend) -> None:
    async with http_stream(backend.port, {"host_header": "internal"}) as h:
        reply = await h.client.request("GET", "/public/h", [("x-forwarded-host", "spoofed")])
    headers = reply.json()["headers"]
    assert ["host", f"127.0.0.1:{backend.port}"] in headers
    assert [v for k, v in headers if k == "x-forwarded-host"] == [SYSTEM]
    assert [v for k, v in headers if k == "x-forwarded-for"] == [CLIENT_IP]


async def test_hop_by_hop_headers_are_removed_both_ways(backend: Backend) -> None:
    request_hop = [
        ("connection", "x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers, deflate"),
        ("proxy-authorization", "Basic abc"),
        ("upgrade", "h2c"),
        ("x-end-to-end", "kept"),
    ]
    async with http_stream(backend.port) as h:
        seen = (await h.client.request("GET", "/public/h", request_hop)).json()
        hop = await h.client.request("GET", "/public/hop")
        again = await h.client.request("GET", "/public/again")
    names = {k for k, _ in seen["headers"]}
    assert names.isdisjoint({"connection", "x-secret", "keep-alive", "proxy-authorization"})
    assert "upgrade" not in names
    assert ["te", "trailers"] in seen["headers"]
    assert ["x-end-to-end", "kept"] in seen["headers"]
    response_names = {k for k, _ in hop.headers}
    assert response_names.isdisjoint({b"connection", b"x-internal", b"keep-alive"})
    assert hop.header(b"x-kept") == [b"yes"]
    assert hop.body == b"hop"
    # The backend closed after /public/hop ("Connection: close"): a new connection follows.
    assert again.status == 200
    assert backend.connections == 2


async def test_location_and_cookie_domain_name_the_virtual_system(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", "/public/redirect")
    assert reply.status == 302
    assert reply.header(b"location") == [f"http://{SYSTEM}/public/landing?x=1".encode()]
    assert reply.header(b"content-location") == [b"http://elsewhere.example/a"]
    assert reply.header(b"set-cookie") == [
        f"sid=1; Domain={VHOST}; Path=/; HttpOnly".encode(),
        b"other=2; Domain=elsewhere.example",
    ]


# --------------------------------------------------------------------------- bodies


#: What moving 64 MiB may hold at its peak: 8 MiB with fixed 1 MiB windows, plus what one
#: stream's window may grow by while its reader keeps up (MuxSettings.max_window).
MEMORY_BOUND = 8 * MiB + MuxSettings().max_window - MuxSettings().initial_window


async def test_64_mib_upload_streams_with_bounded_memory(backend: Backend) -> None:
    size = 64 * MiB
    expected = hashlib.sha256()
    async with http_stream(backend.port) as h:
        tracemalloc.start()
        try:
            await h.client.start("PUT", "/public/upload", [("content-length", str(size))])
            for piece in pattern(size):
                expected.update(piece)
                await h.client.send(h11.Data(data=piece))
            await h.client.send(h11.EndOfMessage())
            reply = await h.client.reply()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    seen = reply.json()
    assert (seen["size"], seen["sha256"]) == (size, expected.hexdigest())
    assert peak < MEMORY_BOUND, f"peak {peak / MiB:.1f} MiB while moving 64 MiB"


async def test_64_mib_download_streams_with_bounded_memory(backend: Backend) -> None:
    size = 64 * MiB
    expected, received = hashlib.sha256(), hashlib.sha256()
    for piece in pattern(size):
        expected.update(piece)
    async with http_stream(backend.port) as h:
        tracemalloc.start()
        try:
            await h.client.start("GET", f"/public/download/{size}", [])
            await h.client.send(h11.EndOfMessage())
            reply = await h.client.reply(sink=received.update)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert reply.header(b"content-length") == [str(size).encode()]
    assert received.hexdigest() == expected.hexdigest()
    assert peak < MEMORY_BOUND, f"peak {peak / MiB:.1f} MiB while moving 64 MiB"


async def test_chunked_both_ways_with_trailers(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        await h.client.start("POST", "/public/chunked", [("transfer-encoding", "chunked")])
        for part in (b"a" * 70_000, b"b" * 10, b"c"):
            await h.client.send(h11.Data(data=part))
        # A trailer only the connector may set (a user certificate) never reaches the backend.
        trailers = [("x-sum", "ok"), ("SSL_Client-Cert", "forged"), ("x-forwarded-for", "1.2.3.4")]
        await h.client.send(h11.EndOfMessage(headers=trailers))
        reply = await h.client.reply()
    (seen,) = backend.requests
    assert seen["size"] == 70_011
    assert seen["trailers"] == [["x-sum", "ok"]]
    assert ["transfer-encoding", "chunked"] in seen["headers"]
    assert reply.body == b"one,two,three"
    assert reply.header(b"transfer-encoding") == [b"chunked"]
    assert reply.trailers == [(b"x-trailer", b"done")]


async def test_expect_100_continue_is_relayed_from_the_backend(backend: Backend) -> None:
    body = b"z" * 100_000
    async with http_stream(backend.port) as h:
        headers = [("content-length", str(len(body))), ("expect", "100-continue")]
        await h.client.start("POST", "/public/continue", headers)
        first = await h.client.next_event()
        assert isinstance(first, h11.InformationalResponse)
        assert first.status_code == 100
        await h.client.send(h11.Data(data=body))
        await h.client.send(h11.EndOfMessage())
        reply = await h.client.reply()
    assert reply.json()["sha256"] == hashlib.sha256(body).hexdigest()


async def test_final_answer_instead_of_100_continue_closes_the_stream(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        headers = [("content-length", "1000000"), ("expect", "100-continue")]
        await h.client.start("POST", "/public/reject", headers)
        reply = await h.client.reply()
        # The client never sent its body; the stream cannot carry another request.
        assert await h.stream.receive_some() == b""
        await h.done.wait()
    assert reply.status == 401
    assert reply.informational == []
    assert reply.header(b"connection") == [b"close"]


# --------------------------------------------------------------------------- the backend connection


async def test_keep_alive_reuses_one_backend_connection(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        for index in range(100):
            reply = await h.client.request("GET", f"/public/n{index}")
            assert reply.status == 200
            assert reply.json()["target"] == f"/public/n{index}"
        await h.stream.send_eof()
        assert await h.stream.receive_some() == b""
        await h.done.wait()
    assert backend.connections == 1
    assert len(backend.requests) == 100


async def test_backend_closing_an_idle_connection_is_reopened(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        first = await h.client.request("GET", "/public/once")
        second = await h.client.request("GET", "/public/after")
        third = await h.client.request("GET", "/public/later")
    assert (first.status, second.status, third.status) == (200, 200, 200)
    # One retry on a fresh connection, which then stays in use.
    assert backend.connections == 2


async def test_refused_connection_is_502_naming_the_virtual_system() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        async with http_stream(port) as h:
            reply = await h.client.request("GET", "/public/x")
            again = await h.client.request("GET", "/public/y")
    assert reply.status == 502
    assert again.status == 502
    assert reply.body == f"Backend of system {SYSTEM} refused the connection\n".encode()


async def test_no_response_headers_in_time_is_504(backend: Backend) -> None:
    async with http_stream(backend.port, {"backend_timeout": 1}) as h:
        reply = await h.client.request("GET", "/public/hang")
        after = await h.client.request("GET", "/public/after")
    assert reply.status == 504
    assert reply.body == f"Backend of system {SYSTEM} did not answer within 1 s\n".encode()
    assert after.status == 200
    assert backend.connections == 2


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_backend_closing_mid_response_resets_the_stream(
    backend: Backend, framing: str
) -> None:
    async with http_stream(backend.port) as h:
        await h.client.start("GET", f"/public/truncated-{framing}", [])
        await h.client.send(h11.EndOfMessage())
        with pytest.raises(trio.BrokenResourceError):
            await h.client.reply()
        await h.done.wait()
    assert h.stream.error is not None
    assert h.stream.error.code is ResetCode.BACKEND_UNREACHABLE
    assert SYSTEM in h.stream.error.reason
    assert "127.0.0.1" not in h.stream.error.reason


# --------------------------------------------------------------------------- WebSocket


async def _websocket_echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except trio_websocket.ConnectionClosed:
        pass


async def test_websocket_upgrade_through_an_allowed_rule(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, _websocket_echo), "127.0.0.1", 0, None
    )
    async with http_stream(server.port) as h, trio.open_nursery() as ws_nursery:
        stream: Any = h.stream  # any trio stream works
        ws = await trio_websocket.wrap_client_stream(ws_nursery, stream, SYSTEM, "/ws/chat")
        for message in ("hello", "x" * 200_000, b"\x00\x01"):
            await ws.send_message(message)
            assert await ws.get_message() == message
        await ws.aclose()


async def test_websocket_upgrade_on_a_plain_rule_is_403(backend: Backend) -> None:
    rejected: list[trio_websocket.ConnectionRejected] = []
    async with http_stream(backend.port) as h:
        try:
            async with trio.open_nursery() as ws_nursery:
                stream: Any = h.stream  # any trio stream works
                await trio_websocket.wrap_client_stream(ws_nursery, stream, SYSTEM, "/ws-plain/x")
        except* trio_websocket.ConnectionRejected as group:
            rejected += [
                e for e in group.exceptions if isinstance(e, trio_websocket.ConnectionRejected)
            ]
    (error,) = rejected
    assert error.status_code == 403
    assert error.body is not None
    assert b"WebSocket upgrade not allowed for resource /ws-plain" in error.body
    assert backend.requests == []


# --------------------------------------------------------------------------- HTTPS backends


@dataclass
class Pki:
    ca_file: Path
    other_ca_file: Path
    server: ssl.SSLContext
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority.create("backend CA"), CertificateAuthority.create("other")
    ca_file, _ = ca.save(folder, name="ca")
    other_file, _ = other.save(folder, name="other")
    server_cert, server_key = ca.issue_server_certificate(["backend.corp"]).save(folder, "server")
    client_cert, client_key = ca.issue_client_certificate("connector-7").save(folder, "client")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the connector's system certificate
    return Pki(ca_file, other_file, context, client_cert, client_key)


def tls_table(pki: Pki, ca_file: Path) -> dict[str, Any]:
    return {
        "ca_file": str(ca_file),
        "server_name": "backend.corp",
        "client_cert": str(pki.client_cert),
        "client_key": str(pki.client_key),
    }


async def test_https_backend_with_client_certificate(nursery: trio.Nursery, pki: Pki) -> None:
    backend = await start_backend(nursery, pki.server)
    table = {**tls_table(pki, pki.ca_file), "host_header": "internal"}
    async with http_stream(backend.port, table, protocol="https") as h:
        who = await h.client.request("GET", "/public/whoami")
        redirect = await h.client.request("GET", "/public/redirect")
    assert (who.status, who.body) == (200, b"connector-7")
    # An https backend on its own port: its absolute URLs map to the virtual http system.
    assert redirect.header(b"location") == [f"http://{SYSTEM}/public/landing?x=1".encode()]
    assert backend.connections == 1
    assert ["host", f"127.0.0.1:{backend.port}"] in backend.requests[0]["headers"]


async def test_untrusted_backend_certificate_is_502(nursery: trio.Nursery, pki: Pki) -> None:
    backend = await start_backend(nursery, pki.server)
    table = tls_table(pki, pki.other_ca_file)
    async with http_stream(backend.port, table, protocol="https") as h:
        reply = await h.client.request("GET", "/public/whoami")
    assert reply.status == 502
    assert (
        reply.body == f"The certificate of the backend of system {SYSTEM} is not trusted\n".encode()
    )
    assert backend.requests == []


# --------------------------------------------------------------------------- configuration


def test_mapping_options_defaults_and_rules() -> None:
    options = parse_options(
        {
            "resources": [
                {"path": "/a"},
                {"path": "/b", "match": "exact", "active": False, "websocket": True},
            ]
        }
    )
    assert options == HttpOptions(
        (ResourceRule("/a", "prefix"), ResourceRule("/b", "exact", False, True)),
        "virtual",
        60.0,
        None,
    )


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"host_header": "both"}, "mappings[0].host_header", "must be 'virtual' or 'internal'"),
        ({"backend_timeout": 0}, "mappings[0].backend_timeout", "must be between"),
        (
            {"resources": [{"path": "/a", "match": "glob"}]},
            "mappings[0].resources[0].match",
            "exact",
        ),
        ({"resources": [{"path": "/a/../b"}]}, "mappings[0].resources[0].path", "ambiguous"),
        ({"resources": [{"path": "/a", "extra": 1}]}, "mappings[0].resources[0].extra", "unknown"),
        ({"resources": [{}]}, "mappings[0].resources[0].path", "is required"),
        ({"ca_file": "ca.pem"}, "mappings[0].ca_file", "unknown key"),  # only for https
    ],
)
def test_mapping_option_errors_name_the_key(table: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(table)
    assert key in str(info.value)
    assert problem in str(info.value)


def test_https_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        parse_options({"client_cert": str(pki.client_cert)}, protocol="https")
    options = parse_options(tls_table(pki, pki.ca_file), protocol="https")
    assert options.tls is not None
    assert options.tls.server_name == "backend.corp"


# --------------------------------------------------------------------------- rewrite rules

INTERNAL = Origin("http", "erp.corp.local", 8080)
VIRTUAL = Origin("http", VHOST, VPORT)


def test_request_headers_internal_mode() -> None:
    headers = request_headers(
        [
            (b"host", b"erp.virtual:8000"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-proto", b"gopher"),
            (b"content-length", b"5"),
            (b"transfer-encoding", b"chunked"),
            (b"proxy-connection", b"keep-alive"),
        ],
        host_mode="internal",
        internal=INTERNAL,
        virtual=VIRTUAL,
        client_ip="198.51.100.1",
        scheme="http",
        websocket=False,
    )
    assert headers == [
        (b"host", b"erp.corp.local:8080"),
        (b"transfer-encoding", b"chunked"),
        (b"x-forwarded-host", b"erp.virtual:8000"),
        (b"x-forwarded-for", b"198.51.100.1"),
        (b"x-forwarded-proto", b"http"),
    ]


def test_request_headers_keep_the_websocket_handshake() -> None:
    received = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    headers = request_headers(
        received,
        host_mode="virtual",
        internal=INTERNAL,
        virtual=VIRTUAL,
        client_ip=None,
        scheme="http",
        websocket=True,
    )
    assert headers == [
        (b"host", b"h"),
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
        (b"x-forwarded-proto", b"http"),
    ]


@pytest.mark.parametrize(
    ("location", "mapped"),
    [
        (b"http://erp.corp.local:8080/a?b#c", b"http://erp.virtual:8000/a?b#c"),
        (b"HTTP://ERP.corp.local:8080", b"http://erp.virtual:8000"),
        (b"//erp.corp.local:8080/x", b"//erp.virtual:8000/x"),
        (b"http://erp.corp.local:8080?x=1", b"http://erp.virtual:8000/?x=1"),
        (b"http://erp.corp.local/a", b"http://erp.corp.local/a"),  # port 80: another server
        (b"http://other:8080/a", b"http://other:8080/a"),
        (b"/relative", b"/relative"),
        (b"http://erp.corp.local:99999/", b"http://erp.corp.local:99999/"),
        (b"mailto:x@erp.corp.local", b"mailto:x@erp.corp.local"),
    ],
)
def test_map_location(location: bytes, mapped: bytes) -> None:
    assert map_location(location, backend=INTERNAL, virtual=VIRTUAL) == mapped


def test_map_location_default_ports() -> None:
    backend, virtual = Origin("https", "10.1.1.1", 443), Origin("http", "v", 80)
    assert map_location(b"https://10.1.1.1/x", backend=backend, virtual=virtual) == b"http://v/x"
    ipv6 = Origin("http", "fd00::1", 8080)
    mapped = map_location(b"http://[fd00::1]:8080/x", backend=ipv6, virtual=virtual)
    assert mapped == b"http://v/x"


@pytest.mark.parametrize(
    ("cookie", "mapped"),
    [
        (b"a=1; Domain=erp.corp.local; Path=/", b"a=1; Domain=erp.virtual; Path=/"),
        (b"a=1; path=/; domain=.CORP.local", b"a=1; path=/; Domain=erp.virtual"),
        (b"a=1; Domain=elsewhere.example", b"a=1; Domain=elsewhere.example"),
        (b"a=1; Domain=p.erp.corp.local", b"a=1; Domain=p.erp.corp.local"),
        (b"a=erp.corp.local; Secure", b"a=erp.corp.local; Secure"),
    ],
)
def test_map_cookie_domain(cookie: bytes, mapped: bytes) -> None:
    assert map_cookie_domain(cookie, internal_host=INTERNAL.host, virtual_host=VHOST) == mapped


def test_response_headers() -> None:
    received = [
        (b"connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authenticate", b"Basic"),
        (b"upgrade", b"h2c"),
        (b"location", b"http://erp.corp.local:8080/"),
        (b"trailer", b"x-sum"),
    ]
    assert response_headers(received, status=302, backend=INTERNAL, virtual=VIRTUAL) == [
        (b"location", b"http://erp.virtual:8000/"),
        (b"trailer", b"x-sum"),
    ]
    switching = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-x", b"1")]
    assert response_headers(switching, status=101, backend=INTERNAL, virtual=VIRTUAL) == [
        (b"sec-x", b"1"),
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
    ]


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        (b"erp.virtual:8000", True),
        (b"ERP.Virtual:8000", True),
        (b"erp.virtual", False),
        (b"erp.virtual:80", False),
        (b"erp.virtual:8000x", False),
        (b"other:8000", False),
        (b":8000", False),
        (b"erp.virtual\xff:8000", False),
    ],
)
def test_host_matches(host: bytes, matches: bool) -> None:
    assert host_matches(host, VIRTUAL) is matches


def test_host_matches_default_port_and_ipv6() -> None:
    assert host_matches(b"v", Origin("http", "v", 80))
    assert host_matches(b"v:", Origin("http", "v", 80))
    assert host_matches(b"[fd00::1]:81", Origin("http", "fd00::1", 81))
    assert not host_matches(b"[fd00::1]x", Origin("http", "fd00::1", 80))


def test_has_body() -> None:
    assert not has_body([(b"host", b"h")])
    assert not has_body([(b"content-length", b"0")])
    assert has_body([(b"content-length", b"1")])
    assert has_body([(b"transfer-encoding", b"chunked")])


async def test_request_then_half_close_is_still_answered(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        await h.client.start("POST", "/public/last", [("content-length", "3")])
        await h.client.send(h11.Data(data=b"end"))
        await h.client.send(h11.EndOfMessage())
        await h.stream.send_eof()
        reply = await h.client.reply()
        assert await h.stream.receive_some() == b""
        await h.done.wait()
    assert reply.status == 200
    assert reply.json()["size"] == 3


@pytest.mark.parametrize("client_ip", ["", "10.0.0.9\r\nx-injected: 1", 12, None, "ü"])
def test_implausible_client_ip_is_not_forwarded(client_ip: object) -> None:
    headers = request_headers(
        [(b"host", b"h")],
        host_mode="virtual",
        internal=INTERNAL,
        virtual=VIRTUAL,
        client_ip=client_ip,
        scheme="http",
        websocket=False,
    )
    assert headers == [(b"host", b"h"), (b"x-forwarded-proto", b"http")]


# --------------------------------------------------------------------------- review regressions


async def test_only_websocket_may_take_over_the_connection() -> None:
    """A backend that switches a WebSocket-enabled path to h2c (or anything else) would let the
    client send requests past the resource rules: the connector refuses to splice."""
    seen: list[bytes] = []
    backend_done = trio.Event()

    async def h2c_backend(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            seen.append(request)
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
            )
            seen.append(await stream.receive_some(4096))
            backend_done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, h2c_backend, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            async with http_stream(port) as h:
                upgrade = [
                    ("upgrade", "websocket, h2c"),
                    ("connection", "Upgrade"),
                    ("http2-settings", "AAMAAABkAAQAAP__"),
                ]
                await h.client.start("GET", "/ws/x", upgrade)
                await h.client.send(h11.EndOfMessage())
                reply = await h.client.reply()
                await backend_done.wait()  # the backend connection ends without client bytes
        nursery.cancel_scope.cancel()
    assert reply.status == 502
    assert seen[1] == b""
    head = seen[0].lower()
    assert b"upgrade: websocket\r\n" in head
    assert b"h2c" not in head
    assert b"http2-settings" not in head


async def test_forged_forwarding_headers_do_not_reach_the_backend(backend: Backend) -> None:
    forged = [
        ("forwarded", "for=10.0.0.1;host=admin.internal"),
        ("x-forwarded-host", "admin.internal"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-real-ip", "10.0.0.1"),
        ("x-forwarded-proto", "https"),
    ]
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", "/public/h", forged)
    headers = dict(reply.json()["headers"])
    for name in (
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
    ):
        assert name not in headers
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == CLIENT_IP


async def test_the_query_stays_out_of_the_audit_trail(backend: Backend) -> None:
    async with http_stream(backend.port) as h:
        reply = await h.client.request("GET", "/private/x?api_key=s3cr3t-key")
    assert reply.status == 403
    (denial,) = h.audit.denials_seen
    assert denial["path"] == "/private/x"
    assert "s3cr3t-key" not in repr(h.audit.denials_seen)
