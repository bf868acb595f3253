"""Connector side: reach the internal TCP (or TCP+TLS) target and splice it to the stream."""

from __future__ import annotations

import logging
import socket
import ssl

import trio

from backchannel import (
    BackendTls,
    ResetCode,
    Session,
    StreamError,
    TableReader,
    TunnelStream,
    is_connection_refused,
    read_backend_tls,
)

from ._splice import splice

log = logging.getLogger("backchannel.tcp")


class TcpHandler:
    """Handles streams of protocol ``tcp`` for mappings of protocol ``tcp`` and ``tcps``."""

    name = "tcp"
    mapping_protocols: tuple[str, ...] = ("tcp", "tcps")

    def __init__(self, *, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout

    def parse_mapping_options(self, mapping: TableReader) -> BackendTls | None:
        """``tcps`` mappings take ca_file, server_name, client_cert and client_key."""
        protocol = mapping.string("protocol", required=True)
        if protocol == "tcp":
            mapping.finish()
            return None
        tls = read_backend_tls(mapping)
        mapping.finish()
        return tls

    async def handle(self, session: Session, stream: TunnelStream) -> None:
        """Connect to the backend, accept the stream, splice until both sides are done."""
        backend = await self._connect(session)
        try:
            await stream.accept()
        except BaseException:
            await trio.aclose_forcefully(backend)
            raise
        await splice(stream, backend, label=f"{session.virtual}")

    async def _connect(self, session: Session) -> trio.abc.Stream:
        internal = session.internal
        where = f"backend of {session.virtual}"
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(internal.host, internal.port)
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
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        options = session.mapping.options
        if not isinstance(options, BackendTls):
            return tcp
        tls = trio.SSLStream(
            tcp, options.context, server_hostname=options.server_name or internal.host
        )
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
