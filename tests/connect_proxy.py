"""A small HTTP CONNECT proxy for tests (trio + h11), bound to 127.0.0.1 on an ephemeral port.

It only tunnels to 127.0.0.1 / localhost (anything else gets 403) so that no test can reach
another machine through it, requires Basic credentials when configured (407 otherwise),
answers 405 to anything but CONNECT, and records every request it parsed.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import h11
import trio

#: Targets the proxy will connect to; "localhost" is dialled as 127.0.0.1 so name resolution
#: can never send a test anywhere else.
ALLOWED_TARGET_HOSTS: Final = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class ProxyRecord:
    """One request the proxy parsed: method, request target, whether auth was sent, answer."""

    method: str
    target: str
    auth_seen: bool
    status: int


@dataclass(slots=True)
class ProxyServerHandle:
    """A running test proxy: its port and what it saw. ``close()`` stops it."""

    port: int
    cancel_scope: trio.CancelScope
    records: list[ProxyRecord] = field(default_factory=list)

    @property
    def connect_log(self) -> list[str]:
        """Targets (``host:port``) of every CONNECT request received, in order."""
        return [r.target for r in self.records if r.method == "CONNECT"]

    @property
    def auth_log(self) -> list[bool]:
        """For every CONNECT request, whether it carried a Proxy-Authorization header."""
        return [r.auth_seen for r in self.records if r.method == "CONNECT"]

    def url(self, *, scheme: str = "http", userinfo: str = "") -> str:
        """The proxy URL, e.g. ``url(userinfo="alice:secret@")``."""
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop accepting and tear down every open tunnel."""
        self.cancel_scope.cancel()


@dataclass(frozen=True, slots=True)
class _Config:
    expected_auth: bytes | None
    coalesce_first_chunk: bool
    ssl_context: ssl.SSLContext | None


def _split_target(target: str) -> tuple[str, int] | None:
    host, sep, port_text = target.rpartition(":")
    if not sep or not port_text.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    return (host, port) if 1 <= port <= 65535 else None


async def _send_response(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    body = f"{status}\n".encode()
    headers = [("Content-Length", str(len(body))), ("Connection", "close")]
    headers += extra_headers or []
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _read_request(
    stream: trio.abc.Stream, conn: h11.Connection
) -> tuple[h11.Request | None, bool]:
    """Read one request head and its (empty) body; returns (request, protocol_error)."""
    request: h11.Request | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None, True
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            continue  # a body on CONNECT makes no sense; drain and ignore it
        elif isinstance(event, h11.EndOfMessage):
            return request, False
        else:  # ConnectionClosed or PAUSED before a complete request
            return None, False


async def _splice(client: trio.abc.Stream, target: trio.SocketStream) -> None:
    """Copy both ways until both directions ended (or one side broke)."""

    async def one_way(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while data := await source.receive_some():
                await sink.send_all(data)
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()  # pass the EOF on; the other direction may go on
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # One side is gone, or the sink (TLS) cannot be half-closed: tear the tunnel down,
        # like a real proxy would.
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, client, target)
        nursery.start_soon(one_way, target, client)


async def _handle(handle: ProxyServerHandle, config: _Config, tcp: trio.SocketStream) -> None:
    client: trio.abc.Stream = tcp
    if config.ssl_context is not None:
        client = trio.SSLStream(tcp, config.ssl_context, server_side=True, https_compatible=True)
    try:
        await _serve_one(handle, config, client)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away (or failed the TLS handshake); nothing to report
    finally:
        await trio.aclose_forcefully(client)


async def _serve_one(handle: ProxyServerHandle, config: _Config, client: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    request, protocol_error = await _read_request(client, conn)
    if request is None:
        if protocol_error and conn.our_state is h11.SEND_RESPONSE:
            await _send_response(client, conn, 400)
        return
    method = request.method.decode("ascii", "replace")
    target = request.target.decode("ascii", "replace")
    auth = [value for name, value in request.headers if name == b"proxy-authorization"]

    def record(status: int) -> None:
        handle.records.append(ProxyRecord(method, target, bool(auth), status))

    if method != "CONNECT":
        record(405)
        await _send_response(client, conn, 405, [("Allow", "CONNECT")])
        return
    if config.expected_auth is not None and auth != [config.expected_auth]:
        record(407)
        await _send_response(client, conn, 407, [("Proxy-Authenticate", 'Basic realm="test"')])
        return
    parsed = _split_target(target)
    if parsed is None:
        record(400)
        await _send_response(client, conn, 400)
        return
    host, port = parsed
    address = ALLOWED_TARGET_HOSTS.get(host.lower())
    if address is None:
        record(403)
        await _send_response(client, conn, 403)
        return
    try:
        upstream = await trio.open_tcp_stream(address, port)
    except OSError:
        record(502)
        await _send_response(client, conn, 502)
        return
    async with upstream:
        record(200)
        head = conn.send(
            h11.Response(status_code=200, headers=[], reason=b"Connection established")
        )
        assert conn.our_state is h11.SWITCHED_PROTOCOL
        early, _ = conn.trailing_data  # bytes the client pipelined after its CONNECT head
        if early:
            await upstream.send_all(early)
        if config.coalesce_first_chunk:
            # Put the target's first bytes in the same write as the 200 so the client's parser
            # reads past the response head: exercises its trailing-data handling.
            head += await upstream.receive_some()
        await client.send_all(head)
        await _splice(client, upstream)


async def serve_connect_proxy(
    nursery: trio.Nursery,
    *,
    username: str | None = None,
    password: str | None = None,
    coalesce_first_chunk: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> ProxyServerHandle:
    """Start the proxy in ``nursery`` and return once it listens on 127.0.0.1.

    With ``username`` set, every CONNECT must carry matching Basic credentials. With
    ``coalesce_first_chunk`` the proxy waits for the target's first bytes and sends them in
    the same write as its 200 response (only for targets that speak first). With
    ``ssl_context`` (server side) it is an ``https://`` proxy.
    """
    expected_auth = None
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        expected_auth = f"Basic {token}".encode("ascii")
    config = _Config(expected_auth, coalesce_first_chunk, ssl_context)

    async def run(*, task_status: trio.TaskStatus[ProxyServerHandle]) -> None:
        with trio.CancelScope() as scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            handle = ProxyServerHandle(
                port=listeners[0].socket.getsockname()[1], cancel_scope=scope
            )
            task_status.started(handle)
            await trio.serve_listeners(partial(_handle, handle, config), listeners)

    handle: ProxyServerHandle = await nursery.start(run)
    return handle
