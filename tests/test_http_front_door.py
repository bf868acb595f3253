"""The HTTP plugin's gateway side: the forward proxy and destinations front doors, run against a
fake GatewayServices whose streams cross two real Tunnels (tests/tunnel_pair.py) to a tiny h11
"connector". Clients are curl, urllib (in a thread) and raw sockets for the hostile cases."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from backchannel import (
    AppIdentity,
    AuditLog,
    AuthenticationError,
    ConfigError,
    GatewayContext,
    HostPort,
    NotConnectedError,
    ResetCode,
    Role,
    TableReader,
    TunnelStream,
)
from backchannel_http._destinations import Destination, parse_destination_url
from backchannel_http._front_door import (
    HttpDestinationsFrontDoor,
    HttpProxyFrontDoor,
    front_doors,
    skip_gateway_keys,
)
from backchannel_http._relay import HeadScanner, HttpLimits
from tests.tunnel_pair import TunnelPair, tunnel_pair

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
BLOCK = random.Random(7).randbytes(1 << 20)
AUTH = "Basic " + base64.b64encode(b"acme/crm:secret").decode()
REFUSALS = {
    "denied.virtual": (ResetCode.ACCESS_DENIED, "no system mapping for denied.virtual:80"),
    "unsupported.virtual": (ResetCode.UNSUPPORTED_PROTOCOL, "mapping protocol is tcp"),
    "down.virtual": (ResetCode.BACKEND_UNREACHABLE, "connection refused"),
    "slow.virtual": (ResetCode.BACKEND_TIMEOUT, "connect timed out"),
    "busy.virtual": (ResetCode.REFUSED, "too many streams"),
}


def payload(total: int) -> Iterator[bytes]:
    """``total`` reproducible bytes in pieces of at most 1 MiB."""
    for start in range(0, total, len(BLOCK)):
        yield BLOCK[: min(len(BLOCK), total - start)]


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- fakes


@dataclass
class Seen:
    """What reached the fake connector."""

    streams: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    ended: list[trio.Event] = field(default_factory=list)


class FakeServices:
    """GatewayServices whose streams cross a real tunnel pair."""

    def __init__(self, pair: TunnelPair, connected: set[tuple[str, str]]) -> None:
        self.audit = AuditLog(Role.GATEWAY)
        self._pair = pair
        self._connected = connected

    def authenticate_basic(self, username: str, password: str) -> AppIdentity:
        apps = {"acme/crm": "secret", "globex/shop": "pw"}
        if apps.get(username) != password:
            raise AuthenticationError(f"invalid app credentials for {username!r}")
        subaccount, _, app = username.partition("/")
        return AppIdentity(subaccount, app)

    def authenticate_bearer(self, token: str) -> AppIdentity:
        if token != "token-acme-crm":
            raise AuthenticationError("invalid app token")
        return AppIdentity("acme", "crm")

    def app_for_forward(self, subaccount: str, name: str) -> AppIdentity:
        return AppIdentity(subaccount, f"forward:{name}")

    def has_subaccount(self, subaccount: str) -> bool:
        return subaccount in {"acme", "globex"}

    async def open_stream(
        self,
        app: AppIdentity,
        *,
        protocol: str,
        target: HostPort,
        location: str = "",
        principal: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        wait_accepted: bool = True,
        first_data: bytes = b"",
    ) -> TunnelStream:
        if (app.subaccount, location) not in self._connected:
            raise NotConnectedError(app.subaccount, location)
        metadata = {
            "protocol": protocol,
            "host": target.host,
            "port": target.port,
            "subaccount": app.subaccount,
            "location": location,
            "app": app.app,
            "attributes": dict(attributes or {}),
        }
        if principal is not None:
            metadata["principal"] = principal
        return await self._pair.gateway.open_stream(
            metadata, wait_accepted=wait_accepted, first_data=first_data
        )


async def _next(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(bytes(await stream.receive_some(256 * 1024)))
    return event


async def _respond(
    conn: h11.Connection,
    stream: TunnelStream,
    status: int,
    body: bytes,
    headers: Sequence[tuple[str, str]] = (),
    *,
    head_request: bool = False,
) -> None:
    head = [("Content-Length", str(len(body))), *headers]
    data = conn.send(h11.Response(status_code=status, headers=head)) or b""
    if body and conn.our_state is h11.SEND_BODY and not head_request:
        data += conn.send(h11.Data(data=body)) or b""
    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))


async def fake_connector(pair: TunnelPair, seen: Seen) -> None:
    """Accepts (or refuses, by virtual host) every stream and serves HTTP on it."""
    async with trio.open_nursery() as nursery:
        async for stream in pair.accepted:
            refusal = REFUSALS.get(stream.metadata["host"])
            if refusal is not None:
                await stream.reset(*refusal)
                continue
            seen.streams.append(stream.metadata)
            seen.ended.append(trio.Event())
            await stream.accept()
            nursery.start_soon(serve_stream, stream, seen, len(seen.streams) - 1)


async def serve_stream(stream: TunnelStream, seen: Seen, index: int) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request = await _next(conn, stream)
            if not isinstance(request, h11.Request):
                return
            if not await handle_request(conn, stream, request, seen, index):
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await stream.aclose()
        seen.ended[index].set()


async def handle_request(
    conn: h11.Connection, stream: TunnelStream, request: h11.Request, seen: Seen, index: int
) -> bool:
    """Serve one request; False ends the stream."""
    target = request.target.decode()
    headers = [(k.decode(), v.decode()) for k, v in request.headers.raw_items()]
    record: dict[str, Any] = {"method": request.method.decode(), "target": target}
    record |= {"headers": headers, "stream": index}
    seen.requests.append(record)
    if target.startswith("/websocket"):
        assert isinstance(await _next(conn, stream), h11.EndOfMessage)
        switch = h11.InformationalResponse(
            status_code=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]
        )
        await stream.send_all((conn.send(switch) or b"") + conn.trailing_data[0].upper())
        while data := await stream.receive_some(65536):
            await stream.send_all(data.upper())
        await stream.send_eof()
        return False
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(
            conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        )
    if target == "/reset-before-head":
        await stream.reset(ResetCode.BACKEND_UNREACHABLE, "the backend closed the connection")
        return False
    if target == "/early-403":
        await _respond(conn, stream, 403, b"not you\n")
        return False
    digest, length, start, trailers = hashlib.sha256(), 0, b"", []
    while not isinstance(event := await _next(conn, stream), h11.EndOfMessage):
        digest.update(event.data)
        length += len(event.data)
        start = (start + event.data)[:4096]
    trailers = [(k.decode(), v.decode()) for k, v in event.headers]
    record |= {
        "body_sha256": digest.hexdigest(),
        "body_length": length,
        "body": start.decode("latin-1"),
    }
    record |= {"trailers": trailers}
    if target == "/forbidden":
        await _respond(conn, stream, 403, b"the connector denies path /forbidden\n")
    elif target.startswith("/status/"):
        await _respond(conn, stream, int(target.rsplit("/", 1)[1]), b"status\n")
    elif target.startswith(("/download", "/reset")):
        total = int(target.rsplit("/", 1)[1])
        chunked = "chunked" in target
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[framing])) or b"")
        if target.startswith("/reset"):
            # Half the body, more than the credit window: once send_all returns, the gateway
            # has read (and relayed) the response head, so the reset comes mid-body.
            for chunk in payload(total // 2):
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            await stream.reset(ResetCode.BACKEND_UNREACHABLE, "the backend died mid-response")
            return False
        for chunk in payload(total):
            await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    elif target == "/trailers":
        head = h11.Response(
            status_code=200, headers=[("Transfer-Encoding", "chunked"), ("Trailer", "X-Sum")]
        )
        data = (conn.send(head) or b"") + (conn.send(h11.Data(data=b"body")) or b"")
        await stream.send_all(
            data + (conn.send(h11.EndOfMessage(headers=[("X-Sum", "42")])) or b"")
        )
    elif target == "/close":
        await _respond(conn, stream, 200, b"bye\n", [("Connection", "close")])
        return False
    else:
        echo = json.dumps({**record, "attributes": seen.streams[index]["attributes"]}).encode()
        content_type = [("Content-Type", "application/json")]
        await _respond(
            conn, stream, 200, echo, content_type, head_request=request.method == b"HEAD"
        )
        return target != "/vanish"  # /vanish: answer, then drop the kept-alive stream silently
    return True


@dataclass
class Env:
    services: FakeServices
    seen: Seen
    proxy: int
    destinations: int
    pair: TunnelPair


CONNECTED = frozenset({("acme", ""), ("acme", "loc1"), ("acme", "loc2"), ("globex", "")})


@asynccontextmanager
async def running(
    limits: HttpLimits = HttpLimits(),  # noqa: B008  # frozen
    destinations: Sequence[Destination] = (),
) -> AsyncIterator[Env]:
    async with tunnel_pair(accept=False) as pair, trio.open_nursery() as nursery:
        seen = Seen()
        services = FakeServices(pair, set(CONNECTED))
        nursery.start_soon(fake_connector, pair, seen)
        listen = HostPort("127.0.0.1", 0)
        [proxy] = await nursery.start(HttpProxyFrontDoor(services, listen, limits).serve)
        door = HttpDestinationsFrontDoor(services, listen, destinations, limits)
        [dests] = await nursery.start(door.serve)
        yield Env(services, seen, proxy.port, dests.port, pair)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------- clients


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data``, read everything until the gateway closes the connection."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            received = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # reset after the answer: the answer is what counts
            return bytes(received)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


class Client:
    """An h11 client on one connection (keep-alive)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        with trio.fail_after(10):
            if self.conn.our_state is h11.DONE:
                self.conn.start_next_cycle()
            host = target.split("/")[2] if "://" in target else "x"
            all_headers = [("Host", host), *headers]
            if body:
                all_headers.append(("Content-Length", str(len(body))))
            data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
            data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"") if body else data
            await self.stream.send_all((data or b"") + (self.conn.send(h11.EndOfMessage()) or b""))
            response = await _next(self.conn, self.stream)
            while isinstance(response, h11.InformationalResponse):
                response = await _next(self.conn, self.stream)
            assert isinstance(response, h11.Response), response
            content = bytearray()
            while isinstance(event := await _next(self.conn, self.stream), h11.Data):
                content += event.data
            assert isinstance(event, h11.EndOfMessage), event
            return response, bytes(content)


@asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield Client(stream)


async def curl(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    proxy = ["-x", f"http://127.0.0.1:{port}", "--noproxy", "", "-sS"]
    command = [CURL, *proxy, "--proxy-user", "acme/crm:secret", *args]
    with trio.fail_after(60):
        return await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )


def urllib_fetch(
    port: int, url: str, data: bytes | None = None, user: str = "acme%2Fcrm:secret"
) -> tuple[int, bytes]:
    proxies = {"http": f"http://{user}@127.0.0.1:{port}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(urllib.request.Request(url, data=data), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


@pytest.fixture(autouse=True)
def _no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------- routing


@needs_curl
async def test_curl_get_is_rewritten_to_origin_form_on_the_virtual_host() -> None:
    async with running() as env:
        location = "SAP-Connectivity-SCC-Location_ID: loc1"
        done = await curl(env.proxy, "-H", location, "http://ERP.virtual:8000/x/y?q=1&r=2")
        assert done.returncode == 0, done.stderr
        echo = json.loads(done.stdout)
        assert echo["method"] == "GET"
        assert echo["target"] == "/x/y?q=1&r=2"
        assert echo["headers"][0] == ["Host", "erp.virtual:8000"]
        assert echo["attributes"] == {"client_ip": "127.0.0.1", "scheme": "http"}
        [stream] = env.seen.streams
        assert (stream["host"], stream["port"], stream["location"]) == ("erp.virtual", 8000, "loc1")
        assert (stream["protocol"], stream["subaccount"], stream["app"]) == ("http", "acme", "crm")


async def test_control_and_hop_by_hop_headers_are_stripped() -> None:
    async with running() as env, client(env.proxy) as c:
        headers = [
            ("Proxy-Authorization", AUTH),
            ("SAP-Connectivity-SCC-Location_ID", "loc2"),
            ("X-Backchannel-Location", "loc2"),
            ("SAP-Connectivity-Authentication", "Bearer user-jwt"),
            ("Connection", "keep-alive, X-Secret, content-length"),
            ("X-Secret", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("X-End-To-End", "kept"),
        ]
        response, body = await c.request("POST", "http://erp.virtual/p", headers, b"hello")
        assert response.status_code == 200
        echo = json.loads(body)
        names = [name.lower() for name, _ in echo["headers"]]
        assert names == ["host", "te", "x-end-to-end", "content-length"]
        assert echo["headers"][0] == ["Host", "erp.virtual"]  # port 80 omitted
        assert echo["headers"][1] == ["TE", "trailers"]
        assert echo["body"] == "hello"
        assert env.seen.streams[0]["location"] == "loc2"
        # The user's token travels to the connector in the OPEN, not as a header.
        assert env.seen.streams[0]["principal"] == "Bearer user-jwt"


async def test_each_user_token_gets_its_own_stream() -> None:
    async with running() as env, client(env.proxy) as c:
        for token in ("Bearer alice-jwt", "bearer bob-jwt", "Bearer alice-jwt"):
            headers = [("Proxy-Authorization", AUTH), ("SAP-Connectivity-Authentication", token)]
            response, _ = await c.request("GET", "http://erp.virtual/p", headers, b"")
            assert response.status_code == 200
        response, _ = await c.request(
            "GET", "http://erp.virtual/p", [("Proxy-Authorization", AUTH)], b""
        )
        assert response.status_code == 200
    principals = [stream.get("principal") for stream in env.seen.streams]
    assert principals == ["Bearer alice-jwt", "Bearer bob-jwt", "Bearer alice-jwt", None]


@pytest.mark.parametrize(
    "values",
    [["Basic dXNlcjpwdw=="], ["Bearer"], ["Bearer a", "Bearer b"], ["Bearer " + "x" * 50_000]],
    ids=["wrong-scheme", "no-token", "repeated", "too-long"],
)
async def test_malformed_user_token_header_is_refused(values: list[str]) -> None:
    async with running() as env, client(env.proxy) as c:
        headers = [("Proxy-Authorization", AUTH)]
        headers += [("SAP-Connectivity-Authentication", value) for value in values]
        response, body = await c.request("GET", "http://erp.virtual/p", headers, b"")
    assert response.status_code in (400, 431)
    assert b"SAP-Connectivity-Authentication" in body
    assert env.seen.streams == []


async def test_urllib_client_library_get_and_post() -> None:
    async with running() as env:
        status, body = await trio.to_thread.run_sync(
            urllib_fetch, env.proxy, "http://erp.virtual:8000/lib?a=1"
        )
        assert status == 200
        assert json.loads(body)["target"] == "/lib?a=1"
        status, body = await trio.to_thread.run_sync(
            urllib_fetch, env.proxy, "http://erp.virtual:8000/post", b"x" * 100_000
        )
        assert status == 200
        assert json.loads(body)["body_length"] == 100_000
        status, body = await trio.to_thread.run_sync(
            lambda: urllib_fetch(env.proxy, "http://erp.virtual/", user="acme%2Fcrm:wrong")
        )
        assert status == 407


async def test_bearer_app_token() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", "Bearer token-acme-crm")]
        response, _ = await c.request("GET", "http://erp.virtual/t", auth)
        assert response.status_code == 200


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("request_line", "status", "phrase"),
    [
        (b"GET https://erp.virtual/x HTTP/1.1", 405, b"connector speaks TLS"),
        (b"CONNECT erp.virtual:443 HTTP/1.1", 405, b"connector speaks TLS"),
        (b"GET /x HTTP/1.1", 400, b"absolute URL"),
        (b"GET ftp://erp.virtual/x HTTP/1.1", 400, b"only http://"),
        (b"GET http://user@erp.virtual/x HTTP/1.1", 400, b"invalid host"),
        (b"GET http://erp.virtual:99999/x HTTP/1.1", 400, b"invalid port"),
    ],
)
async def test_unroutable_targets(request_line: bytes, status: int, phrase: bytes) -> None:
    async with running() as env:
        head = request_line + b"\r\nHost: x\r\nProxy-Authorization: " + AUTH.encode()
        answer = await raw(env.proxy, head + b"\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == status
        assert phrase in answer
        assert env.seen.streams == []


@pytest.mark.parametrize(
    "credentials",
    [None, "Basic " + base64.b64encode(b"acme/crm:wrong").decode(), "Basic !!!", "Bearer nope"],
)
async def test_missing_or_bad_proxy_credentials_get_407(credentials: str | None) -> None:
    async with running() as env, client(env.proxy) as c:
        headers = [("Proxy-Authorization", credentials)] if credentials else []
        response, _ = await c.request("GET", "http://erp.virtual/x", headers)
        assert response.status_code == 407
        assert (b"proxy-authenticate", b'Basic realm="backchannel"') in response.headers
        assert env.services.audit.denials == 1
        # The connection stays usable: the client retries with credentials on it.
        response, _ = await c.request(
            "GET", "http://erp.virtual/x", [("Proxy-Authorization", AUTH)]
        )
        assert response.status_code == 200
        assert len(env.seen.requests) == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("SAP-Connectivity-SCC-Location_ID", "loc1"), ("X-Backchannel-Location", "loc2")],
        [("SAP-Connectivity-SCC-Location_ID", "bad location!")],
    ],
)
async def test_bad_location_headers_get_400(headers: list[tuple[str, str]]) -> None:
    async with running() as env, client(env.proxy) as c:
        response, body = await c.request(
            "GET", "http://erp.virtual/", [("Proxy-Authorization", AUTH), *headers]
        )
        assert response.status_code == 400
        assert b"location id" in body
        assert env.seen.streams == []


async def test_no_connector_gets_503_naming_subaccount_and_location() -> None:
    async with running() as env, client(env.proxy) as c:
        headers = [("Proxy-Authorization", AUTH), ("X-Backchannel-Location", "berlin")]
        response, body = await c.request("GET", "http://erp.virtual/", headers)
        assert response.status_code == 503
        assert b"'acme'" in body
        assert b"'berlin'" in body


@pytest.mark.parametrize(
    ("host", "status", "phrase"),
    [
        ("denied.virtual", 403, b"no system mapping for denied.virtual:80"),
        ("unsupported.virtual", 502, b"mapping protocol is tcp"),
        ("down.virtual", 502, b"connection refused"),
        ("slow.virtual", 504, b"connect timed out"),
        ("busy.virtual", 503, b"too many streams"),
    ],
)
async def test_stream_refusals_map_to_statuses(host: str, status: int, phrase: bytes) -> None:
    async with running() as env, client(env.proxy) as c:
        response, body = await c.request("GET", f"http://{host}/", [("Proxy-Authorization", AUTH)])
        assert response.status_code == status
        assert phrase in body


async def test_connector_403_passes_through_and_keep_alive_continues() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        response, body = await c.request("GET", "http://erp.virtual/forbidden", auth)
        assert response.status_code == 403
        assert body == b"the connector denies path /forbidden\n"
        response, _ = await c.request("GET", "http://erp.virtual/fine", auth)
        assert response.status_code == 200
        assert len(env.seen.streams) == 1


# ------------------------------------------------------------------------------- limits


def _head(extra: bytes = b"", target: bytes = b"http://erp.virtual/") -> bytes:
    head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nProxy-Authorization: " + AUTH.encode()
    return head + b"\r\n" + extra + b"\r\n"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (_head(target=b"http://erp.virtual/" + b"a" * 8200), 414),
        (b"GET http://erp.virtual/" + b"a" * 9000, 414),  # still incomplete
        (_head(b"X-Big: " + b"b" * 66_000 + b"\r\n"), 431),
        (_head(b"".join(b"X-%d: v\r\n" % i for i in range(101))), 431),
    ],
)
async def test_limits(data: bytes, status: int) -> None:
    async with running() as env:
        answer = await raw(env.proxy, data)
        assert status_of(answer) == status
        assert env.seen.streams == []


async def test_limits_at_the_boundary_pass() -> None:
    async with running() as env, client(env.proxy) as c:
        headers = [("Proxy-Authorization", AUTH), *((f"X-{i}", "v") for i in range(98))]
        response, _ = await c.request("GET", "http://erp.virtual/" + "a" * 8000, headers)
        assert response.status_code == 200


async def test_slow_client_is_closed_after_header_timeout() -> None:
    async with running(HttpLimits(header_timeout=0.2)) as env:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", env.proxy)
            async with stream:
                await stream.send_all(b"GET http://erp.virtual/ HTTP/1.1\r\nHost: x\r\n")
                answer = bytearray()
                while chunk := await stream.receive_some(4096):
                    answer += chunk
        assert status_of(bytes(answer)) == 408
        assert env.seen.streams == []


SMUGGLING = {
    "cl-and-te": b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "duplicate-cl": b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "different-cl": b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-list": b"Content-Length: 3, 3\r\n\r\nabc",
    "two-te": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"X-A: 1\r\n  folded\r\n\r\n",
    "bare-lf": b"X-A: 1\nX-B: 2\r\n\r\n",
    "bare-cr": b"X-A: 1\rX-B: 2\r\n\r\n",
    "space-before-colon": b"Content-Length : 3\r\n\r\nabc",
    "bad-cl": b"Content-Length: +3\r\n\r\nabc",
    "chunk-size-hex-prefix": b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-negative": b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-garbage": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-without-crlf": b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
    "nul-in-header": b"X-A: a\x00b\r\n\r\n",
    "escape-in-header": b"X-A: a\x1b[31mb\r\n\r\n",
    "del-in-header": b"X-A: a\x7fb\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
async def test_malformed_and_smuggling_prone_requests_get_400(case: str) -> None:
    async with running() as env:
        head = b"POST http://erp.virtual/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: "
        answer = await raw(env.proxy, head + AUTH.encode() + b"\r\n" + SMUGGLING[case])
        assert status_of(answer) == 400, answer
        assert answer.count(b"HTTP/1.1") == 1  # and the connection was closed after it
        assert env.seen.streams == []
        assert env.seen.requests == []


async def test_unknown_transfer_coding_gets_501() -> None:
    async with running() as env:
        answer = await raw(env.proxy, _head(b"Transfer-Encoding: gzip, chunked\r\n"))
        assert status_of(answer) == 501
        assert env.seen.streams == []


def test_head_scanner_byte_at_a_time_matches_whole() -> None:
    head = _head(b"X-A: 1\r\n")
    scanner = HeadScanner(HttpLimits())
    results = [scanner.feed(head[i : i + 1]) for i in range(len(head))]
    assert results == [None] * (len(head) - 1) + [len(head)]
    assert HeadScanner(HttpLimits()).feed(head + b"body") == len(head)


# ------------------------------------------------------------------------------- keep-alive


async def test_keep_alive_reuses_one_stream_and_switches_on_host_change() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        for i in range(100):
            response, body = await c.request("GET", f"http://erp.virtual:8000/n{i}", auth)
            assert response.status_code == 200
            assert json.loads(body)["target"] == f"/n{i}"
        assert len(env.seen.streams) == 1
        await c.request("GET", "http://crm.virtual:8000/a", auth)
        await c.request("GET", "http://crm.virtual:8001/b", auth)
        await c.request(
            "GET", "http://crm.virtual:8001/c", [*auth, ("X-Backchannel-Location", "loc1")]
        )
        response, body = await c.request("GET", "http://erp.virtual:8000/back", auth)
        assert json.loads(body)["stream"] == 4
        hosts = [(s["host"], s["port"], s["location"]) for s in env.seen.streams]
        assert hosts == [
            ("erp.virtual", 8000, ""),
            ("crm.virtual", 8000, ""),
            ("crm.virtual", 8001, ""),
            ("crm.virtual", 8001, "loc1"),
            ("erp.virtual", 8000, ""),
        ]
        assert len(env.seen.requests) == 104


@needs_curl
async def test_curl_reuses_its_connection_and_the_stream() -> None:
    async with running() as env:
        done = await curl(env.proxy, "http://erp.virtual/g[1-20]", "http://other.virtual/h")
        assert done.returncode == 0, done.stderr
        assert [s["host"] for s in env.seen.streams] == ["erp.virtual", "other.virtual"]


async def test_connector_closing_a_kept_alive_stream_is_retried_on_a_new_one() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        response, _ = await c.request("GET", "http://erp.virtual/vanish", auth)
        assert response.status_code == 200
        response, body = await c.request("GET", "http://erp.virtual/after", auth)
        assert response.status_code == 200
        assert json.loads(body)["stream"] == 1


async def test_connection_close_from_connector_keeps_the_client_connection() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        response, body = await c.request("GET", "http://erp.virtual/close", auth)
        assert body == b"bye\n"
        assert (b"connection", b"close") not in response.headers
        response, _ = await c.request("GET", "http://erp.virtual/next", auth)
        assert response.status_code == 200
        assert len(env.seen.streams) == 2


async def test_trailers_and_head_requests() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        await c.stream.send_all(
            c.conn.send(
                h11.Request(
                    method="GET",
                    target="http://erp.virtual/trailers",
                    headers=[("Host", "x"), *auth],
                )
            )
            + c.conn.send(h11.EndOfMessage())
        )
        events = []
        while not isinstance(event := await _next(c.conn, c.stream), h11.EndOfMessage):
            events.append(event)
        assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"body"
        assert list(event.headers) == [(b"x-sum", b"42")]
        response, body = await c.request("HEAD", "http://erp.virtual/head", auth)
        assert response.status_code == 200
        assert body == b""
        response, _ = await c.request("GET", "http://erp.virtual/again", auth)
        assert response.status_code == 200
        assert len(env.seen.streams) == 1


async def test_http_1_0_client_and_pipelined_requests() -> None:
    async with running() as env:
        auth = b"Proxy-Authorization: " + AUTH.encode() + b"\r\n"
        answer = await raw(env.proxy, b"GET http://erp.virtual/old HTTP/1.0\r\n" + auth + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"][0] == ["Host", "erp.virtual"]
        one = b"GET http://erp.virtual/one HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
        two = b"GET http://erp.virtual/two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth
        answer = await raw(env.proxy, one + two + b"\r\n")
        assert answer.count(b"HTTP/1.1 200") == 2
        assert [r["target"] for r in env.seen.requests] == ["/old", "/one", "/two"]
        assert [r["stream"] for r in env.seen.requests] == [0, 1, 1]


async def test_100_continue_is_relayed_before_the_body_is_sent() -> None:
    async with running() as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.proxy)
        async with stream:
            head = b"PUT http://erp.virtual/wait HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            head += b"Expect: 100-continue\r\nProxy-Authorization: " + AUTH.encode() + b"\r\n\r\n"
            await stream.send_all(head)
            answer = bytearray()
            with trio.fail_after(10):  # without the relayed 100 this would wait forever
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some(4096)
                assert answer.startswith(b"HTTP/1.1 100")
                await stream.send_all(b"hello")
                while b"hello" not in answer:
                    answer += await stream.receive_some(4096)
        assert b"HTTP/1.1 200" in answer


async def test_chunked_upload_with_trailers() -> None:
    async with running() as env:
        head = b"POST http://erp.virtual/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        head += b"Connection: close\r\nProxy-Authorization: " + AUTH.encode() + b"\r\n\r\n"
        answer = await raw(env.proxy, head + b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: 7\r\n\r\n")
        echo = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert echo["body"] == "abcde"
        assert echo["trailers"] == [["x-check", "7"]]


async def test_client_leaving_mid_download_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.proxy)
        with trio.fail_after(10):
            async with stream:
                head = b"GET http://erp.virtual/download/%d HTTP/1.1\r\nHost: x\r\n" % BIG
                await stream.send_all(head + b"Proxy-Authorization: " + AUTH.encode() + b"\r\n\r\n")
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            await env.seen.ended[0].wait()  # the gateway closed the tunnel stream
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# ------------------------------------------------------------------------------- bodies


BIG = 64 * 1024 * 1024
#: The fake connector sends half of it, several credit windows, then resets.
RESET_SIZE = 8_000_000


@needs_curl
@pytest.mark.parametrize("chunked", [False, True])
async def test_64_mib_upload_streams_with_equal_sha256(tmp_path: Path, chunked: bool) -> None:
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as file:
        for chunk in payload(BIG):
            file.write(chunk)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    async with running() as env:
        done = await curl(env.proxy, "-T", str(upload), *extra, "http://erp.virtual/upload")
        assert done.returncode == 0, done.stderr
        echo = json.loads(done.stdout)
        assert echo["method"] == "PUT"
        assert echo["body_length"] == BIG
        assert echo["body_sha256"] == sha256_of(payload(BIG))
        framing = {k.lower(): v for k, v in echo["headers"]}
        assert ("transfer-encoding" in framing) is chunked
        # curl sends Expect: 100-continue for big uploads; the connector's 100 was relayed
        # (curl would otherwise wait a second and say nothing, so check the header went).
        assert framing.get("expect") == "100-continue"


@needs_curl
@pytest.mark.parametrize("kind", ["download", "download-chunked"])
async def test_64_mib_download_streams_with_equal_sha256(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "download.bin"
    async with running() as env:
        done = await curl(env.proxy, "-o", str(target), f"http://erp.virtual/{kind}/{BIG}")
        assert done.returncode == 0, done.stderr
    assert target.stat().st_size == BIG
    with target.open("rb") as file:
        assert sha256_of(iter(lambda: file.read(1 << 20), b"")) == sha256_of(payload(BIG))


@needs_curl
@pytest.mark.parametrize("kind", ["reset", "reset-chunked"])
async def test_reset_mid_body_is_a_truncation_curl_detects(kind: str) -> None:
    async with running() as env:
        done = await curl(env.proxy, "-o", os.devnull, f"http://erp.virtual/{kind}/{RESET_SIZE}")
        assert done.returncode in (18, 56), (done.returncode, done.stderr)


async def test_reset_mid_body_never_completes_the_message() -> None:
    async with running() as env:
        head = b"GET http://erp.virtual/reset-chunked/%d HTTP/1.1\r\nHost: x\r\n" % RESET_SIZE
        answer = await raw(env.proxy, head + b"Proxy-Authorization: " + AUTH.encode() + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
        assert not answer.endswith(b"0\r\n\r\n")
        assert len(answer) < RESET_SIZE


async def test_reset_before_the_response_head_is_a_502_with_the_reason() -> None:
    async with running() as env, client(env.proxy) as c:
        auth = [("Proxy-Authorization", AUTH)]
        response, body = await c.request("GET", "http://erp.virtual/reset-before-head", auth)
        assert response.status_code == 502
        assert b"the backend closed the connection" in body
        response, _ = await c.request("GET", "http://erp.virtual/fine", auth)
        assert response.status_code == 200
        assert len(env.seen.streams) == 2


async def test_early_answer_to_an_upload_closes_the_connection() -> None:
    async with running() as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.proxy)
        async with stream:
            head = b"PUT http://erp.virtual/early-403 HTTP/1.1\r\nHost: x\r\n"
            head += b"Content-Length: 10000000\r\nProxy-Authorization: " + AUTH.encode()
            await stream.send_all(head + b"\r\n\r\n")
            await stream.send_all(b"x" * 100_000)
            answer = bytearray()
            with trio.fail_after(10):
                try:
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
        assert answer.startswith(b"HTTP/1.1 403")
        assert answer.endswith(b"not you\n")


async def test_websocket_upgrade_is_spliced() -> None:
    async with running() as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.proxy)
        async with stream:
            head = (
                b"GET http://erp.virtual/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\nProxy-Authorization: " + AUTH.encode() + b"\r\n\r\n"
            )
            await stream.send_all(head + b"early bytes ")
            answer = bytearray()
            with trio.fail_after(10):
                while b"EARLY BYTES " not in answer:
                    answer += await stream.receive_some(4096)
                await stream.send_all(b"and more")
                while not answer.endswith(b"AND MORE"):
                    answer += await stream.receive_some(4096)
                await stream.send_eof()
                assert await stream.receive_some(4096) == b""
        assert answer.startswith(b"HTTP/1.1 101 ")
        names = [
            line.split(b":")[0].lower() for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        ]
        assert sorted(names) == [b"connection", b"upgrade"]
        request = env.seen.requests[0]
        seen_names = {name.lower() for name, _ in request["headers"]}
        assert {"upgrade", "connection", "sec-websocket-key"} <= seen_names
        assert "proxy-authorization" not in seen_names


# ------------------------------------------------------------------------------- destinations


def _destinations() -> list[Destination]:
    from backchannel import Secret

    erp, base = parse_destination_url("http://erp.virtual:8000/sap/opu/")
    return [
        Destination(
            "erp",
            "acme",
            erp,
            base,
            "loc1",
            "BasicAuthentication",
            "RFC_USER",
            Secret("s3cret", "test"),
        ),
        Destination("shop", "globex", HostPort("shop.virtual", 80), "", "", "NoAuthentication"),
    ]


async def test_destination_injects_basic_auth_and_rewrites_the_path() -> None:
    async with running(destinations=_destinations()) as env, client(env.destinations) as c:
        headers = [("Authorization", AUTH), ("X-Backchannel-Location", "loc2")]
        response, body = await c.request("POST", "/destinations/erp/api/x?q=1", headers, b"data")
        assert response.status_code == 200
        echo = json.loads(body)
        assert echo["target"] == "/sap/opu/api/x?q=1"
        expected = "Basic " + base64.b64encode(b"RFC_USER:s3cret").decode()
        assert [v for k, v in echo["headers"] if k.lower() == "authorization"] == [expected]
        assert echo["headers"][0] == ["Host", "erp.virtual:8000"]
        assert "x-backchannel-location" not in {k.lower() for k, _ in echo["headers"]}
        assert echo["attributes"]["destination"] == "erp"
        assert env.seen.streams[0]["location"] == "loc1"
        shop = "Basic " + base64.b64encode(b"globex/shop:pw").decode()
        async with client(env.destinations) as other:
            response, body = await other.request(
                "GET", "/destinations/shop", [("Authorization", shop)]
            )
        assert response.status_code == 200
        echo = json.loads(body)
        assert echo["target"] == "/"
        assert "authorization" not in {k.lower() for k, _ in echo["headers"]}


async def test_destinations_are_isolated_between_subaccounts() -> None:
    async with running(destinations=_destinations()) as env, client(env.destinations) as c:
        globex = [("Authorization", "Basic " + base64.b64encode(b"globex/shop:pw").decode())]
        other_tenant, body_a = await c.request("GET", "/destinations/erp/x", globex)
        unknown, body_b = await c.request("GET", "/destinations/nothing/x", globex)
        assert other_tenant.status_code == unknown.status_code == 404
        assert body_a.replace(b"erp", b"") == body_b.replace(b"nothing", b"")
        assert env.seen.streams == []


@pytest.mark.parametrize(
    ("target", "authorization", "status"),
    [
        ("/destinations/erp/x", None, 401),
        ("/destinations/erp/x", "Basic " + base64.b64encode(b"acme/crm:nope").decode(), 401),
        ("/destinations/erp/a/../../admin", AUTH, 400),
        ("/destinations/erp/%2e%2e/admin", AUTH, 400),
        ("/elsewhere", AUTH, 404),
    ],
)
async def test_destination_refusals(target: str, authorization: str | None, status: int) -> None:
    async with running(destinations=_destinations()) as env, client(env.destinations) as c:
        headers = [("Authorization", authorization)] if authorization else []
        response, _ = await c.request("GET", target, headers)
        assert response.status_code == status
        if status == 401:
            assert (b"www-authenticate", b'Basic realm="backchannel"') in response.headers
        assert env.seen.streams == []


# ------------------------------------------------------------------------------- config


def _context(table: dict[str, Any], tmp_path: Path) -> GatewayContext:
    reader = TableReader("gateway.toml", "plugins.http", table, tmp_path)
    return GatewayContext(services=FakeServices(None, set()), plugin_config={"http": reader})  # type: ignore[arg-type]


def test_front_doors_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_PASSWORD", "pw")
    table = {
        "proxy_listen": "127.0.0.1:0",
        "destinations_listen": "127.0.0.1:0",
        "max_headers": 50,
        "header_timeout": 5,
        "destinations": [
            {
                "name": "erp",
                "subaccount": "acme",
                "url": "http://erp.virtual:8000/base",
                "authentication": "BasicAuthentication",
                "user": "u",
                "password_env": "ERP_PASSWORD",
            }
        ],
    }
    doors = front_doors(_context(table, tmp_path))
    assert [door.name for door in doors] == ["http.proxy", "http.destinations"]
    assert front_doors(_context({}, tmp_path)) == []
    reader = TableReader("combined.toml", "plugins.http", table, tmp_path)
    skip_gateway_keys(reader)
    reader.finish()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"proxy_listen": "127.0.0.1:0", "typo": 1}, "plugins.http.typo"),
        ({"max_headers": 0}, "plugins.http.max_headers"),
        (
            {"destinations": [{"name": "e", "subaccount": "acme", "url": "http://e"}]},
            "plugins.http.destinations",
        ),
        (
            {
                "destinations_listen": "127.0.0.1:0",
                "destinations": [{"name": "e", "subaccount": "acme", "url": "https://e/"}],
            },
            "plugins.http.destinations[0].url",
        ),
        (
            {
                "destinations_listen": "127.0.0.1:0",
                "destinations": [{"name": "e", "subaccount": "nobody", "url": "http://e/"}],
            },
            "plugins.http.destinations[0].subaccount",
        ),
        (
            {
                "destinations_listen": "127.0.0.1:0",
                "destinations": [
                    {
                        "name": "e",
                        "subaccount": "acme",
                        "url": "http://e/",
                        "authentication": "BasicAuthentication",
                        "user": "u",
                    }
                ],
            },
            "plugins.http.destinations[0].password",
        ),
        (
            {
                "destinations_listen": "127.0.0.1:0",
                "destinations": [
                    {"name": "e", "subaccount": "acme", "url": "http://e/", "password": "p"}
                ],
            },
            "plugins.http.destinations[0].password",
        ),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        front_doors(_context(table, tmp_path))
    assert info.value.key == key
