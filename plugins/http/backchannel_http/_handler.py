"""Connector side of the HTTP plugin: HTTP/1.1 from a tunnel stream to an HTTP(S) backend.

The gateway sends origin-form HTTP/1.1 requests for one virtual system over a stream, possibly
several one after the other. For each, the handler checks the mapping's resource rules,
rewrites the headers (:mod:`._rewrite`) and relays the exchange over one backend connection
kept for the stream's lifetime (re-opened when the backend closes it). Bodies move chunk by
chunk in both directions, never buffered whole. Every answer the connector makes up itself
(403, 502, 504...) names the virtual system only, never the internal one.
"""

from __future__ import annotations

import contextlib
import http
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import h11
import trio

from backchannel import (
    BackendTls,
    PrincipalError,
    PrincipalReason,
    PropagatedUser,
    ResetCode,
    Session,
    StreamError,
    TableReader,
    TunnelStream,
    UserTlsContexts,
    close_forcefully,
    is_connection_refused,
    read_backend_tls,
    splice_streams,
)

from ._h1 import (
    RequestHead,
    parse_request,
    parse_response,
    read_head,
    request_bytes,
    response_bytes,
)
from ._resources import AmbiguousPath, Denied, ResourceRule, check_access, normalise_request_target
from ._rewrite import (
    HostHeaderMode,
    Origin,
    has_body,
    host_matches,
    printable,
    request_headers,
    request_trailers,
    response_headers,
    wants_websocket,
)

__all__ = ["HttpHandler", "HttpOptions"]

PropagationMode = Literal["none", "certificate", "header"]
PROPAGATION_MODES = ("none", "certificate", "header")
#: SAP's header for a user certificate forwarded by a trusted reverse proxy (base64 DER).
CLIENT_CERT_HEADER = b"SSL_CLIENT_CERT"
#: HTTP status for each way principal propagation can fail (401 for anything about the token).
_PRINCIPAL_STATUS = {
    PrincipalReason.NO_SUBJECT: 403,
    PrincipalReason.CA_UNUSABLE: 500,
    PrincipalReason.BACKEND_NOT_MUTUAL: 502,
    PrincipalReason.BACKEND_REJECTED_CERTIFICATE: 502,
}

log = logging.getLogger("backchannel.http")

#: Read size on both legs; h11 never holds more than this plus one incomplete head.
CHUNK = 64 * 1024
#: Largest request or response head (request line/status line plus headers).
MAX_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """What an ``http``/``https`` mapping says beyond its targets (``session.mapping.options``)."""

    resources: tuple[ResourceRule, ...] = ()
    host_header: HostHeaderMode = "virtual"
    backend_timeout: float = 60.0
    tls: BackendTls | None = None
    #: ``none``; ``certificate``: the user's certificate is the TLS client certificate;
    #: ``header``: the system certificate authenticates the connector and the user's
    #: certificate travels in ``SSL_CLIENT_CERT`` (SAP's reverse-proxy convention).
    principal_propagation: PropagationMode = "none"


class HttpHandler:
    """Handles streams of protocol ``http`` for mappings of protocol ``http`` and ``https``."""

    name = "http"
    mapping_protocols: tuple[str, ...] = ("http", "https")

    def __init__(self, *, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self.user_contexts = UserTlsContexts()

    def parse_mapping_options(self, mapping: TableReader) -> HttpOptions:
        """Read ``host_header``, ``backend_timeout``, ``[[resources]]`` and, for ``https``,
        ``ca_file``, ``server_name``, ``client_cert`` and ``client_key``."""
        protocol = mapping.string("protocol", required=True)
        host_header = mapping.string("host_header", "virtual")
        if host_header not in ("virtual", "internal"):
            raise mapping.error("host_header", "must be 'virtual' or 'internal'")
        timeout = mapping.number("backend_timeout", 60.0, minimum=0.01, maximum=86_400)
        rules: list[ResourceRule] = []
        for table in mapping.tables("resources"):
            path = table.string("path", required=True)
            match = table.string("match", "prefix")
            if match not in ("exact", "prefix"):
                raise table.error("match", "must be 'exact' or 'prefix'")
            active = table.boolean("active", True)
            websocket = table.boolean("websocket", False)
            table.finish()
            try:
                rules.append(
                    ResourceRule(path, "exact" if match == "exact" else "prefix", active, websocket)
                )
            except ValueError as exc:
                raise table.error("path", str(exc)) from None
        tls = read_backend_tls(mapping) if protocol == "https" else None
        mode = mapping.string("principal_propagation", "none")
        if mode not in PROPAGATION_MODES:
            raise mapping.error(
                "principal_propagation", f"must be one of {', '.join(PROPAGATION_MODES)}"
            )
        if mode != "none" and tls is None:
            raise mapping.error(
                "principal_propagation",
                "needs protocol = 'https': a user's certificate only means something to a "
                "backend that authenticates the connector over TLS",
            )
        if mode == "header" and tls is not None and not tls.has_client_certificate:
            raise mapping.error(
                "principal_propagation",
                "'header' needs the connector's system certificate (client_cert and client_key): "
                "the backend leg must be mutually authenticated, or anyone could send "
                "SSL_CLIENT_CERT",
            )
        mapping.finish()
        return HttpOptions(
            tuple(rules),
            "internal" if host_header == "internal" else "virtual",
            timeout,
            tls,
            cast(PropagationMode, mode),
        )

    async def handle(self, session: Session, stream: TunnelStream) -> None:
        """Accept the stream and serve its requests until the gateway half-closes it."""
        options = session.mapping.options
        if not isinstance(options, HttpOptions):
            raise StreamError(ResetCode.INTERNAL, "the HTTP mapping was not configured")
        await stream.accept()
        server = _StreamServer(session, stream, options, self.connect_timeout, self.user_contexts)
        try:
            await server.serve()
        finally:
            await server.close_backend()


# --------------------------------------------------------------------------- failures


class _Failure(Exception):
    """Ends the exchange in progress; caught inside this module only."""


class _TunnelGone(_Failure):
    """The tunnel stream broke or was reset: nobody is left to answer."""


class _BadRequest(_Failure):
    """The gateway sent something that is not HTTP/1.1."""


class _BackendGone(_Failure):
    """The backend connection broke, closed early, or spoke broken HTTP."""


class _Refusal(_Failure):
    """The backend cannot be reached: answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str, *, rejected_certificate: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: The TLS handshake failed because the backend refused our client certificate.
        self.rejected_certificate = rejected_certificate


#: OpenSSL's words for a server refusing the client's certificate (TLS alerts).
_CERTIFICATE_ALERTS = (
    "alert bad certificate",
    "alert unknown ca",
    "alert certificate unknown",
    "alert certificate required",
    "alert access denied",
    "alert handshake failure",
)


def _is_certificate_rejection(exc: BaseException) -> bool:
    """Whether an alert in ``exc``'s chain of causes says the backend refused our certificate
    (under TLS 1.3 it comes at the first read after the handshake, wrapped twice:
    _BackendGone → BrokenResourceError → SSLError)."""
    texts: list[str] = []
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 16:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        texts.append(str(error).lower())
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    text = " ".join(texts)
    return any(alert in text for alert in _CERTIFICATE_ALERTS)


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Leg:
    """One h11 connection over one trio stream, with errors translated at the boundary."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: type[h11.CLIENT] | type[h11.SERVER],
        failure: type[_Failure],
        malformed: type[_Failure],
    ) -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)
        self._failure = failure
        self._malformed = malformed

    def fresh(self) -> bool:
        """Whether a plain exchange may go on this connection without h11 (see :mod:`._h1`):
        h11 is between two exchanges and holds nothing of the next one."""
        conn = self.conn
        return (
            conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and conn.trailing_data == (b"", False)
        )

    async def send(self, event: h11.Event) -> None:
        """Frame ``event`` and write it out."""
        await self.write(self.conn.send(event) or b"")

    async def write(self, data: bytes) -> None:
        """Write bytes h11 framed (nothing at all for b"": no scheduler pass either)."""
        if data:
            try:
                await self.stream.send_all(data)
            except _IO_ERRORS as exc:
                raise self._failure(f"sending failed: {exc}") from exc

    def buffered_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event if h11 can make it from what it holds, else NEED_DATA (no I/O)."""
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._malformed(str(exc)) from exc

    async def receive(self) -> None:
        """Read once from the stream into h11."""
        try:
            data = await self.stream.receive_some(CHUNK)
        except _IO_ERRORS as exc:
            raise self._failure(f"receiving failed: {exc}") from exc
        self.conn.receive_data(data if isinstance(data, bytes) else bytes(data))

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next event, reading as much as h11 needs for it."""
        while True:
            event = self.buffered_event()
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            await self.receive()


@dataclass(frozen=True, slots=True)
class _PlainRequest:
    """A plain request for the backend: written as ``head`` + ``body`` without h11."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    head: bytes
    body: bytes


# --------------------------------------------------------------------------- one stream


class _StreamServer:
    """Serves the requests of one tunnel stream, one at a time, over one backend connection."""

    def __init__(
        self,
        session: Session,
        stream: TunnelStream,
        options: HttpOptions,
        connect_timeout: float,
        user_contexts: UserTlsContexts,
    ) -> None:
        self.user_contexts = user_contexts
        self.session = session
        self.stream = stream
        self.options = options
        self.connect_timeout = connect_timeout
        self.tunnel = _Leg(stream, h11.SERVER, _TunnelGone, _BadRequest)
        self.backend: _Leg | None = None
        scheme = session.attributes.get("scheme")
        self.virtual = Origin(
            scheme if scheme in ("http", "https") else "http",
            session.virtual.host,
            session.virtual.port,
        )
        self.internal = Origin(
            "https" if options.tls else "http", session.internal.host, session.internal.port
        )
        self.system = str(session.virtual)
        self.method = b"GET"
        self.informational_sent = False
        #: TLS towards the backend; with ``certificate`` propagation, the user's context.
        self.tls = options.tls
        #: The propagated user (one per stream), once resolved.
        self.user: PropagatedUser | None = None
        #: A plain request read but not given to h11 (see :meth:`_read_plain`).
        self._pending: bytes | None = None

    async def serve(self) -> None:
        """Answer requests until the gateway is done, then half-close."""
        server = self.tunnel.conn
        try:
            while True:
                plain = await self._read_plain()
                if plain is not None:
                    request, body = plain
                    self.method = request.method
                    if await self._serve_request(request, list(request.headers), body):
                        continue  # answered without h11: it is still between requests
                else:
                    event = await self.tunnel.next_event()
                    if not isinstance(event, h11.Request):
                        break  # ConnectionClosed: the gateway's client is done
                    self.method = event.method
                    fields = list(event.headers)  # h11's Headers iterate slowly: once only
                    self._take_empty_end(fields)
                    await self._serve_request(event, fields)
                if server.our_state is h11.SWITCHED_PROTOCOL:
                    return  # the WebSocket splice has ended both directions
                if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
                    break
                server.start_next_cycle()
        except _BadRequest as exc:
            log.info("malformed request on a stream to %s: %s", self.system, exc)
            if server.our_state is h11.SEND_BODY:  # half a response out: it must not look whole
                await self.stream.reset(ResetCode.PROTOCOL_ERROR, f"malformed request: {exc}")
                return
            if server.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    await self._answer(400, f"Malformed HTTP request: {exc}", close=True)
                except _TunnelGone:
                    return
        except _TunnelGone:
            return
        with contextlib.suppress(*_IO_ERRORS):  # reset meanwhile: nothing more to say
            await self.stream.send_eof()

    def _take_empty_end(self, fields: list[tuple[bytes, bytes]]) -> None:
        """h11 frames a request without Content-Length or Transfer-Encoding (or with
        Content-Length: 0) as empty: its end is already here. Taking it now spares the upload
        task (and its nursery) of :meth:`_relay`."""
        if not has_body(fields):
            end = self.tunnel.buffered_event()
            if not isinstance(end, h11.EndOfMessage):
                raise _BadRequest(f"unexpected {end!r} after a request without a body")

    async def _read_plain(self) -> tuple[RequestHead, bytes] | None:
        """Read the next request; if it is plain (see :mod:`._h1`) and whole, it and its body
        (h11 is not given it: :attr:`_pending` keeps it for :meth:`_sync`), else None with
        everything read given to h11."""
        conn = self.tunnel.conn
        if conn.their_state is not h11.IDLE or conn.trailing_data != (b"", False):
            return None
        received = bytearray()
        try:
            end, ended = await read_head(self.stream, received, limit=MAX_HEAD, chunk=CHUNK)
        except _IO_ERRORS as exc:
            raise _TunnelGone(f"receiving failed: {exc}") from exc
        if ended:
            conn.receive_data(bytes(received))
            conn.receive_data(b"")
            return None
        request = None if end == -1 else parse_request(received[:end])
        if request is None or len(received) != end + request.body_length:
            conn.receive_data(bytes(received))
            return None
        self._pending = bytes(received)
        return request, self._pending[end:]

    def _sync(self) -> None:
        """Give h11 the plain request read by :meth:`_read_plain` after all (its head and, for
        a request without a body, its end), for the h11 path to take over."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.tunnel.conn.receive_data(pending)
        request = self.tunnel.buffered_event()
        assert isinstance(request, h11.Request), request  # h11 accepts what _h1 accepts
        self._take_empty_end(list(request.headers))

    async def close_backend(self) -> None:
        """Drop the backend connection (the next request opens a new one)."""
        if self.backend is not None:
            await close_forcefully(self.backend.stream)
            self.backend = None

    def _audit_fields(self, raw_target: bytes) -> dict[str, str]:
        session = self.session
        return {
            "subaccount": session.subaccount,
            "location": session.location,
            "app": session.app,
            "target": self.system,
            # The query stays out of the audit trail: it often carries keys and tokens.
            "path": raw_target.partition(b"?")[0].decode("latin-1"),
        }

    async def _serve_request(
        self,
        request: h11.Request | RequestHead,
        fields: list[tuple[bytes, bytes]],
        body: bytes | None = None,
    ) -> bool:
        """Check, rewrite and forward one request (``fields``: its headers), or answer it
        ourselves. ``body``: all of a plain request's body (see :meth:`_read_plain`); True if
        the exchange was plain from start to end, h11 never involved."""
        raw = request.target
        websocket = wants_websocket(fields)
        hosts = [v for k, v in fields if k == b"host"]
        if len(hosts) > 1:
            raise _BadRequest("more than one Host header")
        if hosts and not host_matches(hosts[0], self.virtual):
            reason = f"the Host header names {printable(hosts[0])}, not this stream's system"
            self.session.audit.denied("http_request", reason, **self._audit_fields(raw))
            await self._answer(421, f"Misdirected request for system {self.system}: {reason}")
            return False
        try:
            path = normalise_request_target(raw)
            decision = check_access(self.options.resources, path, websocket=websocket)
        except AmbiguousPath as exc:
            path, decision = "", Denied(exc.reason)
        if isinstance(decision, Denied):
            self.session.audit.denied("http_request", decision.reason, **self._audit_fields(raw))
            resource = f"{self.virtual.scheme}://{self.system}{printable(raw.partition(b'?')[0])}"
            await self._answer(
                403,
                f"Access denied to resource {resource} on system {self.system}\n{decision.reason}",
            )
            return False
        self.session.audit.allowed("http_request", **self._audit_fields(raw))
        if self.user is not None and self._now() >= self.user.valid_until:
            # The stream's token has expired (or its certificate is due for renewal) since the
            # first request: every request of the stream must still carry a valid token.
            self.user = None
            self.tls = self.options.tls
            if self.options.principal_propagation == "certificate":
                await self.close_backend()  # that connection presented the old certificate
        if self.options.principal_propagation != "none" and self.user is None:
            try:
                self._propagate()
            except PrincipalError as exc:
                await self._answer(
                    _PRINCIPAL_STATUS.get(exc.reason, 401),
                    f"Principal propagation to system {self.system} failed ({exc.code}): "
                    f"{exc.message}",
                )
                return False
        query = raw.partition(b"?")[2]
        target = path.encode("ascii") + (b"?" + query if b"?" in raw else b"")
        headers = request_headers(
            fields,
            host_mode=self.options.host_header,
            internal=self.internal,
            virtual=self.virtual,
            client_ip=self.session.attributes.get("client_ip"),
            scheme=self.virtual.scheme,
            websocket=websocket,
        )
        if self.options.tls is not None and self.options.tls.has_client_certificate:
            # The backend trusts the connector's system certificate as a reverse proxy: tell
            # it which user this is, or (empty) that the system certificate is no logon.
            user_certificate = b""
            if self.options.principal_propagation == "header" and self.user is not None:
                user_certificate = self.user.certificate.der_base64().encode("ascii")
            headers.append((CLIENT_CERT_HEADER, user_certificate))
        plain_head = None if body is None else request_bytes(request.method, target, headers)
        if plain_head is None:
            self._sync()
        repeatable = not has_body(headers)
        for attempt in range(2):
            self.informational_sent = False
            try:
                backend, reused = await self._backend_connection()
                if (
                    plain_head is not None
                    and self._pending is not None
                    and backend.fresh()
                    # A body to a TLS backend goes h11's way (in a task of its own while the
                    # answer is read): a failed write breaks a trio.SSLStream for reading too,
                    # and an early answer (413) would be lost.
                    and (not body or not isinstance(backend.stream, trio.SSLStream))
                ):
                    assert body is not None
                    plain = _PlainRequest(request.method, target, headers, plain_head, body)
                    if await self._relay_plain(backend, plain):
                        self._pending = None
                        return True
                else:
                    self._sync()
                    outgoing = h11.Request(method=request.method, target=target, headers=headers)
                    await backend.send(outgoing)
                    await self._relay(backend)
            except _Refusal as exc:
                await self.close_backend()
                await self._answer(exc.status, exc.message)
                return False
            except _BackendGone as exc:
                await self.close_backend()
                if (
                    self.user is not None
                    and self.options.principal_propagation == "certificate"
                    and _is_certificate_rejection(exc)
                ):
                    await self._answer(502, self._rejected(exc))
                    return False
                # A reused connection the backend closed meanwhile: once more on a fresh one,
                # if nothing was answered yet and no body was read that cannot be sent again.
                if attempt == 0 and reused and repeatable and not self.informational_sent:
                    continue
                log.info("backend of %s failed before answering: %s", self.system, exc)
                await self._answer(502, f"Backend of system {self.system} closed the connection")
                return False
            await self._skip_request_body()
            return False
        return False

    async def _backend_connection(self) -> tuple[_Leg, bool]:
        """The idle kept-alive connection (and True), else a new one (and False)."""
        backend = self.backend
        if backend is not None:
            if backend.conn.our_state is h11.IDLE and backend.conn.their_state is h11.IDLE:
                return backend, True
            await self.close_backend()
        try:
            stream = await _connect(self.session, self.tls, self.connect_timeout)
        except _Refusal as exc:
            if self.user is not None and exc.rejected_certificate:
                raise _Refusal(502, self._rejected(exc)) from None
            raise
        self.backend = _Leg(stream, h11.CLIENT, _BackendGone, _BackendGone)
        return self.backend, False

    def _now(self) -> float:
        """The principal resolver's clock (seconds since the epoch)."""
        resolver = self.session.principal_resolver
        return resolver.clock() if resolver is not None else time.time()

    def _propagate(self) -> None:
        """Resolve the stream's user (PrincipalError if that fails) and, for ``certificate``
        propagation, make the backend TLS present the user's certificate."""
        user = self.session.propagated_user()
        if self.options.principal_propagation == "certificate":
            assert self.options.tls is not None
            self.tls = self.user_contexts.get(self.options.tls, user)
        self.user = user

    def _rejected(self, cause: Exception) -> str:
        """Audit and describe a backend refusing the user's certificate."""
        assert self.user is not None
        reason = PrincipalReason.BACKEND_REJECTED_CERTIFICATE
        self.session.audit.denied(
            "principal_propagation",
            reason.code,
            system=self.system,
            subject=self.user.subject,
        )
        log.warning(
            "backend of %s rejected the certificate of %s: %s",
            self.system,
            self.user.subject,
            cause,
        )
        return (
            f"Principal propagation to system {self.system} failed ({reason.code}): the backend "
            f"rejected the certificate issued for {self.user.subject}; make it trust the "
            "connector's principal propagation CA and map that subject to a user"
        )

    async def _relay_plain(self, backend: _Leg, request: _PlainRequest) -> bool:
        """Send a plain request on a fresh backend connection and relay the answer without h11
        if it is plain too (True); else h11 takes over where the exchange is and relays it
        (False). Raises like :meth:`_relay`."""
        timeout = self.options.backend_timeout
        waiting = trio.CancelScope(deadline=trio.current_time() + timeout)
        received = bytearray()
        end, ended = -1, False
        unsent: _BackendGone | None = None
        with waiting:
            # Within backend_timeout too: a backend that stops reading the body and never
            # answers gets the 504 it gets on the h11 path (where the body has its own task).
            # The head on its own first when there is a body, as on the h11 path: a failure
            # there is the connection's (a kept-alive one the backend closed meanwhile is
            # retried, even if it still holds a stale answer such as an idle timeout's 408).
            await backend.write(request.head)
            if request.body:
                try:
                    await backend.write(request.body)
                except _BackendGone as exc:
                    # It may have answered early (413...) and closed without reading all of
                    # the body: its answer decides, as on the h11 path; no reuse.
                    unsent = exc
            try:
                end, ended = await read_head(backend.stream, received, limit=MAX_HEAD, chunk=CHUNK)
            except _IO_ERRORS as exc:
                raise unsent or _BackendGone(f"receiving failed: {exc}") from exc
        if waiting.cancelled_caught:
            raise self._late()
        response = None if end == -1 else parse_response(received[:end], request.method)
        head = None
        if response is not None:
            reason = response.reason or _reason_phrase(response.status_code)
            headers = response_headers(
                list(response.headers),
                status=response.status_code,
                backend=self.internal,
                virtual=self.virtual,
            )
            head = response_bytes(response.status_code, reason, headers)
        if response is None or head is None:
            # h11 takes over: as if it had sent the request and read what came so far.
            conn = backend.conn
            method, target = request.method, request.target
            conn.send(h11.Request(method=method, target=target, headers=request.headers))
            if request.body:
                conn.send(h11.Data(data=request.body))
            conn.send(h11.EndOfMessage())
            conn.receive_data(bytes(received))
            if ended:
                conn.receive_data(b"")
            self._sync()
            await self._download(backend, trio.CancelScope(deadline=waiting.deadline))
            if unsent is None:
                await self._next_backend_cycle(backend)
            else:
                await self.close_backend()
            return False
        await self._relay_plain_body(backend, response.body_length, head, received, end)
        if unsent is not None:
            await self.close_backend()
        return True

    async def _relay_plain_body(
        self, backend: _Leg, length: int, head: bytes, received: bytearray, end: int
    ) -> None:
        """Write a plain response's head and its ``length`` bytes of body into the tunnel,
        as they come."""
        first = bytes(received[end : end + length])
        left = length - len(first)
        await self.tunnel.write(head + first)
        while left:
            cause: Exception
            try:
                data = bytes(await backend.stream.receive_some(min(left, CHUNK)))
                cause = _BackendGone("the backend closed the connection in a response body")
            except _IO_ERRORS as exc:
                data, cause = b"", exc
            if not data:
                log.info("backend of %s broke off a response: %s", self.system, cause)
                await self.stream.reset(
                    ResetCode.BACKEND_UNREACHABLE,
                    f"the backend of system {self.system} broke off the response",
                )
                raise _TunnelGone("reset") from cause
            left -= len(data)
            await self.tunnel.write(data)
        if len(received) - end > length:
            # Bytes past the response: the connection is out of step; not used again.
            await self.close_backend()

    def _late(self) -> _Refusal:
        """The answer to a backend that sent no response head within ``backend_timeout``."""
        log.info("backend of %s sent no response in time", self.system)
        return _Refusal(
            504,
            f"Backend of system {self.system} did not answer within "
            f"{self.options.backend_timeout:g} s",
        )

    async def _next_backend_cycle(self, backend: _Leg) -> None:
        """After an exchange: keep the backend connection for the next one, or close it (also
        when the backend sent more than its answer: h11 would read that as the next one)."""
        conn = backend.conn
        if (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        ):
            conn.start_next_cycle()
        elif conn.our_state is not h11.SWITCHED_PROTOCOL:
            await self.close_backend()

    async def _relay(self, backend: _Leg) -> None:
        """Move one exchange: the body up in a task of its own, the answer down meanwhile."""
        timeout = self.options.backend_timeout
        waiting = trio.CancelScope(deadline=trio.current_time() + timeout)

        def progress() -> None:  # a backend still reading the body is not late yet
            waiting.deadline = trio.current_time() + timeout

        if self.tunnel.conn.their_state is not h11.SEND_BODY:
            # No body to copy (or a repeated request: its body was read the first time).
            await backend.send(h11.EndOfMessage())
            await self._download(backend, waiting)
        else:
            upload = _Upload(self.tunnel, backend, progress)
            failure: _Failure | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload.run, nursery.cancel_scope)
                try:
                    await self._download(backend, waiting)
                except _Failure as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
            if upload.failure is not None:
                raise upload.failure
            if failure is not None:
                raise failure
        await self._next_backend_cycle(backend)

    async def _download(self, backend: _Leg, waiting: trio.CancelScope) -> None:
        """Relay the answer; ``waiting`` bounds the wait for its head."""
        head: h11.Event | type[h11.PAUSED] | None = None
        with waiting:
            while True:
                head = await backend.next_event()
                if not isinstance(head, h11.InformationalResponse) or head.status_code == 101:
                    break
                self.informational_sent = True  # 100 Continue (or 102, 103): pass it on
                informational = h11.InformationalResponse(
                    status_code=head.status_code, headers=self._mapped(head)
                )
                await self.tunnel.send(informational)
        if waiting.cancelled_caught:
            raise self._late()
        if not isinstance(head, h11.Response | h11.InformationalResponse):
            raise _BackendGone(f"unexpected {head!r} instead of a response")
        headers = self._mapped(head)
        if isinstance(head, h11.InformationalResponse):  # 101 Switching Protocols
            upgrade = b",".join(v for k, v in head.headers if k == b"upgrade").strip().lower()
            if upgrade != b"websocket":
                # Only a WebSocket may take the connection over: any other protocol (h2c...)
                # would carry requests past the resource rules.
                raise _BackendGone(f"backend switched to {upgrade!r}, not to websocket")
            switching = h11.InformationalResponse(
                status_code=101, headers=headers, reason=head.reason
            )
            await self.tunnel.send(switching)
            await self._splice(backend)
            return
        # What the backend sent in one read goes through the tunnel in one write (head, body
        # and end together for a small response: one frame, one WebSocket message); it is
        # written before every wait for the backend, so nothing is held back.
        tunnel = self.tunnel
        out = [tunnel.conn.send(self._final_head(head.status_code, headers, head.reason)) or b""]
        trailers_allowed = self._tunnel_is_chunked(head.status_code, headers)
        while True:
            try:
                event = backend.buffered_event()
                if event is h11.NEED_DATA:
                    await tunnel.write(b"".join(out))
                    out.clear()
                    await backend.receive()
                    continue
            except _BackendGone as exc:
                await tunnel.write(b"".join(out))  # the client sees the response cut, not missing
                log.info("backend of %s broke off a response: %s", self.system, exc)
                await self.stream.reset(
                    ResetCode.BACKEND_UNREACHABLE,
                    f"the backend of system {self.system} broke off the response",
                )
                raise _TunnelGone("reset") from exc
            if isinstance(event, h11.Data):
                out.append(tunnel.conn.send(event) or b"")
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers) if trailers_allowed else []
                out.append(tunnel.conn.send(h11.EndOfMessage(headers=trailers)) or b"")
                await tunnel.write(b"".join(out))
                return

    def _mapped(self, head: h11.Response | h11.InformationalResponse) -> list[tuple[bytes, bytes]]:
        """The head's headers as the tunnel side may see them."""
        return response_headers(
            list(head.headers),  # iterated twice: h11's Headers iterate slowly
            status=head.status_code,
            backend=self.internal,
            virtual=self.virtual,
        )

    def _tunnel_is_chunked(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether h11 frames this response chunked towards the tunnel (trailers possible)."""
        if self.method == b"HEAD" or status in (204, 304) or status < 200:
            return False
        if self.tunnel.conn.their_http_version != b"1.1":
            return False
        names = {k for k, _ in headers}
        return b"transfer-encoding" in names or b"content-length" not in names

    def _final_head(
        self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b""
    ) -> h11.Response:
        """A final response head for the tunnel."""
        server = self.tunnel.conn
        if server.their_state is h11.SEND_BODY and server.they_are_waiting_for_100_continue:
            # The client holds its body back for a 100 that will not come: it may send it or
            # not, so the stream cannot carry another request after this answer.
            headers = [*headers, (b"connection", b"close")]
        if not reason:
            reason = _reason_phrase(status)
        return h11.Response(status_code=status, headers=headers, reason=reason)

    async def _answer(self, status: int, text: str, *, close: bool = False) -> None:
        """Answer the request ourselves (in one write), then skip the rest of its body."""
        self._sync()
        body = (text + "\n").encode("utf-8")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if close:
            headers.append((b"connection", b"close"))
        server = self.tunnel.conn
        events = (self._final_head(status, headers), h11.Data(data=body), h11.EndOfMessage())
        await self.tunnel.write(b"".join(server.send(event) or b"" for event in events))
        await self._skip_request_body()

    async def _skip_request_body(self) -> None:
        """After a complete answer, read and drop what is left of the request body, so that the
        next request can follow (unless the answer closes the stream anyway)."""
        server = self.tunnel.conn
        while server.their_state is h11.SEND_BODY and server.our_state is h11.DONE:
            await self.tunnel.next_event()

    async def _splice(self, backend: _Leg) -> None:
        """After a 101: raw bytes both ways, h11's leftovers first, until both sides end."""
        broken = await splice_streams(
            self.stream,
            backend.stream,
            a_name="tunnel",
            b_name="backend",
            a_first=self.tunnel.conn.trailing_data[0],
            b_first=backend.conn.trailing_data[0],
        )
        if broken == "backend":
            self.stream.reset_nowait(
                ResetCode.BACKEND_UNREACHABLE,
                f"the backend of system {self.system} broke the WebSocket connection",
            )
        await self.close_backend()


class _Upload:
    """Copies a request body from the tunnel to the backend, in a task of its own so that the
    backend may answer (100 Continue, or early) while the body is still coming."""

    def __init__(self, tunnel: _Leg, backend: _Leg, progress: Callable[[], None]) -> None:
        self.tunnel = tunnel
        self.backend = backend
        self.progress = progress
        #: A tunnel-side failure, which ends the whole stream.
        self.failure: _Failure | None = None

    async def run(self, scope: trio.CancelScope) -> None:
        """Copy until the end of the body; a tunnel failure cancels ``scope``."""
        try:
            while True:
                event = await self.tunnel.next_event()
                if isinstance(event, h11.Data):
                    await self.backend.send(event)
                    self.progress()
                elif isinstance(event, h11.EndOfMessage):
                    await self.backend.send(
                        h11.EndOfMessage(headers=request_trailers(event.headers))
                    )
                    return
                else:
                    raise _BadRequest(f"unexpected {event!r} in a request body")
        except _BackendGone as exc:
            # The backend stopped reading; whatever it answers (or not) decides.
            log.debug("backend stopped reading a request body: %s", exc)
        except (_TunnelGone, _BadRequest) as exc:
            self.failure = exc
            scope.cancel()


async def _connect(
    session: Session, tls: BackendTls | None, connect_timeout: float
) -> trio.abc.Stream:
    """Open the backend connection; :class:`_Refusal` names the virtual system only."""
    internal, system = session.internal, str(session.virtual)
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(internal.host, internal.port)
    except trio.TooSlowError:
        log.warning(
            "backend of %s (%s) did not answer within %g s", system, internal, connect_timeout
        )
        raise _Refusal(
            504,
            f"Backend of system {system} did not accept a connection within {connect_timeout:g} s",
        ) from None
    except OSError as exc:
        log.warning("backend of %s (%s) unreachable: %s", system, internal, exc)
        what = "refused the connection" if is_connection_refused(exc) else "is unreachable"
        raise _Refusal(502, f"Backend of system {system} {what}") from None
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            return tcp
        stream = trio.SSLStream(tcp, tls.context, server_hostname=tls.server_name or internal.host)
    except BaseException:
        await close_forcefully(tcp)
        raise
    try:
        with trio.fail_after(connect_timeout):
            await stream.do_handshake()
    except BaseException as exc:
        # Every failure, cancellation included (the tunnel lost, the connector stopping),
        # closes the backend connection now, not when the garbage collector finds it.
        await trio.aclose_forcefully(stream)
        if not isinstance(exc, trio.BrokenResourceError | trio.TooSlowError):
            raise
        cause = exc.__cause__
        log.warning("backend of %s (%s): TLS handshake failed: %s", system, internal, cause or exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            message = f"The certificate of the backend of system {system} is not trusted"
        else:
            message = f"TLS handshake with the backend of system {system} failed"
        raise _Refusal(502, message, rejected_certificate=_is_certificate_rejection(exc)) from None
    return stream


def _reason_phrase(status: int) -> bytes:
    """The standard reason phrase (an empty one is valid HTTP, but reads badly in logs)."""
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
