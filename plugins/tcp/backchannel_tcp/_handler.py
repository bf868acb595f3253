"""Connector side: reach the internal TCP (or TCP+TLS) target and splice it to the stream."""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import ssl
from dataclasses import dataclass
from typing import cast

import trio

from backchannel import (
    BackendTls,
    PrincipalError,
    PrincipalReason,
    ResetCode,
    Session,
    StreamError,
    TableReader,
    TunnelStream,
    UserTlsContexts,
    close_forcefully,
    is_connection_refused,
    read_backend_tls,
)

from ._splice import splice

log = logging.getLogger("backchannel.tcp")

#: The stream reset (and so the SOCKS5 reply) for each way principal propagation can fail;
#: anything about the user's token is UNAUTHENTICATED (SOCKS5 0x05).
_PRINCIPAL_RESET = {
    PrincipalReason.NO_SUBJECT: ResetCode.ACCESS_DENIED,
    PrincipalReason.CA_UNUSABLE: ResetCode.INTERNAL,
}


@dataclass(frozen=True, slots=True)
class TcpsOptions:
    """A ``tcps`` mapping: TLS to the backend, and whether the cloud user's certificate is
    the TLS client certificate (``principal_propagation = "certificate"``)."""

    tls: BackendTls
    propagate_user: bool = False


class TcpHandler:
    """Handles streams of protocol ``tcp`` for mappings of protocol ``tcp`` and ``tcps``."""

    name = "tcp"
    mapping_protocols: tuple[str, ...] = ("tcp", "tcps")

    def __init__(self, *, connect_timeout: float, idle_timeout: float = 0.0) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.user_contexts = UserTlsContexts()

    def parse_mapping_options(self, mapping: TableReader) -> TcpsOptions | None:
        """``tcps`` mappings take ca_file, server_name, client_cert, client_key and
        principal_propagation (``"none"`` or ``"certificate"``)."""
        protocol = mapping.string("protocol", required=True)
        if protocol == "tcp":
            if "principal_propagation" in mapping:
                raise mapping.error(
                    "principal_propagation",
                    "needs protocol 'tcps': the user's certificate travels in the TLS handshake",
                )
            mapping.finish()
            return None
        tls = read_backend_tls(mapping)
        mode = mapping.string("principal_propagation", "none")
        if mode not in ("none", "certificate"):
            raise mapping.error("principal_propagation", "must be 'none' or 'certificate'")
        mapping.finish()
        return TcpsOptions(tls, propagate_user=mode == "certificate")

    async def handle(self, session: Session, stream: TunnelStream) -> None:
        """Connect to the backend, accept the stream, splice until both sides are done."""
        backend = await self._connect(session)
        try:
            await stream.accept()
        except BaseException:
            await close_forcefully(backend)
            raise
        await splice(stream, backend, label=session.virtual, idle_timeout=self.idle_timeout)

    async def _connect(self, session: Session) -> trio.abc.Stream:
        internal = session.internal
        where = f"backend of {session.virtual}"
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await _open_tcp(internal.host, internal.port)
        except trio.TooSlowError:
            log.warning("%s (%s) did not answer within %g s", where, internal, self.connect_timeout)
            raise StreamError(
                ResetCode.BACKEND_TIMEOUT,
                f"{where} did not answer within {self.connect_timeout:g} s",
            ) from None
        except OSError as exc:
            log.warning("%s (%s) unreachable: %s", where, internal, exc)
            what = "refused the connection" if is_connection_refused(exc) else "is unreachable"
            # The internal host name stays here: the gateway only learns the virtual one.
            raise StreamError(ResetCode.BACKEND_UNREACHABLE, f"{where} {what}") from None
        options = session.mapping.options
        if not isinstance(options, TcpsOptions):
            return tcp
        try:
            backend_tls = self._tls_for(session, options)
            tls = trio.SSLStream(
                tcp, backend_tls.context, server_hostname=backend_tls.server_name or internal.host
            )
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        try:
            with trio.fail_after(self.connect_timeout):
                await tls.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(tls)
            if not isinstance(exc, trio.BrokenResourceError | trio.TooSlowError):
                raise
            cause = exc.__cause__
            log.warning("%s (%s): TLS handshake failed: %s", where, internal, cause or exc)
            detail = (
                "certificate not trusted"
                if isinstance(cause, ssl.SSLCertVerificationError)
                else "TLS handshake failed"
            )
            raise StreamError(ResetCode.BACKEND_UNREACHABLE, f"{where}: {detail}") from None
        return tls

    def _tls_for(self, session: Session, options: TcpsOptions) -> BackendTls:
        """The mapping's TLS, or with ``propagate_user`` the same presenting the cloud user's
        certificate; StreamError (audited by the resolver) when there is no such user."""
        if not options.propagate_user:
            return options.tls
        try:
            user = session.propagated_user()
        except PrincipalError as exc:
            code = _PRINCIPAL_RESET.get(exc.reason, ResetCode.UNAUTHENTICATED)
            raise StreamError(
                code,
                f"principal propagation to {session.virtual} failed ({exc.code}): {exc.message}",
            ) from None
        log.info("%s: TLS with the certificate of %s", session.virtual, user.subject)
        return self.user_contexts.get(options.tls, user)


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """:func:`trio.open_tcp_stream`, without its resolver step and its happy-eyeballs nursery
    and task when ``host`` is an IP address (most mappings): one connect, as open_tcp_stream
    makes for a single address, and the same error (CPU per stream open,
    docs/performance.md). trio.SocketStream sets TCP_NODELAY itself."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        address: tuple[str, int] | tuple[str, int, int, int] = (host, port)
        if "%" in host:
            # A zoned IPv6 address (fe80::1%eth0): connect() ignores the zone of a 2-tuple
            # (scope id 0); getaddrinfo, numeric only (no lookup), gives the scope id.
            info = socket.getaddrinfo(
                host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )
            address = cast("tuple[str, int, int, int]", info[0][4])
        await _connect(sock, address)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        message = f"all attempts to connect to {where} failed"
        raise OSError(message) from ExceptionGroup(message, [exc])
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _connect(
    sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]
) -> None:
    """A non-blocking connect, as trio's ``sock.connect``, without waiting for the socket to
    become writable when it already is: to a backend on the same host the handshake is done
    when ``connect`` returns EINPROGRESS, and the wait costs a scheduler pass per stream."""
    await trio.lowlevel.checkpoint_if_cancelled()
    sock.setblocking(False)
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if not poller.poll(0):
        await trio.lowlevel.wait_writable(sock)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, f"Error connecting to {address!r}: {os.strerror(error)}")
