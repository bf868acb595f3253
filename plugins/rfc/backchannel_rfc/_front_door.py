"""Gateway side: the RFC front door, where cloud applications' pyrfc-compatible clients connect.

The client speaks the stub protocol, with one addition: its ``logon`` carries a ``route``
object (app credentials, a destination name or the virtual ``ashost`` / ``sysnr`` with a
location id, and for principal propagation the cloud user's ``token``). The front door
authenticates the app, resolves the route, opens an ``rfc`` stream through the subaccount's
tunnel (with the user's token as the stream's principal, ``Bearer <JWT>``), sends the logon on
without the route, and from then on copies bytes both ways: the connector answers everything,
including the logon.

Listen on the cloud's internal network only, like the HTTP proxy and SOCKS5 front doors: the
connection carries app secrets and ABAP passwords in clear text.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import Any

import trio

from backchannel import (
    ConnectionLimit,
    GatewayServices,
    HostPort,
    TunnelStream,
    close_forcefully,
    serve_connections,
    splice_streams,
)

from ._destinations import RfcDestinations
from ._errors import RFCLibError, RfcRc, library_error, to_wire
from ._message_stream import MessageStream
from ._routing import authenticate_app, open_route, resolve_route, user_principal
from ._stub_protocol import StubProtocolError, encode_message

log = logging.getLogger("backchannel.rfc")

_ROUTE_KEYS = ("dest", "ashost", "sysnr", "gwserv", "location_id")
_LOGON_KEYS = ("client", "user", "passwd", "lang", "x509cert")


def _refusal(message: str) -> RFCLibError:
    return library_error(RFCLibError, message, RfcRc.RFC_INVALID_PROTOCOL, "RFC_INVALID_PROTOCOL")


class RfcFrontDoor:
    """The listener for pyrfc-compatible cloud clients."""

    name = "rfc.pyrfc"

    def __init__(
        self,
        services: GatewayServices,
        listen: HostPort,
        destinations: RfcDestinations,
        *,
        handshake_timeout: float = 10.0,
        max_connections: int = ConnectionLimit.DEFAULT,
    ) -> None:
        self.services = services
        self.listen = listen
        self.destinations = destinations
        self.handshake_timeout = handshake_timeout
        self.connections = ConnectionLimit(max_connections, self.name)

    async def serve(self, *, task_status: trio.TaskStatus[Sequence[HostPort]]) -> None:
        """Bind, report the bound addresses, serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host)
        bound = [HostPort(*listener.socket.getsockname()[:2]) for listener in listeners]
        log.info("RFC front door listening on %s", ", ".join(map(str, bound)))
        task_status.started(bound)
        await serve_connections(self._serve_client, listeners, task_name=self.name)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        # The connection is ours to close on every path (serve_connections, no wrapper).
        try:
            if not self.connections.try_admit():  # not wrap(): one coroutine frame less
                return
            peer = _peer(stream)
            try:
                with contextlib.suppress(OSError):  # already gone: it ends at the first read
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self._serve_connection(stream, peer)
            except Exception:
                # One broken connection must never take the listener (and the gateway) down.
                log.exception("RFC client %s: connection failed", peer)
            finally:
                self.connections.release()
        finally:
            await close_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, peer: str) -> None:
        async with stream:
            messages = MessageStream(stream)
            try:
                with trio.fail_after(self.handshake_timeout):
                    logon = await messages.receive()
            except trio.TooSlowError:
                log.info("RFC client %s sent no logon within %g s", peer, self.handshake_timeout)
                return
            except StubProtocolError as exc:
                await _send_error(messages, _refusal(str(exc)))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if logon is None:
                return
            try:
                tunnel = await self._open(logon, peer)
            except RFCLibError as exc:
                await _send_error(messages, exc)
                return
            async with tunnel:
                try:
                    await tunnel.send_all(encode_message(logon))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await splice_streams(
                    stream,
                    tunnel,
                    a_name="client",
                    b_name="tunnel",
                    a_first=messages.take_buffered(),
                )

    async def _open(self, logon: dict[str, Any], peer: str) -> TunnelStream:
        if logon.get("op") != "logon":
            raise _refusal("the first request on an RFC connection must be a logon")
        route = logon.get("route")
        if not isinstance(route, dict):
            raise _refusal(
                "this is a backchannel gateway: connect with backchannel_rfc.Connection and "
                "pass gateway, app with app_secret (or app_token), and ashost/sysnr or dest"
            )
        text = {k: str(v) for k, v in route.items() if isinstance(v, (str, int))}
        app = authenticate_app(
            self.services,
            app=text.get("app", ""),
            secret=text.get("app_secret"),
            token=text.get("app_token"),
        )
        given = {k: str(logon[k]) for k in _LOGON_KEYS if logon.get(k) not in (None, "")}
        token = route.get("token")
        resolved = resolve_route(
            self.services,
            self.destinations,
            app,
            {k: text[k] for k in _ROUTE_KEYS if k in text},
            given,
            principal=user_principal(token if isinstance(token, str) else None),
        )
        log.debug("RFC client %s (%s/%s) to %s", peer, app.subaccount, app.app, resolved.target)
        logon.clear()
        logon.update({"op": "logon", **resolved.logon})
        return await open_route(self.services, resolved)


async def _send_error(messages: MessageStream, exc: BaseException) -> None:
    # If the client is gone, there is nobody to tell.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await messages.send({"ok": False, "error": to_wire(exc)})


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return str(HostPort(host, port))
