"""Connector side: reach the internal TCP (or TCP+TLS) target and splice it to the stream."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass

import trio

from backchannel import (
    ResetCode,
    Session,
    StreamError,
    TableReader,
    TunnelStream,
    verifying_client_context,
)

from ._splice import splice

log = logging.getLogger("backchannel.tcp")


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """How a ``tcps`` mapping talks TLS to its backend."""

    context: ssl.SSLContext
    server_name: str | None


class TcpHandler:
    """Handles streams of protocol ``tcp`` for mappings of protocol ``tcp`` and ``tcps``."""

    name = "tcp"
    mapping_protocols: tuple[str, ...] = ("tcp", "tcps")

    def __init__(self, *, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout

    def parse_mapping_options(self, mapping: TableReader) -> TlsOptions | None:
        """``tcps`` mappings take ca_file, server_name, client_cert and client_key."""
        protocol = mapping.string("protocol", required=True)
        if protocol == "tcp":
            mapping.finish()
            return None
        ca_file = mapping.path("ca_file")
        server_name = mapping.optional_string("server_name")
        client_cert = mapping.path("client_cert")
        client_key = mapping.path("client_key")
        if (client_cert is None) != (client_key is None):
            raise mapping.error("client_cert", "client_cert and client_key go together")
        mapping.finish()
        try:
            context = verifying_client_context(ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise mapping.error(
                "ca_file", f"not a readable PEM file of CA certificates: {exc}"
            ) from None
        if client_cert is not None and client_key is not None:
            try:
                context.load_cert_chain(str(client_cert), str(client_key))
            except (ssl.SSLError, OSError) as exc:
                raise mapping.error(
                    "client_key", f"cannot load the client certificate: {exc}"
                ) from None
        return TlsOptions(context, server_name)

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
            what = "refused the connection" if _refused(exc) else "is unreachable"
            # The internal host name stays here: the gateway only learns the virtual one.
            raise StreamError(ResetCode.BACKEND_UNREACHABLE, f"{where} {what}") from None
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        options = session.mapping.options
        if not isinstance(options, TlsOptions):
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


def _refused(exc: OSError) -> bool:
    if exc.errno == errno.ECONNREFUSED:
        return True
    # trio.open_tcp_stream wraps several attempts into one OSError with the causes inside.
    return any(
        isinstance(e, OSError) and e.errno == errno.ECONNREFUSED
        for e in getattr(exc, "exceptions", ()) or [exc.__cause__]
    )
