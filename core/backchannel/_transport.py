"""TLS + WebSocket under the tunnel, and the HELLO handshake on each side.

The connector dials ``wss://host:port/path`` (optionally through an HTTPS proxy), verifies the
gateway's certificate, and sends HELLO. The gateway terminates TLS, accepts the WebSocket upgrade
on its tunnel path only, reads HELLO, authenticates it, and answers HELLO or GO_AWAY.

TLS is a :class:`~backchannel._tlschannel.TlsChannel`; trio-websocket performs the WebSocket
upgrade over it, and the tunnel's messages then go through a
:class:`~backchannel._wslink.WebSocketLink` (our own framing, the same bytes on the wire).
Other WebSocket paths of the gateway (registration) stay with trio-websocket.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket

from ._dial import DialError, ProxySettings, open_tcp
from ._exceptions import TunnelError
from ._proto._errors import ProtocolError, ResetCode
from ._proto._events import GoAwayReceived, HelloReceived
from ._proto._mux import Mux
from ._tlschannel import TlsChannel
from ._tunnel import TunnelSettings
from ._wslink import HandshakeStream, WebSocketClosed, WebSocketLink, close_name

log = logging.getLogger("backchannel.transport")

#: trio-websocket's read size (the upgrade; registration messages).
RECEIVE_BUFFER_SIZE = 64 * 1024
#: Accept messages well above what we send (max_message_size) so a peer with other settings
#: still fits; the mux's own limits bound what each message may hold.
MAX_RECEIVED_MESSAGE = 16 * 1024 * 1024
MESSAGE_QUEUE_SIZE = 4


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the gateway against ``ca_file``, or the system trust store when None."""
    return verifying_client_context(ca_file)


def verifying_client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A TLS client context that verifies the peer and its host name.

    With ``ca_file`` only that file's CAs are trusted (not the system store as well: a
    pinned private CA must not be widened to every public CA); without it the system store.
    Raises ssl.SSLError or OSError for an unreadable or non-PEM file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS for the gateway's tunnel endpoint."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """A parsed ``wss://host:port/path`` tunnel URL."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> GatewayAddress:
        """Parse and check a tunnel URL (only wss:// is accepted)."""
        parts = urlsplit(url)
        if parts.username or parts.password:
            # Never echo the URL here: it carries a secret.
            raise ValueError("tunnel URL must not carry credentials; use token_file/token_env")
        if parts.scheme != "wss":
            raise ValueError(f"tunnel URL must start with wss:// (got {url!r})")
        if not parts.hostname:
            raise ValueError(f"tunnel URL {url!r} has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"tunnel URL {url!r} has an invalid port") from exc
        if port is None:
            port = 443
        elif port == 0:
            raise ValueError(f"tunnel URL {url!r} has port 0")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.hostname, port, path)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.port}{self.path}"


def closed_reason(exc: BaseException) -> str | None:
    """Describe a transport failure for logs, or None if ``exc`` is not one."""
    if isinstance(exc, WebSocketClosed):
        detail = f": {exc.reason}" if exc.reason else ""
        return f"WebSocket closed with code {exc.code} ({close_name(exc.code)}){detail}"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return "WebSocket closed"
        detail = f": {reason.reason}" if reason.reason else ""
        return f"WebSocket closed with code {reason.code} ({reason.name}){detail}"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
        return f"connection lost: {exc or type(exc).__name__}"
    return None


async def dial_gateway(
    nursery: trio.Nursery,
    address: GatewayAddress,
    *,
    ssl_context: ssl.SSLContext,
    proxy: ProxySettings | None,
    hello: dict[str, Any],
    settings: TunnelSettings,
) -> tuple[WebSocketLink, Mux, dict[str, Any]]:
    """Open TCP (maybe via proxy), TLS, WebSocket, and complete the HELLO exchange.

    Raises :class:`TunnelError` with a message that says what to check.
    """
    with trio.move_on_after(settings.handshake_timeout) as scope:
        try:
            tcp = await open_tcp(address.host, address.port, proxy=proxy)
        except DialError as exc:
            raise TunnelError(f"cannot reach gateway {address}: {exc}") from exc
        tls = TlsChannel(tcp, ssl_context, server_hostname=address.host)
        try:
            return await _client_handshakes(nursery, tls, address, hello, settings)
        except BaseException:
            # Every failure, time-out and cancellation included, must close the socket.
            await trio.aclose_forcefully(tls)
            raise
    assert scope.cancelled_caught
    raise TunnelError(
        f"gateway {address} did not complete the handshake within {settings.handshake_timeout:g} s"
    )


async def _client_handshakes(
    nursery: trio.Nursery,
    tls: TlsChannel,
    address: GatewayAddress,
    hello: dict[str, Any],
    settings: TunnelSettings,
) -> tuple[WebSocketLink, Mux, dict[str, Any]]:
    """TLS, then the WebSocket upgrade, then HELLO; TunnelError says which one failed."""
    handshake = HandshakeStream(tls, client=True)
    await _client_upgrade(nursery, tls, handshake, address, address.path)
    ws = _take_over(tls, handshake, client=True)
    mux = Mux(initiator=True, settings=settings.mux)
    mux.send_hello(hello)
    try:
        await ws.send_message(mux.data_to_send())
        peer_info = await _await_hello(ws, mux, address)
        ws.allow_direct_payloads()  # the gateway answered: no longer a stranger's frames
    except (WebSocketClosed, trio.BrokenResourceError, OSError) as exc:
        raise TunnelError(
            f"gateway {address} dropped the connection during the handshake: "
            f"{closed_reason(exc) or exc}"
        ) from exc
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await ws.aclose()
        raise
    return ws, mux, peer_info


def _take_over(tls: TlsChannel, handshake: HandshakeStream, *, client: bool) -> WebSocketLink:
    """After the upgrade: the tunnel's own WebSocket link takes the connection from
    trio-websocket, with the bytes that followed the upgrade's HTTP head."""
    return WebSocketLink(
        tls,
        client=client,
        max_message_size=MAX_RECEIVED_MESSAGE,
        buffered=handshake.take_over(),
        on_close=handshake.release,
    )


async def _client_upgrade(
    nursery: trio.Nursery,
    tls: TlsChannel,
    watched: HandshakeStream,
    address: GatewayAddress,
    path: str,
) -> trio_websocket.WebSocketConnection:
    """TLS handshake, then the WebSocket upgrade on ``path``; TunnelError says which failed."""
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, OSError) as exc:
        raise _tls_failure(address, exc) from exc
    # trio-websocket waits for the upgrade answer forever if the stream ends first (the
    # gateway refusing our client certificate just closes it): race the upgrade against the
    # end of the stream.
    upgraded: list[trio_websocket.WebSocketConnection] = []
    failed: list[BaseException] = []

    async def upgrade() -> None:
        try:
            upgraded.append(
                await trio_websocket.wrap_client_stream(
                    nursery,
                    watched,  # type: ignore[arg-type]  # any trio stream works
                    address.host,
                    path,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=MAX_RECEIVED_MESSAGE,
                    receive_buffer_size=RECEIVE_BUFFER_SIZE,
                )
            )
        except (
            trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed,
            trio.BrokenResourceError,
            OSError,
        ) as exc:
            failed.append(exc)
        race.cancel_scope.cancel()

    async with trio.open_nursery() as race:
        race.start_soon(upgrade)
        await watched.ended.wait()
        race.cancel_scope.cancel()
    if upgraded:
        return upgraded[0]
    if failed:
        failure = failed[0]
        if isinstance(failure, trio_websocket.HandshakeError):
            raise TunnelError(
                f"gateway {address} refused the WebSocket upgrade: {failure}"
            ) from failure
        raise _tls_failure(address, failure, during="the WebSocket upgrade") from failure
    if watched.error is not None:
        raise _tls_failure(address, watched.error, during="the WebSocket upgrade")
    raise TunnelError(
        f"gateway {address} closed the connection during the WebSocket upgrade; if this "
        "connector presents a certificate, the gateway may have refused it (not signed by its "
        "connector CA): register again with `backchannel register`",
        ResetCode.UNAUTHENTICATED,
    )


def _tls_failure(
    address: GatewayAddress, exc: BaseException, *, during: str = "the TLS handshake"
) -> TunnelError:
    """Say what to fix for a failed TLS handshake (ours or the gateway's verdict on us)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TunnelError(
            f"gateway {address} presented a certificate that is not trusted "
            f"({cause.verify_message}); set ca_file to the CA that signed it",
            ResetCode.UNAUTHENTICATED,
        )
    if isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or ""):
        # With TLS 1.3 the gateway's verdict on our client certificate arrives after our side
        # of the handshake finished, as an alert.
        return TunnelError(
            f"gateway {address} refused the connection during {during} with a TLS alert "
            f"({cause.reason}): is this connector's certificate signed by the gateway's "
            "connector CA? Register again with `backchannel register`",
            ResetCode.UNAUTHENTICATED,
        )
    if during == "the TLS handshake":
        return TunnelError(f"TLS handshake with gateway {address} failed: {cause or exc}")
    return TunnelError(f"gateway {address} dropped the connection during {during}: {exc}")


async def exchange_text(
    address: GatewayAddress,
    path: str,
    message: str,
    *,
    ssl_context: ssl.SSLContext,
    proxy: ProxySettings | None,
    answer_within: float,
) -> str:
    """One text message to the gateway's WebSocket at ``path`` and its one answer.

    Used for connector registration (before a tunnel exists). Raises :class:`TunnelError`.
    """
    with trio.move_on_after(answer_within) as scope:
        try:
            tcp = await open_tcp(address.host, address.port, proxy=proxy)
        except DialError as exc:
            raise TunnelError(f"cannot reach gateway {address}: {exc}") from exc
        tls = TlsChannel(tcp, ssl_context, server_hostname=address.host)
        # Errors are collected and raised outside the nursery, as themselves (not in a group):
        # the WebSocket library reports a refused upgrade from its reader task.
        outcome: list[str | TunnelError] = []
        try:
            async with trio.open_nursery() as nursery:
                try:
                    outcome.append(await _one_exchange(nursery, tls, address, path, message))
                except TunnelError as exc:
                    outcome.append(exc)
                nursery.cancel_scope.cancel()
        except* trio_websocket.HandshakeError as group:
            refusal = group.exceptions[0]
            outcome.append(
                TunnelError(f"gateway {address} refused the WebSocket upgrade: {refusal}")
            )
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError) as group:
            lost = group.exceptions[0]
            outcome.append(TunnelError(f"gateway {address} dropped the connection: {lost}"))
        finally:
            await trio.aclose_forcefully(tls)
        if outcome:
            result = outcome[0]
            if isinstance(result, TunnelError):
                raise result
            return result
    assert scope.cancelled_caught
    raise TunnelError(f"gateway {address} did not answer within {answer_within:g} s")


async def _one_exchange(
    nursery: trio.Nursery,
    tls: TlsChannel,
    address: GatewayAddress,
    path: str,
    message: str,
) -> str:
    handshake = HandshakeStream(tls, client=True)
    ws = await _client_upgrade(nursery, tls, handshake, address, path)
    handshake.pass_through()  # trio-websocket keeps this short exchange
    try:
        await ws.send_message(message)
        answer = await ws.get_message()
    except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
        raise TunnelError(
            f"gateway {address} closed the connection before answering: {closed_reason(exc) or exc}"
        ) from exc
    with trio.move_on_after(1):
        await ws.aclose()
    if not isinstance(answer, str):
        raise TunnelError(f"gateway {address} answered with a binary message")
    return answer


async def _await_hello(ws: WebSocketLink, mux: Mux, address: GatewayAddress) -> dict[str, Any]:
    while True:
        try:
            message = await ws.get_message()
        except WebSocketClosed as exc:
            raise TunnelError(f"gateway {address} closed the tunnel: {closed_reason(exc)}") from exc
        if isinstance(message, str):
            raise TunnelError(
                f"gateway {address} sent a text message; is this a backchannel gateway?"
            )
        try:
            events = mux.receive_data(message)
        except ProtocolError as exc:
            raise TunnelError(f"gateway {address} broke the protocol: {exc}") from exc
        for event in events:
            if isinstance(event, HelloReceived):
                return event.info
            if isinstance(event, GoAwayReceived):
                raise TunnelError(
                    f"gateway {address} refused the connector: {event.reason}", event.code
                )


#: ``authenticate(hello, peer_address, client_certificate_der)`` -> the HELLO to answer with.
Authenticator = Callable[[dict[str, Any], str, bytes | None], Awaitable[dict[str, Any]]]
#: Serves a WebSocket upgrade on a path other than the tunnel's (``request``, peer address).
PathHandler = Callable[[trio_websocket.WebSocketRequest, str], Awaitable[None]]


async def accept_tunnel(
    nursery: trio.Nursery,
    tcp: trio.SocketStream,
    *,
    ssl_context: ssl.SSLContext,
    path: str,
    settings: TunnelSettings,
    authenticate: Authenticator,
    other_paths: Mapping[str, PathHandler] | None = None,
) -> tuple[WebSocketLink, Mux, dict[str, Any]] | None:
    """Server side: TLS, WebSocket upgrade on ``path``, HELLO, authentication.

    ``authenticate(hello, peer_address, client_certificate_der)`` returns the HELLO to answer
    with, or raises :class:`TunnelError` whose message is sent to the connector in GO_AWAY
    (the certificate is None unless the client presented one and the context verified it).
    An upgrade on one of ``other_paths`` is handed to its handler (connector registration),
    within the same handshake timeout. Returns None when no tunnel came of the connection
    (already logged).
    """
    peer = _peer_name(tcp)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = TlsChannel(tcp, ssl_context, server_side=True)
    result: tuple[WebSocketLink, Mux, dict[str, Any]] | None = None
    try:
        with trio.move_on_after(settings.handshake_timeout) as scope:
            result = await _server_handshakes(
                nursery, tls, peer, path, settings, authenticate, other_paths or {}
            )
        if scope.cancelled_caught:
            log.info(
                "tunnel endpoint: %s did not complete the handshake within %g s",
                peer,
                settings.handshake_timeout,
            )
    finally:
        # Refused, failed, timed out or cancelled: the socket must not linger.
        if result is None:
            await trio.aclose_forcefully(tls)
    return result


async def _server_handshakes(
    nursery: trio.Nursery,
    tls: TlsChannel,
    peer: str,
    path: str,
    settings: TunnelSettings,
    authenticate: Authenticator,
    other_paths: Mapping[str, PathHandler],
) -> tuple[WebSocketLink, Mux, dict[str, Any]] | None:
    """TLS, upgrade on ``path``, HELLO, authentication; None (logged) when refused or failed."""
    ws: WebSocketLink | None = None
    try:
        await tls.do_handshake()
        handshake = HandshakeStream(tls, client=False)
        requests: list[trio_websocket.WebSocketRequest] = []
        async with trio.open_nursery() as race:
            # trio-websocket waits for a request forever once it refused a bad one (400).
            async def upgrade() -> None:
                requests.append(
                    await trio_websocket.wrap_server_stream(
                        nursery,
                        handshake,  # any trio stream works
                        message_queue_size=MESSAGE_QUEUE_SIZE,
                        max_message_size=MAX_RECEIVED_MESSAGE,
                        receive_buffer_size=RECEIVE_BUFFER_SIZE,
                    )
                )
                race.cancel_scope.cancel()

            race.start_soon(upgrade)
            await handshake.ended.wait()
            race.cancel_scope.cancel()
        if not requests:
            log.info("tunnel endpoint: %s ended before a valid upgrade request", peer)
            return None
        request = requests[0]
        handler = other_paths.get(request.path)
        if handler is not None:
            handshake.pass_through()
            await handler(request, peer)
            return None
        if request.path != path:
            handshake.pass_through()
            await request.reject(404, body=b"no backchannel tunnel endpoint here\n")
            log.info("tunnel endpoint: %s asked for %r, not %r: refused", peer, request.path, path)
            return None
        await request.accept()
        ws = _take_over(tls, handshake, client=False)
        mux = Mux(initiator=False, settings=settings.mux)
        hello = await _receive_hello(ws, mux)
        try:
            certificate = tls.peer_certificate_der()
            answer = await authenticate(hello, peer, certificate)
        except TunnelError as exc:
            mux.go_away(exc.code, str(exc))
            await ws.send_message(mux.data_to_send())
            with trio.move_on_after(1):
                await ws.aclose(1008, "refused")
            return None
        mux.send_hello(answer)
        await ws.send_message(mux.data_to_send())
        ws.allow_direct_payloads()  # authenticated: no longer a stranger's frames
        return ws, mux, hello
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info(
            "tunnel endpoint: %s failed before the handshake completed: %s",
            peer,
            exc.__cause__ or exc or type(exc).__name__,
        )
    except (WebSocketClosed, trio_websocket.ConnectionClosed) as exc:
        log.info("tunnel endpoint: %s closed during the handshake: %s", peer, closed_reason(exc))
    except (ProtocolError, TunnelError) as exc:
        log.warning("tunnel endpoint: %s broke the handshake: %s", peer, exc)
    if ws is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await ws.aclose(1002, "handshake failed")
    return None


async def _receive_hello(ws: WebSocketLink, mux: Mux) -> dict[str, Any]:
    while True:
        message = await ws.get_message()
        if isinstance(message, str):
            raise ProtocolError("text message during the handshake")
        for event in mux.receive_data(message):
            if isinstance(event, HelloReceived):
                return event.info
            raise ProtocolError(f"unexpected {type(event).__name__} during the handshake")


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
