"""Gateway side: the SOCKS5 front door and static port forwards."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from backchannel import (
    AppIdentity,
    AuthenticationError,
    ConnectionLimit,
    GatewayServices,
    HostPort,
    NotConnectedError,
    ResetCode,
    StreamError,
    TunnelStream,
    close_forcefully,
    serve_connections,
)

from ._socks5 import (
    AuthMethod,
    Command,
    ConnectRequest,
    Greeting,
    ReplyCode,
    SapToken,
    Socks5Event,
    Socks5ServerConnection,
    SocksError,
    UsernamePassword,
)
from ._splice import CLIENT_BROKE, splice

log = logging.getLogger("backchannel.tcp")

#: The most a port forward reads of what a client sent before its stream is opened (it goes
#: with the OPEN: one send step of a new stream, see GatewayServices.open_stream).
FIRST_DATA_LIMIT = 64 * 1024

#: How each reset code reaches a SOCKS5 client (SAP Cloud Connector's conventions for 2-5).
REPLY_FOR_RESET = {
    ResetCode.ACCESS_DENIED: ReplyCode.NOT_ALLOWED,
    ResetCode.NOT_CONNECTED: ReplyCode.NETWORK_UNREACHABLE,
    ResetCode.BACKEND_UNREACHABLE: ReplyCode.HOST_UNREACHABLE,
    ResetCode.BACKEND_TIMEOUT: ReplyCode.HOST_UNREACHABLE,
    ResetCode.UNAUTHENTICATED: ReplyCode.CONNECTION_REFUSED,
    ResetCode.UNSUPPORTED_PROTOCOL: ReplyCode.NOT_ALLOWED,
}


async def _bind(listen: HostPort) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror or exc}") from exc


def _bound(listeners: Sequence[trio.SocketListener]) -> list[HostPort]:
    addresses = []
    for listener in listeners:
        host, port, *_ = listener.socket.getsockname()
        addresses.append(HostPort(host, port))
    return addresses


def split_socks_username(username: str) -> tuple[str, str]:
    """``subaccount/app[/location]`` → (``subaccount/app``, location id)."""
    subaccount, _, rest = username.partition("/")
    app, _, location = rest.partition("/")
    return f"{subaccount}/{app}", location


@dataclass(slots=True)
class _Negotiated:
    app: AppIdentity | None
    location: str
    failure: str
    request: ConnectRequest
    #: The cloud user's token as ``Bearer <JWT>`` (method 0x80 extension), for the connector.
    principal: str | None = None


class Socks5FrontDoor:
    """RFC 1928 CONNECT with RFC 1929 user/password (``subaccount/app[/location]``) or SAP's
    method 0x80 (app token plus location id). Bad credentials are answered with reply 0x05
    after the request, as SAP's proxy does, so clients see a specific code."""

    name = "tcp.socks5"

    def __init__(
        self,
        services: GatewayServices,
        listen: HostPort,
        *,
        handshake_timeout: float,
        max_connections: int = ConnectionLimit.DEFAULT,
        idle_timeout: float = 0.0,
    ) -> None:
        self._services = services
        self._listen = listen
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self.connections = ConnectionLimit(max_connections, self.name)

    async def serve(
        self, *, task_status: trio.TaskStatus[Sequence[HostPort]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve SOCKS5 clients until cancelled."""
        listeners = await _bind(self._listen)
        task_status.started(_bound(listeners))
        await serve_connections(self._handle, listeners, task_name=self.name)

    async def _handle(self, client: trio.SocketStream) -> None:
        # The connection is ours to close on every path (serve_connections, no wrapper).
        if not self.connections.try_admit():  # not wrap(): one coroutine frame less per stream
            await close_forcefully(client)
            return
        peer = "?"
        try:
            peer = _peer(client)
            negotiated = None
            with trio.move_on_after(self._handshake_timeout):
                negotiated, connection = await self._negotiate(client)
            if negotiated is None:
                log.info(
                    "socks5 %s: no complete handshake within %g s", peer, self._handshake_timeout
                )
                return
            stream = await self._open(client, negotiated, connection, peer)
            if stream is None:
                return
            async with stream:
                trailing = connection.trailing_data
                if trailing:
                    await stream.send_all(trailing)
                await splice(
                    stream,
                    client,
                    label=f"socks5 {peer} → {negotiated.request.host}",
                    other_broke=CLIENT_BROKE,
                    idle_timeout=self._idle_timeout,
                )
        except SocksError as exc:
            log.info("socks5 %s: %s", peer, exc)
            if exc.reply:
                await _send_quietly(client, exc.reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("socks5 %s: client went away: %s", peer, exc)
        except Exception:
            log.exception("socks5 %s: unexpected failure", peer)
        finally:
            self.connections.release()
            await close_forcefully(client)

    async def _negotiate(
        self, client: trio.SocketStream
    ) -> tuple[_Negotiated, Socks5ServerConnection]:
        connection = Socks5ServerConnection(
            accepted_methods=(AuthMethod.USERNAME_PASSWORD, AuthMethod.SAP_TOKEN)
        )
        app: AppIdentity | None = None
        location = ""
        failure = "no credentials"
        principal: str | None = None
        while True:
            for event in await _next_events(client, connection):
                if isinstance(event, Greeting):
                    await client.send_all(connection.choose_method(connection.preferred_method()))
                elif isinstance(event, UsernamePassword):
                    username, location = split_socks_username(event.username)
                    app, failure = self._check(
                        self._services.authenticate_basic, username, event.password
                    )
                    # Answer "success" either way: the precise refusal (0x05) comes as the reply
                    # to the request, where clients report its code.
                    await client.send_all(connection.auth_reply(True))
                elif isinstance(event, SapToken):
                    location = event.location_id
                    # backchannel's extension: "<app token>,<cloud user's JWT>" also carries
                    # the user, for principal propagation (tcps mappings).
                    app_token, _, user_token = event.token.partition(",")
                    principal = f"Bearer {user_token}" if user_token else None
                    app, failure = self._check(self._services.authenticate_bearer, app_token)
                    await client.send_all(connection.auth_reply(True))
                elif isinstance(event, ConnectRequest):
                    return _Negotiated(app, location, failure, event, principal), connection

    @staticmethod
    def _check(
        authenticate: Callable[..., AppIdentity], *credentials: str
    ) -> tuple[AppIdentity | None, str]:
        try:
            return authenticate(*credentials), ""
        except AuthenticationError as exc:
            return None, str(exc)

    async def _open(
        self,
        client: trio.SocketStream,
        negotiated: _Negotiated,
        connection: Socks5ServerConnection,
        peer: str,
    ) -> TunnelStream | None:
        request = negotiated.request
        target = HostPort(request.host, request.port)
        if request.command != Command.CONNECT:
            await client.send_all(connection.reply(ReplyCode.COMMAND_NOT_SUPPORTED))
            return None
        if negotiated.app is None:
            self._services.audit.denied(
                "socks5_auth",
                negotiated.failure,
                peer=peer,
                target=str(target),
                location=negotiated.location,
            )
            await client.send_all(connection.reply(ReplyCode.CONNECTION_REFUSED))
            return None
        try:
            stream = await self._services.open_stream(
                negotiated.app,
                protocol="tcp",
                target=target,
                location=negotiated.location,
                principal=negotiated.principal,
            )
        except NotConnectedError as exc:
            log.info("socks5 %s → %s: %s", peer, target, exc.reason)
            await client.send_all(connection.reply(ReplyCode.NETWORK_UNREACHABLE))
            return None
        except StreamError as exc:
            log.info("socks5 %s → %s refused: %s", peer, target, exc)
            await client.send_all(
                connection.reply(REPLY_FOR_RESET.get(exc.code, ReplyCode.GENERAL_FAILURE))
            )
            return None
        try:
            await client.send_all(connection.reply(ReplyCode.SUCCEEDED))
        except BaseException:
            await stream.aclose()
            raise
        return stream


class PortForward:
    """A static listener: every connection becomes a stream to one virtual target."""

    def __init__(
        self,
        services: GatewayServices,
        listen: HostPort,
        *,
        subaccount: str,
        location: str,
        target: HostPort,
        max_connections: int = ConnectionLimit.DEFAULT,
        idle_timeout: float = 0.0,
    ) -> None:
        self._idle_timeout = idle_timeout
        self._services = services
        self._listen = listen
        self._app = services.app_for_forward(subaccount, str(listen))
        self._location = location
        self._target = target
        self._takes_first_data = _takes_first_data(services)
        self.name = f"tcp.forward[{listen}→{target}]"
        self.connections = ConnectionLimit(max_connections, self.name)

    async def serve(
        self, *, task_status: trio.TaskStatus[Sequence[HostPort]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and forward until cancelled."""
        listeners = await _bind(self._listen)
        task_status.started(_bound(listeners))
        await serve_connections(self._handle, listeners, task_name=self.name)

    async def _open(self, first_data: bytes) -> TunnelStream:
        if not first_data:  # (also what a GatewayServices without first_data takes)
            return await self._services.open_stream(
                self._app, protocol="tcp", target=self._target, location=self._location
            )
        return await self._services.open_stream(
            self._app,
            protocol="tcp",
            target=self._target,
            location=self._location,
            first_data=first_data,
        )

    async def _handle(self, client: trio.SocketStream) -> None:
        # The client's address is formatted only for a log line: an idle connection holds no
        # strings for it (memory per idle stream, docs/performance.md). The connection is ours
        # to close on every path (serve_connections, no wrapper).
        if not self.connections.try_admit():  # not wrap(): one coroutine frame less per stream
            await close_forcefully(client)
            return
        try:
            try:
                first_data = _sent_already(client) if self._takes_first_data else b""
            except OSError as exc:  # a reset (reported once: the splice would see a clean end)
                log.debug(
                    "forward %s: %s went away before the open: %s", self.name, _peer(client), exc
                )
                return
            try:
                stream = await self._open(first_data)
            except StreamError as exc:
                # A raw TCP client has no error channel: say it in the log, close the socket.
                log.warning("forward %s from %s: %s", self.name, _peer(client), exc)
                if first_data:  # reset, as the close did while those bytes were unread
                    _reset_on_close(client)
                return
            async with stream:
                await splice(
                    stream,
                    client,
                    label=_ForwardLabel(client, self._target),
                    other_broke=CLIENT_BROKE,
                    idle_timeout=self._idle_timeout,
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("forward %s: %s went away: %s", self.name, _peer(client), exc)
        except Exception:
            log.exception("forward %s: unexpected failure", self.name)
        finally:
            self.connections.release()
            await close_forcefully(client)


def _sent_already(client: trio.SocketStream) -> bytes:
    """What the client sent before its stream is opened (a client that speaks first: an HTTP
    request, a TLS ClientHello, a database's start-up message), read without waiting: it
    leaves with the OPEN instead of a tunnel round trip later. b"" when nothing is there yet
    or at the client's end (the splice's read sees the end again); OSError for a reset."""
    if sys.platform == "win32":  # pragma: no cover - a descriptor read is POSIX
        return b""
    try:
        return os.read(client.socket.fileno(), FIRST_DATA_LIMIT)
    except BlockingIOError:
        return b""


def _reset_on_close(client: trio.SocketStream) -> None:
    """Make the coming close of ``client`` a reset (SO_LINGER 0): a raw TCP client's only sign
    that its connection was refused, which the unread bytes gave before they were read."""
    with contextlib.suppress(OSError):
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _takes_first_data(services: GatewayServices) -> bool:
    """Whether ``services.open_stream`` takes ``first_data`` (a GatewayServices written before
    it did not: a forward over one still serves, without sending first bytes with the OPEN)."""
    try:
        parameters = inspect.signature(services.open_stream).parameters
    except (TypeError, ValueError):
        return False
    return "first_data" in parameters or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()
    )


async def _next_events(
    client: trio.SocketStream, connection: Socks5ServerConnection
) -> list[Socks5Event]:
    events = connection.pending_events()
    while not events:
        data = await client.receive_some(4096)
        events = connection.receive_data(data)
        if not data and not events:
            raise SocksError("client closed the connection during the handshake", None)
    return events


async def _send_quietly(client: trio.SocketStream, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await client.send_all(data)


class _ForwardLabel:
    """``forward <client> → <target>`` for the splice's log lines, formatted when one is
    written."""

    __slots__ = ("_client", "_target")

    def __init__(self, client: trio.SocketStream, target: HostPort) -> None:
        self._client = client
        self._target = target

    def __str__(self) -> str:
        return f"forward {_peer(self._client)} → {self._target}"


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"
