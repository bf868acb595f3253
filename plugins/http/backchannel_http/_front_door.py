"""Gateway side of the HTTP plugin, the I/O half: client connections relayed through tunnel
streams (protocol ``http``), the forward proxy and destinations front doors, and the
``[plugins.http]`` reader that builds them.

A :class:`ClientConnection` parses the client's requests with an h11 server connection, asks
its router where each one goes, and writes it on a tunnel stream through an h11 client
connection: the connector only ever sees requests that h11 serialised, in origin form, with
framing h11 chose. Responses come back the same way. Bodies stream both ways with
back-pressure and are never held whole. A kept-alive client connection keeps its tunnel stream
while its requests go to the same virtual host, port, location and app, and opens a new one
when they change. The rules (what is admitted, which headers pass, how failures read) are in
:mod:`backchannel_http._relay`.

Cloud applications use the proxy as SAP Cloud Connector's clients do: an ``http://`` URL in
absolute form, ``Proxy-Authorization`` (Basic ``subaccount/app:secret`` or Bearer app token)
and the location id in ``SAP-Connectivity-SCC-Location_ID`` (or ``X-Backchannel-Location``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
from collections.abc import Sequence
from dataclasses import replace

import h11
import trio

# h11 exports it (h11.MIGHT_SWITCH_PROTOCOL) but leaves it out of __all__.
from h11 import MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]

from backchannel import (
    ConnectionLimit,
    FrontDoor,
    GatewayContext,
    GatewayServices,
    HostPort,
    ResetCode,
    StreamError,
    TableReader,
    TunnelStream,
    close_forcefully,
    serve_connections,
    splice_streams,
)

from ._destinations import Destination, DestinationsRouter, parse_destinations
from ._h1 import (
    RequestHead,
    head_end,
    parse_request,
    parse_response,
    read_head,
    request_bytes,
    response_bytes,
)
from ._relay import (
    BadHead,
    Client,
    HeadScanner,
    HttpLimits,
    ProxyRouter,
    Refusal,
    Route,
    Router,
    comma_tokens,
    forward_response_headers,
    refusal_for_stream_error,
    render_refusal,
)

log = logging.getLogger("backchannel.http")

NAME = "http"
#: Read size on the client socket and on tunnel streams (the mux cuts frames itself).
CLIENT_CHUNK = 64 * 1024
TUNNEL_CHUNK = 256 * 1024
#: Largest response head accepted from the connector (it is trusted, but bounded anyway).
MAX_RESPONSE_HEAD = 256 * 1024
#: Methods a request on a stale kept-alive stream may be retried with (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Reset codes that mean "this kept-alive stream was closed", not "this request failed".
_STALE_CODES = frozenset({ResetCode.CANCELLED, ResetCode.NO_ERROR})


class _ClientGone(Exception):
    """The client's socket broke or closed."""


class _Outcome(enum.Enum):
    DONE = "done"  # response relayed completely
    UPGRADED = "upgraded"  # 101 relayed: splice raw bytes
    FAILED = "failed"  # stream failed; the failure is in ClientConnection._failure
    RETRY = "retry"  # a stale reused stream failed before anything happened


class _TunnelLeg:
    """One tunnel stream and the h11 client connection that writes requests on it."""

    def __init__(self, stream: TunnelStream, key: object) -> None:
        self.stream = stream
        self.key = key
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.exchanges = 0

    def fresh(self) -> bool:
        """Whether a plain exchange may go on this stream without h11 (see :mod:`._h1`): h11
        is between two exchanges and holds no byte of the next response."""
        return self.conn.our_state is h11.IDLE and not self.conn.trailing_data[0]

    def catch_up(
        self, method: bytes, route: Route, body: bytes, received: bytes, *, ended: bool
    ) -> None:
        """Bring h11 to where a plain exchange is: ``method``'s request for ``route`` and its
        ``body`` sent, ``received`` of the answer read (and the stream's end if ``ended``)."""
        head = h11.Request(method=method, target=route.path, headers=route.headers)
        self.conn.send(head)
        if body:
            self.conn.send(h11.Data(data=body))
        self.conn.send(h11.EndOfMessage())
        self.conn.receive_data(received)
        if ended:
            self.conn.receive_data(b"")

    def reusable(self) -> bool:
        return (
            self.stream.error is None
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
        )

    async def send(self, *events: h11.Event) -> None:
        """Frame ``events`` and write them in one piece (nothing at all if that is empty)."""
        data = b"".join(self.conn.send(event) or b"" for event in events)
        if data:
            await self.stream.send_all(data)

    def buffered_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The connector's next event if h11 can make it from what it holds, else NEED_DATA;
        raises h11.RemoteProtocolError if the response is malformed or cut short."""
        return self.conn.next_event()

    async def receive(self) -> bool:
        """Read once from the stream into h11; False at its end. Raises
        trio.BrokenResourceError if the stream was reset."""
        data = await self.stream.receive_some(TUNNEL_CHUNK)
        self.conn.receive_data(data)
        return bool(data)


class ClientConnection:
    """Serves one client connection: requests in, tunnel streams out, responses back."""

    def __init__(
        self,
        services: GatewayServices,
        client: trio.abc.HalfCloseableStream,
        peer: Client,
        router: Router,
        limits: HttpLimits,
        label: str,
    ) -> None:
        self._services = services
        self._client = client
        self._peer = peer
        self._router = router
        self._limits = limits
        self._label = f"{label} {peer}"
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=limits.max_request_line + limits.max_header_bytes
        )
        self._leg: _TunnelLeg | None = None
        self._failure: Refusal | BaseException | None = None
        self._response_started = False

    async def run(self) -> None:
        """Serve requests until the client leaves, an error closes the connection, or a
        response cannot be completed (then the client sees the connection cut)."""
        try:
            while await self._serve_one():
                pass
        except _ClientGone as exc:
            log.debug("%s: client went away: %s", self._label, exc.__cause__ or exc)
        finally:
            await self._drop_leg()
            await close_forcefully(self._client)

    # ------------------------------------------------------------------ client leg

    async def _receive(self) -> bytes:
        try:
            return bytes(await self._client.receive_some(CLIENT_CHUNK))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _ClientGone() from exc

    async def _send(self, *events: h11.Event) -> None:
        await self._write(b"".join(self._conn.send(event) or b"" for event in events))

    async def _write(self, data: bytes) -> None:
        try:
            await self._client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _ClientGone() from exc

    async def _refuse(self, refusal: Refusal, *, body: bool = True) -> None:
        log.info("%s: %d %s", self._label, refusal.status, refusal.message)
        response, payload = render_refusal(refusal, body=body)
        events: list[h11.Event] = [response]
        if payload:
            events.append(h11.Data(data=payload))
        events.append(h11.EndOfMessage())
        await self._send(*events)

    def _request_complete(self) -> bool:
        return self._conn.their_state in (h11.DONE, MIGHT_SWITCH_PROTOCOL)

    async def _answer(self, refusal: Refusal, request: h11.Request) -> bool:
        """Refuse ``request``; whether the connection can take another request."""
        if not self._request_complete() and not refusal.close:
            refusal = replace(refusal, close=True)  # its body is still coming: cannot resync
        await self._refuse(refusal, body=request.method != b"HEAD")
        return not refusal.close and self._next_cycle()

    def _next_cycle(self) -> bool:
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
            return True
        return False

    async def _receive_head(self) -> bytes | None:
        """Read until the next request head is complete (HeadScanner checks it on the way);
        the bytes read that h11 has not been given yet, or None to end the connection."""
        scanner = HeadScanner(self._limits)
        fresh = bytearray()  # bytes h11 has not been given yet
        with trio.move_on_after(self._limits.header_timeout) as scope:
            try:
                leftover, closed = self._conn.trailing_data
                complete = scanner.feed(leftover)
                while complete is None:
                    data = b"" if closed else await self._receive()
                    if not data:
                        if scanner.size:
                            log.info("%s: closed in the middle of a request head", self._label)
                        return None
                    fresh += data
                    complete = scanner.feed(data)
            except BadHead as exc:
                await self._refuse(exc.refusal)
                return None
        if scope.cancelled_caught:
            log.info("%s: no request head within %g s", self._label, self._limits.header_timeout)
            if scanner.size:
                with trio.move_on_after(1):
                    await self._refuse(Refusal(408, "the request head took too long", close=True))
            return None
        return bytes(fresh)

    async def _parse_head(self, fresh: bytes) -> h11.Request | None:
        """Give ``fresh`` to h11 and take the request head; None (after refusing it) if it is
        malformed."""
        self._conn.receive_data(fresh)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            await self._refuse(
                Refusal(exc.error_status_hint, f"malformed request: {exc}", close=True)
            )
            return None
        assert isinstance(event, h11.Request), event  # the scanner saw a complete head
        return event

    def _plain_request(self, fresh: bytes) -> tuple[RequestHead, bytes] | None:
        """The request and its body if ``fresh`` is exactly one plain request (see
        :mod:`._h1`) and h11 holds nothing of it, else None."""
        if self._conn.trailing_data[0]:
            return None
        end = head_end(fresh)
        request = None if end == -1 else parse_request(fresh[:end])
        if request is None or len(fresh) != end + request.body_length:
            return None
        return request, fresh[end:]

    def _catch_up(self, fresh: bytes) -> tuple[h11.Request, list[h11.Event]]:
        """Give h11 the plain request in ``fresh`` after all: the request and its body events,
        for the h11 path to take over."""
        self._conn.receive_data(fresh)
        request = self._conn.next_event()
        assert isinstance(request, h11.Request), request  # h11 accepts what _h1 accepts
        return request, self._pre_read()

    def _pre_read(self) -> list[h11.Event]:
        """Body events already buffered, so malformed input is refused before any stream."""
        events: list[h11.Event] = []
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return events
            assert isinstance(event, h11.Event)
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                return events

    # ------------------------------------------------------------------ one request

    async def _serve_one(self) -> bool:
        fresh = await self._receive_head()
        if fresh is None:
            return False
        plain = self._plain_request(fresh)
        if plain is not None:
            return await self._serve_plain(*plain, fresh)
        request = await self._parse_head(fresh)
        if request is None:
            return False
        try:
            early = self._pre_read()
        except h11.RemoteProtocolError as exc:
            message = f"malformed request body: {exc}"
            await self._refuse(Refusal(exc.error_status_hint, message, close=True))
            return False
        decision = self._router.route(request, self._peer)
        if isinstance(decision, Refusal):
            return await self._answer(decision, request)
        replayable = request.method in IDEMPOTENT and self._request_complete()
        return await self._relay(request, early, decision, replayable=replayable)

    async def _relay(
        self, request: h11.Request, early: list[h11.Event], route: Route, *, replayable: bool
    ) -> bool:
        """Relay a request h11 has parsed (``early``: its body events already read)."""
        while True:
            leg = await self._leg_for(route)
            if isinstance(leg, Refusal):
                return await self._answer(leg, request)
            retry = replayable and leg.exchanges > 0
            outcome = await self._exchange(leg, request, route, early, retry=retry)
            if outcome is not _Outcome.RETRY:
                return await self._finish(outcome, leg, request, route)
            await self._drop_stale_leg()
            replayable = False

    # ------------------------------------------------------------------ one plain request

    async def _serve_plain(self, request: RequestHead, body: bytes, fresh: bytes) -> bool:
        """Relay a plain request (``body``: all of it) without h11 while the exchange stays
        plain; the h11 path takes over where it does not."""
        decision = self._router.route(request, self._peer)
        if isinstance(decision, Refusal):
            return await self._answer(decision, self._catch_up(fresh)[0])
        replayable = request.method in IDEMPOTENT
        while True:
            leg = await self._leg_for(decision)
            if isinstance(leg, Refusal):
                return await self._answer(leg, self._catch_up(fresh)[0])
            head = request_bytes(request.method, decision.path, decision.headers)
            if head is None or not leg.fresh():
                parsed, early = self._catch_up(fresh)
                return await self._relay(parsed, early, decision, replayable=replayable)
            retry = replayable and leg.exchanges > 0
            leg.exchanges += 1
            self._failure = None
            self._response_started = False
            try:
                await leg.stream.send_all(head + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if retry:
                    await self._drop_stale_leg()
                    replayable = False
                    continue
                parsed, _ = self._catch_up(fresh)
                self._failure = exc
                return await self._finish(_Outcome.FAILED, leg, parsed, decision)
            return await self._plain_response(leg, request, body, fresh, decision, retry=retry)

    async def _plain_response(
        self,
        leg: _TunnelLeg,
        request: RequestHead,
        body: bytes,
        fresh: bytes,
        route: Route,
        *,
        retry: bool,
    ) -> bool:
        """Relay the answer to a plain request sent on ``leg``: without h11 if it is plain too,
        else (or when the stream fails before its head is whole) by the h11 path, with both
        h11 connections brought up to where the exchange is."""
        received = bytearray()
        end, ended = -1, False
        # A failure here: the h11 path meets it again when it reads, and handles it.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            end, ended = await read_head(
                leg.stream, received, limit=MAX_RESPONSE_HEAD, chunk=TUNNEL_CHUNK
            )
        response = None if end == -1 else parse_response(received[:end], request.method)
        head = None
        if response is not None:
            headers = forward_response_headers(response.headers.raw_items())
            head = response_bytes(response.status_code, response.reason, headers)
        if response is None or head is None:
            parsed, early = self._catch_up(fresh)
            leg.catch_up(parsed.method, route, body, bytes(received), ended=ended)
            outcome = await self._relay_response(leg, parsed, retry=retry)
            if outcome is not _Outcome.RETRY:
                return await self._finish(outcome, leg, parsed, route)
            await self._drop_stale_leg()
            return await self._relay(parsed, early, route, replayable=False)
        return await self._relay_plain_body(leg, response.body_length, head, received, end, route)

    async def _relay_plain_body(
        self,
        leg: _TunnelLeg,
        length: int,
        head: bytes,
        received: bytearray,
        end: int,
        route: Route,
    ) -> bool:
        """Write the response head and its ``length`` bytes of body to the client, as they
        come; whether the connection can take another request."""
        first = bytes(received[end : end + length])
        left = length - len(first)
        # Bytes past the response: the stream is out of step and is not used again.
        reusable = len(received) - end <= length
        self._response_started = True
        try:
            await self._write(head + first)
            while left:
                data = await leg.stream.receive_some(min(left, TUNNEL_CHUNK))
                if not data:
                    raise h11.RemoteProtocolError("the stream ended early (ConnectionClosed())")
                left -= len(data)
                await self._write(data)
        except _ClientGone:
            await self._drop_leg()
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
            log.warning("%s → %s: response cut off: %s", self._label, route.target, exc)
            await self._drop_leg()
            return False
        if not reusable:
            await self._drop_leg()
        return True

    async def _leg_for(self, route: Route) -> _TunnelLeg | Refusal:
        if self._leg is not None:
            if self._leg.key == route.key and self._leg.reusable():
                return self._leg
            await self._drop_leg()
        attributes = {"client_ip": self._peer.host, "scheme": "http", **dict(route.attributes)}
        try:
            stream = await self._services.open_stream(
                route.app,
                protocol="http",
                target=route.target,
                location=route.location,
                principal=route.principal,
                attributes=attributes,
            )
        except StreamError as exc:
            log.info("%s → %s: %s", self._label, route.target, exc)
            return refusal_for_stream_error(exc, route)
        self._leg = _TunnelLeg(stream, route.key)
        return self._leg

    async def _drop_stale_leg(self) -> None:
        """Drop a kept-alive stream that turned out stale, before retrying on a new one."""
        log.debug("%s: kept-alive stream was stale; retrying on a new one", self._label)
        await self._drop_leg()

    async def _drop_leg(self) -> None:
        leg, self._leg = self._leg, None
        if leg is not None:
            await leg.stream.aclose()

    async def _exchange(
        self,
        leg: _TunnelLeg,
        request: h11.Request,
        route: Route,
        early: list[h11.Event],
        *,
        retry: bool,
    ) -> _Outcome:
        leg.exchanges += 1
        self._failure = None
        self._response_started = False
        head = h11.Request(method=request.method, target=route.path, headers=route.headers)
        try:
            await leg.send(head, *early)  # one write: the head and what came with it
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if retry:
                return _Outcome.RETRY
            self._failure = exc
            return _Outcome.FAILED
        if self._request_complete():  # nothing left to pump: no task, no nursery
            return await self._relay_response(leg, request, retry=retry)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_request, leg)
            outcome = await self._relay_response(leg, request, retry=retry)
            nursery.cancel_scope.cancel()
        return outcome

    async def _pump_request(self, leg: _TunnelLeg) -> None:
        """Client body → tunnel, until the request's end (or a failure resets the stream).

        The client may spend ``body_timeout`` seconds waiting to send, plus one second for
        every ``min_body_rate`` bytes it sent (time the tunnel holds it back does not count):
        a body trickled slower than that is cut off with 408.
        """
        limits = self._limits
        waited = 0.0
        received = 0
        try:
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if self._conn.they_are_waiting_for_100_continue:
                        # The client rightly waits for the backend's "100 Continue": its
                        # body clock has not started (the connector bounds the backend).
                        self._conn.receive_data(await self._receive())
                        continue
                    allowed = limits.body_timeout + received / limits.min_body_rate - waited
                    started = trio.current_time()
                    with trio.move_on_after(max(allowed, 0.0)):
                        self._conn.receive_data(await self._receive())
                        waited += trio.current_time() - started
                        continue
                    self._failure = Refusal(
                        408,
                        f"the request body came slower than {limits.min_body_rate} bytes/s after "
                        f"{limits.body_timeout:g} s (body_timeout, min_body_rate)",
                        close=True,
                    )
                    log.info("%s: %s", self._label, self._failure.message)
                    leg.stream.reset_nowait(
                        ResetCode.CANCELLED, "the client sent its body too slowly"
                    )
                    return
                if not isinstance(event, h11.Data | h11.EndOfMessage):
                    return
                if isinstance(event, h11.Data):
                    received += len(event.data)
                await leg.send(event)
                if isinstance(event, h11.EndOfMessage):
                    return
        except h11.RemoteProtocolError as exc:
            self._failure = Refusal(
                exc.error_status_hint, f"malformed request body: {exc}", close=True
            )
            leg.stream.reset_nowait(ResetCode.PROTOCOL_ERROR, "the client sent a malformed body")
        except _ClientGone as exc:
            self._failure = exc
            leg.stream.reset_nowait(ResetCode.CANCELLED, "the client went away")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the stream failed: the response side reports it

    async def _relay_response(
        self, leg: _TunnelLeg, request: h11.Request, *, retry: bool
    ) -> _Outcome:
        """Relay the connector's answer. What one read from the stream carries goes to the
        client in one write (head, body and end of a small response together), written before
        every wait for the stream, so nothing is held back."""
        trailers_ok = self._conn.their_http_version == b"1.1" and request.method != b"HEAD"
        chunked = False
        out: list[bytes] = []  # framed for the client, not written yet
        silent = True  # not a byte from the stream for this request yet
        try:
            while True:
                event = leg.buffered_event()
                if event is h11.NEED_DATA:
                    if out:
                        await self._write(b"".join(out))
                        out.clear()
                    if await leg.receive():
                        silent = False
                    continue
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if self._conn.their_state is not MIGHT_SWITCH_PROTOCOL:
                            raise h11.RemoteProtocolError("101 before the request was complete")
                        headers = forward_response_headers(
                            event.headers.raw_items(), switching=True
                        )
                        switch = h11.InformationalResponse(
                            status_code=101, headers=headers, reason=event.reason
                        )
                        out.append(self._conn.send(switch) or b"")
                        await self._write(b"".join(out))
                        return _Outcome.UPGRADED
                    if self._conn.their_http_version == b"1.1":
                        out.append(self._conn.send(event) or b"")
                elif isinstance(event, h11.Response):
                    headers = forward_response_headers(event.headers.raw_items())
                    if not self._request_complete():
                        # Answered before the request body ended: the connection will not
                        # carry another request, and the client should hear so.
                        headers.append((b"connection", b"close"))
                    chunked = trailers_ok and b"chunked" in comma_tokens(
                        headers, b"transfer-encoding"
                    )
                    response = h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                    out.append(self._conn.send(response) or b"")
                    self._response_started = True
                elif isinstance(event, h11.Data):
                    out.append(self._conn.send(event) or b"")
                elif isinstance(event, h11.EndOfMessage):
                    end = h11.EndOfMessage(headers=event.headers if chunked else [])
                    out.append(self._conn.send(end) or b"")
                    await self._write(b"".join(out))
                    return _Outcome.DONE
                else:  # ConnectionClosed or PAUSED before the response was complete
                    raise h11.RemoteProtocolError(f"the stream ended early ({event!r})")
        except _ClientGone as exc:
            self._failure = exc  # caught here: raised out of the nursery it would be a group
            return _Outcome.FAILED
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
            if out:  # what was relayed before the failure still reaches the client
                try:
                    await self._write(b"".join(out))
                except _ClientGone as gone:
                    self._failure = gone
                    return _Outcome.FAILED
            # A stream the connector ended (FIN, its reset still on the way) before answering
            # is stale too: h11 is in ERROR then, but it never saw a byte of this response.
            nothing_yet = not self._response_started and (
                silent or leg.conn.their_state is h11.SEND_RESPONSE
            )
            stale = leg.stream.error is None or leg.stream.error.code in _STALE_CODES
            if retry and nothing_yet and stale and self._failure is None:
                return _Outcome.RETRY
            if self._failure is None:
                self._failure = exc
            return _Outcome.FAILED

    async def _finish(
        self, outcome: _Outcome, leg: _TunnelLeg, request: h11.Request, route: Route
    ) -> bool:
        """After one exchange: keep both legs for the next request, or end the connection."""
        if outcome is _Outcome.UPGRADED:
            await self._splice(leg)
            return False
        if outcome is _Outcome.FAILED:
            failure = self._failure
            await self._drop_leg()
            if isinstance(failure, _ClientGone):
                return False
            if self._response_started:
                # Cut the connection without completing the message: the client must see a
                # truncated response, never a short one that looks complete.
                log.warning("%s → %s: response cut off: %s", self._label, route.target, failure)
                return False
            if isinstance(failure, Refusal):
                refusal = failure
            elif leg.stream.error is not None:
                refusal = refusal_for_stream_error(leg.stream.error, route)
            else:
                refusal = Refusal(
                    502, f"bad answer through the tunnel from {route.target}: {failure}"
                )
            return await self._answer(refusal, request)
        if not self._request_complete():
            await self._drop_leg()  # answered before the body ended: the legs cannot resync
            return False
        conn = leg.conn
        if (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        ):
            conn.start_next_cycle()
        else:
            # Bytes past the answer would be read as the next one: the stream is out of step.
            await self._drop_leg()
        return self._next_cycle()

    async def _splice(self, leg: _TunnelLeg) -> None:
        """After a relayed 101: raw bytes both ways until both directions end."""
        client_rest, _ = self._conn.trailing_data
        tunnel_rest, _ = leg.conn.trailing_data

        broken = await splice_streams(
            self._client,
            leg.stream,
            a_name="client",
            b_name="tunnel",
            a_first=client_rest,
            b_first=tunnel_rest,
        )
        if broken is not None:
            log.debug("%s: websocket splice ended: the %s side broke", self._label, broken)
        await self._drop_leg()


async def serve_http(
    services: GatewayServices,
    listen: HostPort,
    router: Router,
    limits: HttpLimits,
    *,
    label: str,
    task_status: trio.TaskStatus[Sequence[HostPort]],
) -> None:
    """Bind ``listen``, report the bound addresses, serve client connections until cancelled."""
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    addresses = [HostPort(*lst.socket.getsockname()[:2]) for lst in listeners]
    task_status.started(addresses)

    limit = ConnectionLimit(limits.max_connections, label)

    async def handle(client: trio.SocketStream) -> None:
        # The connection is ours to close on every path (serve_connections, no wrapper): the
        # outer finally closes it also when the relay's own close was cut short (cancelled
        # while it dropped its tunnel leg).
        try:
            if not limit.try_admit():
                return
            try:
                host, port, *_ = client.socket.getpeername()
            except OSError:
                host, port = "?", 0
            try:
                with contextlib.suppress(OSError):  # already gone: it ends at the first read
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await ClientConnection(
                    services, client, Client(host, port), router, limits, label
                ).run()
            except Exception:
                log.exception("%s %s:%s: unexpected failure", label, host, port)
            finally:
                limit.release()
        finally:
            await close_forcefully(client)

    await serve_connections(handle, listeners, task_name=label)


class _HttpFrontDoor:
    """A listener whose connections are relayed by :class:`ClientConnection` with a router."""

    name = "http"
    _label = "http"

    def __init__(
        self, services: GatewayServices, listen: HostPort, router: Router, limits: HttpLimits
    ) -> None:
        self._services = services
        self._listen = listen
        self._router = router
        self._limits = limits

    async def serve(
        self, *, task_status: trio.TaskStatus[Sequence[HostPort]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled."""
        await serve_http(
            self._services,
            self._listen,
            self._router,
            self._limits,
            label=self._label,
            task_status=task_status,
        )


class HttpProxyFrontDoor(_HttpFrontDoor):
    """The HTTP forward proxy (``proxy_listen``)."""

    name = "http.proxy"
    _label = "http proxy"

    def __init__(self, services: GatewayServices, listen: HostPort, limits: HttpLimits) -> None:
        super().__init__(services, listen, ProxyRouter(services), limits)


class HttpDestinationsFrontDoor(_HttpFrontDoor):
    """The destinations endpoint (``destinations_listen``): ``/destinations/<name>/<path>``."""

    name = "http.destinations"
    _label = "http destinations"

    def __init__(
        self,
        services: GatewayServices,
        listen: HostPort,
        destinations: Sequence[Destination],
        limits: HttpLimits,
    ) -> None:
        super().__init__(services, listen, DestinationsRouter(services, destinations), limits)


def read_limits(table: TableReader) -> HttpLimits:
    """``max_request_line``, ``max_header_bytes``, ``max_headers``, ``header_timeout``."""
    return HttpLimits(
        max_request_line=table.integer("max_request_line", 8192, minimum=256, maximum=1 << 20),
        max_header_bytes=table.integer("max_header_bytes", 65536, minimum=1024, maximum=16 << 20),
        max_headers=table.integer("max_headers", 100, minimum=1, maximum=10_000),
        header_timeout=table.number("header_timeout", 30.0, minimum=0.1, maximum=3600),
        body_timeout=table.number("body_timeout", 30.0, minimum=0.1, maximum=86400),
        min_body_rate=table.integer("min_body_rate", 500, minimum=1, maximum=1 << 30),
        max_connections=table.integer(
            "max_connections", ConnectionLimit.DEFAULT, minimum=1, maximum=1_000_000
        ),
    )


def skip_gateway_keys(table: TableReader) -> None:
    """Accept the gateway's ``[plugins.http]`` keys without acting on them: for the connector's
    hook, when one file serves both roles (call before its ``finish()``)."""
    read_limits(table)
    table.optional_string("proxy_listen")
    table.optional_string("destinations_listen")
    list(table.tables("destinations"))


def front_doors(context: GatewayContext) -> list[FrontDoor]:
    """The front doors ``[plugins.http]`` asks for: the proxy if ``proxy_listen`` is set, the
    destinations endpoint if ``destinations_listen`` is set."""
    table = context.config_for(NAME)
    services = context.services
    limits = read_limits(table)
    proxy_listen = table.host_port("proxy_listen") if "proxy_listen" in table else None
    destinations_listen = (
        table.host_port("destinations_listen") if "destinations_listen" in table else None
    )
    destinations = parse_destinations(table, services)
    table.finish()
    doors: list[FrontDoor] = []
    if proxy_listen is not None:
        doors.append(HttpProxyFrontDoor(services, proxy_listen, limits))
    if destinations_listen is not None:
        doors.append(HttpDestinationsFrontDoor(services, destinations_listen, destinations, limits))
    elif destinations:
        raise table.error(
            "destinations", "destinations are configured but destinations_listen is not set"
        )
    return doors
