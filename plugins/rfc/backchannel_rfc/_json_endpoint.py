"""Gateway side: RFC over HTTP with JSON, for cloud applications that have no RFC library.

``POST /rfc/<destination>/<FUNCTION>`` calls a function module of one of the app's
subaccount's RFC destinations; the body is a JSON object of parameters (an empty body is
``{}``), sent with ``Content-Type: application/json``. The answer is 200 with pyrfc's result
dict as a JSON object: the EXPORT, CHANGING and TABLES parameters, and the IMPORT ones with
``?return_import_params=true``. ``GET /rfc/<destination>/<FUNCTION>`` answers the function's
description (``_stub_protocol.description_to_wire``), so that callers can learn the interface.
A namespaced name is written as it is (``/rfc/ERP//BSL/GET_DATA``) or percent-encoded.

The app authenticates with ``Authorization: Basic base64(subaccount/app:secret)`` or
``Authorization: Bearer <app token>``; the destination supplies the ABAP logon. For a
destination with ``authentication = "PrincipalPropagation"`` the app also sends its user's
token, ``SAP-Connectivity-Authentication: Bearer <JWT>``: it travels to the connector, which
logs the user on with a certificate of their own. Every request opens its own ``rfc`` stream
through the tunnel and runs logon, describe, call (or only describe) and close on it: nothing
is pooled or cached between requests.

Options, as query parameters: ``return_import_params`` and ``rstrip`` (booleans: ``true``,
``false``, ``1``, ``0``, or the bare name for true; ``rstrip`` defaults to true, as in pyrfc),
``timeout`` (seconds; sent to the connector, which cancels the backend call after it; capped by
the endpoint's ``call_timeout``) and ``not_requested`` (parameter names, comma-separated or
repeated: pyrfc's option of the same name). Any other query parameter is refused.

JSON values, by ABAP type (requests are parsed with ``parse_float=Decimal``, so no digit of a
number is lost on the way in; :mod:`backchannel_rfc._call_codec` does the mapping):

==========================  ========================================  ============================
ABAP type                   in a request                              in a result
==========================  ========================================  ============================
CHAR, STRING                string                                    string (CHAR right-stripped
                                                                      unless ``rstrip=false``)
NUMC                        string of digits                          string, zero-padded
DATE / TIME                 string ``YYYYMMDD`` / ``HHMMSS``          string ``YYYYMMDD``/``HHMMSS``
INT1, INT2, INT4, INT8      integer                                   integer
FLOAT                       number or numeric string                  number (``"Infinity"``,
                                                                      ``"-Infinity"``, ``"NaN"``
                                                                      as strings)
BCD (P), DECF16, DECF34     string or number                          string, e.g. ``"666.00"``
BYTE (X), XSTRING           base64 string                             base64 string
structure                   object of fields (missing fields initial) object of every field
table                       array of objects                          array of objects
==========================  ========================================  ============================

Values are checked and filled by the function description exactly as the pyrfc-compatible
client does (:mod:`backchannel_rfc._call_codec`): the same exceptions, reported as HTTP errors.

Errors answer ``{"error": {"class", "code", "key", "message", "msg_class", "msg_type",
"msg_number", "msg_v1" .. "msg_v4"}}`` (the pyrfc exception's fields, as ``to_wire`` carries
them; ``null`` where the exception has none) and a header ``X-Backchannel-Error: <class>:<key>``
(the key part empty when there is none). Errors of the HTTP exchange itself have class
``RFCError`` (pyrfc's base class for errors on the caller's side), no code, and a key naming
the problem (``NOT_FOUND``, ``METHOD_NOT_ALLOWED``, ``INVALID_OPTION``, ``MALFORMED_JSON``,
``NOT_AN_OBJECT``, ``UNSUPPORTED_MEDIA_TYPE``, ``BODY_TOO_LARGE``, ``HEADERS_TOO_LARGE``,
``BAD_REQUEST``, ``REQUEST_TIMEOUT``, ``INTERNAL_ERROR``). Status codes:

===  ==========================================================================================
400  malformed JSON or not an object; an unknown option; TypeError / RFCTypeError (a value of
     the wrong type); ExternalRuntimeError RFC_INVALID_PARAMETER (unknown parameter or field),
     RFC_CONVERSION_FAILURE, RFC_BUFFER_TOO_SMALL (a value that does not fit); two
     ``SAP-Connectivity-Authentication`` headers, or one that is not ASCII
401  missing or refused app credentials (LogonError RFC_LOGON_FAILURE; ``WWW-Authenticate``
     Basic and Bearer); a principal propagation destination called without the user's token
     (message starting ``gateway:``), or the user's token refused by the connector (message
     ``principal propagation (<reason>): ...``, such as ``expired``); neither with
     ``WWW-Authenticate``, as the app's own credentials were fine
403  ExternalAuthorizationError: the connector denies the system (a stream refused with
     ACCESS_DENIED) or the function module
404  no such destination for the app's subaccount (the same answer whether the name does not
     exist or belongs to another subaccount); ABAPApplicationError FU_NOT_FOUND; a path that is
     not ``/rfc/<destination>/<FUNCTION>`` or a function name that cannot exist
405  a method other than GET or POST (``Allow``)
408  the request did not arrive completely within ``request_timeout`` (then the connection
     closes)
413  a body over ``max_body``
415  a non-empty body that is not ``application/json``
422  any other ABAPApplicationError: an exception the function module raised
431  a request head over 16 KiB
500  ABAPRuntimeError: a short dump in the ABAP system (the function module failed, as an
     origin server's 500 would); and, with class RFCError and key INTERNAL_ERROR, a failure of
     the gateway itself (logged; no details reach the client)
502  LogonError of the backend (the destination's user or password is wrong, or it refused the
     certificate issued for the user: ``principal propagation (backend_rejected_certificate)``
     and ``(ca_unusable)`` are the connector's or the backend's to fix), and any other
     CommunicationError or failure between gateway, connector and backend
503  no connector of the subaccount is connected for the destination's location (a stream
     refused with NOT_CONNECTED)
504  code RFC_CANCELED or RFC_TIMEOUT: the call ran out of time (the connector cancels it at
     ``timeout``; the gateway gives up itself ``TIMEOUT_MARGIN`` later), or a stream refused
     with BACKEND_TIMEOUT
===  ==========================================================================================

Connections are kept alive; a connection waits ``idle_timeout`` for its next request, and a
request must arrive whole within ``request_timeout`` of its first byte (of the connection, for
the first one). An error answered before the request body was read closes the connection unless
the whole body had already arrived. Each connection is served by its own task: one bad request
never affects another connection. Credentials never appear in answers or logs; refused app
credentials are audited as ``rfc_app_auth``, unknown destinations as ``rfc_destination``.
"""

from __future__ import annotations

import contextlib
import http
import logging
import math
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import h11
import trio

from backchannel import (
    AppIdentity,
    AuthenticationError,
    ConnectionLimit,
    GatewayServices,
    HostPort,
    StreamError,
    close_forcefully,
    serve_connections,
)

from ._call_codec import (
    call_request,
    params_from_json,
    prepare_call,
    read_result,
    result_to_json,
)
from ._destinations import RfcDestinations
from ._errors import (
    CommunicationError,
    LogonError,
    RFCError,
    RFCLibError,
)
from ._json_http import (
    ALLOW,
    CHALLENGE,
    HEAD_END,
    MAX_BODY,
    MAX_HEAD,
    NAME,
    PRINCIPAL_HEADER,
    RECEIVE_SIZE,
    RESET_STATUS,
    SEND_TIMEOUT,
    TIMEOUT_MARGIN,
    CallOptions,
    Failed,
    HttpRefusal,
    canceled,
    credentials_of,
    declares_no_body,
    error_body,
    error_header,
    gateway_refusal,
    is_json,
    json_bytes,
    parse_body,
    parse_options,
    parse_target,
    refusal_for,
    user_principal_of,
)
from ._message_stream import MessageStream
from ._routing import RfcRoute, gateway_logon_error, open_route, resolve_route, stream_refusal
from ._stub_protocol import description_from_wire, description_to_wire

log = logging.getLogger("backchannel.rfc")


# ---------------------------------------------------------------------------- the endpoint


class RfcJsonEndpoint:
    """The HTTP JSON endpoint for RFC: a FrontDoor.

    ``max_body`` bounds a request body (bytes); ``request_timeout`` is the time a whole request
    may take to arrive; ``call_timeout`` caps (and, when a request sets none, is) the
    ``timeout`` of every call; ``idle_timeout`` closes a kept-alive connection with no next
    request.
    """

    name = NAME

    def __init__(
        self,
        services: GatewayServices,
        listen: HostPort,
        destinations: RfcDestinations,
        *,
        max_body: int = MAX_BODY,
        request_timeout: float = 30.0,
        call_timeout: float | None = None,
        idle_timeout: float = 60.0,
        max_connections: int = ConnectionLimit.DEFAULT,
    ) -> None:
        self.connections = ConnectionLimit(max_connections, "rfc.json")
        self.services = services
        self.listen = listen
        self.destinations = destinations
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.call_timeout = call_timeout
        self.idle_timeout = idle_timeout

    async def serve(
        self, *, task_status: trio.TaskStatus[Sequence[HostPort]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound addresses, serve until cancelled."""
        try:
            listeners = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host)
        except OSError as exc:
            message = f"cannot listen on {self.listen}: {exc.strerror or exc}"
            raise OSError(exc.errno, message) from exc
        bound = [HostPort(*listener.socket.getsockname()[:2]) for listener in listeners]
        log.info("RFC JSON endpoint listening on %s", ", ".join(map(str, bound)))
        task_status.started(bound)
        await serve_connections(self._serve_client, listeners, task_name=self.name)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        # The connection is ours to close on every path (serve_connections, no wrapper).
        try:
            if not self.connections.try_admit():  # not wrap(): one coroutine frame less
                return
            try:
                try:
                    host, port, *_ = stream.socket.getpeername()
                    peer = str(HostPort(host, port))
                except OSError:
                    peer = "?"  # already gone; serving it ends at the first read
                with contextlib.suppress(OSError):
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self.serve_connection(stream, peer)
            finally:
                self.connections.release()
        finally:
            await close_forcefully(stream)

    async def serve_connection(self, stream: trio.abc.Stream, peer: str = "?") -> None:
        """Serve one client connection until it ends; raises nothing but Cancelled."""
        try:
            await _HttpConnection(self, stream, peer).run()
        except Exception:
            # One broken connection must never take the listener down.
            log.exception("RFC JSON %s: connection failed", peer)
            await close_forcefully(stream)

    def authenticate(self, request: h11.Request, peer: str) -> AppIdentity:
        """The app, by Basic or Bearer credentials; HttpRefusal 401 (audited) if not."""
        app = ""
        try:
            credentials = credentials_of(request)
            if isinstance(credentials, str):
                return self.services.authenticate_bearer(credentials)
            app = credentials[0]
            return self.services.authenticate_basic(*credentials)
        except AuthenticationError as exc:
            self.services.audit.denied("rfc_app_auth", str(exc), app=app[:128], client=peer)
            error = error_body(gateway_logon_error(f"application credentials refused: {exc}"))
            raise HttpRefusal(401, error, CHALLENGE) from None

    async def invoke(
        self,
        app: AppIdentity,
        destination: str,
        function: str,
        options: CallOptions,
        params: Mapping[str, Any] | None,
        principal: str | None = None,
    ) -> Any:
        """Call ``function`` with ``params`` through ``destination`` (describe it if None):
        the JSON answer, or HttpRefusal. ``principal`` is the user's token for principal
        propagation (``Bearer <JWT>``)."""
        try:
            route = resolve_route(
                self.services,
                self.destinations,
                app,
                {"dest": destination},
                {},
                principal=principal,
                missing_principal_hint=f"send {PRINCIPAL_HEADER}: Bearer <the user's JWT>",
            )
        except LogonError as exc:  # a principal propagation destination, and no user token
            raise refusal_for(exc, 401) from None
        except RFCLibError as exc:  # otherwise the one refusal for a name: it is not there
            raise refusal_for(exc, 404) from None
        timeout = options.timeout
        with trio.move_on_after(math.inf if timeout is None else timeout + TIMEOUT_MARGIN):
            try:
                stream = await open_route(self.services, route)
            except RFCLibError as exc:
                # open_route raises its pyrfc error while handling the StreamError.
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, StreamError):
                    raise refusal_for(exc, RESET_STATUS.get(cause.code, 502)) from None
                raise refusal_for(exc) from None
            async with stream:
                try:
                    return await self._converse(
                        MessageStream(stream), route, function, options, params
                    )
                except Failed as failure:
                    reset = stream.error
                    if isinstance(failure.error, CommunicationError) and reset is not None:
                        # The stream was reset under the call: say why, as open_route does.
                        error = stream_refusal(reset, route)
                        raise refusal_for(error, RESET_STATUS.get(reset.code, 502)) from None
                    raise refusal_for(failure.error) from None
        raise refusal_for(
            canceled(
                f"no answer from partner '{route.target}' within {timeout:g} s "
                f"(and {TIMEOUT_MARGIN:g} s more): the call was canceled"
            )
        )

    async def _converse(
        self,
        messages: MessageStream,
        route: RfcRoute,
        function: str,
        options: CallOptions,
        params: Mapping[str, Any] | None,
    ) -> Any:
        """Logon, describe, call (unless ``params`` is None) and close on one stream."""
        await _request(messages, {"op": "logon", **route.logon})
        described = await _request(messages, {"op": "describe", "name": function})
        fd = description_from_wire(described["description"])
        if params is None:
            answer: Any = description_to_wire(fd)
        else:
            try:
                python_params = params_from_json(fd, params)
                skip_names = {"not_requested": list(options.not_requested)}
                wire_params, skip = prepare_call(fd, python_params, skip_names)
            except (TypeError, RFCError) as exc:
                raise Failed(exc) from None
            request = call_request(
                fd,
                wire_params,
                skip,
                return_import_params=options.return_import_params,
                timeout=options.timeout,
            )
            response = await _request(messages, request)
            result = read_result(fd, response["result"], skip, rstrip=options.rstrip)
            answer = result_to_json(result)
        with contextlib.suppress(Failed):
            await _request(messages, {"op": "close"})  # the answer is complete without it
        return answer


async def _request(messages: MessageStream, message: dict[str, Any]) -> dict[str, Any]:
    try:
        return await messages.request(message)
    except (TypeError, RFCError) as exc:  # the error the answer carries, or the stream broke
        raise Failed(exc) from None


# ---------------------------------------------------------------------------- HTTP


class _ClientGone(Exception):
    """The client's socket broke or closed, or the client stopped reading."""


class _HttpConnection:
    """One client connection: requests parsed by h11 and answered one after the other."""

    def __init__(self, endpoint: RfcJsonEndpoint, stream: trio.abc.Stream, peer: str) -> None:
        self._endpoint = endpoint
        self._stream = stream
        self._peer = peer
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._head_request = False

    async def run(self) -> None:
        try:
            first = True
            while await self._serve_one(first=first):
                first = False
        except _ClientGone as exc:
            log.debug("RFC JSON %s: client went away: %s", self._peer, exc.__cause__ or exc)
        finally:
            await close_forcefully(self._stream)

    async def _receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _ClientGone() from exc

    async def _send(self, *events: h11.Event) -> None:
        data = b"".join(self._conn.send(event) or b"" for event in events)
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _ClientGone() from exc
            return
        raise _ClientGone(f"the client did not read the response within {SEND_TIMEOUT:g} s")

    async def _serve_one(self, *, first: bool) -> bool:
        """Read one request and answer it; whether the connection takes another."""
        if not first and not await self._wait_for_request():
            return False
        deadline = trio.current_time() + self._endpoint.request_timeout
        self._head_request = False
        try:
            request = await self._read_head(deadline)
            if request is None:
                return False
            self._head_request = request.method == b"HEAD"
            payload = json_bytes(await self._answer(request, deadline))
        except HttpRefusal as refusal:
            return await self._refuse(refusal)
        except _ClientGone:
            raise
        except Exception:
            log.exception("RFC JSON %s: request failed", self._peer)
            message = "internal error of the gateway (see its log)"
            return await self._refuse(gateway_refusal(500, "INTERNAL_ERROR", message, close=True))
        await self._respond(200, payload)
        return self._next_cycle()

    async def _wait_for_request(self) -> bool:
        """Between requests: whether the next one starts within ``idle_timeout``."""
        buffered, closed = self._conn.trailing_data
        if buffered or closed:
            return True
        with trio.move_on_after(self._endpoint.idle_timeout):
            self._conn.receive_data(await self._receive())
            return True
        log.debug("RFC JSON %s: idle connection closed", self._peer)
        return False

    async def _read_head(self, deadline: float) -> h11.Request | None:
        """The next request head; None if the client closes (or sends nothing) instead."""
        too_large = f"the request head exceeds {MAX_HEAD} bytes"
        with trio.move_on_at(deadline):
            while True:
                # h11 only limits a head that is still incomplete: one that arrived whole in
                # a single read is measured here.
                buffered = self._conn.trailing_data[0]
                if len(buffered) > MAX_HEAD and not HEAD_END.search(buffered, 0, MAX_HEAD):
                    raise gateway_refusal(431, "HEADERS_TOO_LARGE", too_large, close=True)
                try:
                    event = self._conn.next_event()
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    if status == 431:
                        raise gateway_refusal(
                            431, "HEADERS_TOO_LARGE", too_large, close=True
                        ) from None
                    message = f"malformed request: {exc}"
                    raise gateway_refusal(status, "BAD_REQUEST", message, close=True) from None
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._receive())
                    continue
                return event if isinstance(event, h11.Request) else None
        if not self._conn.trailing_data[0]:
            return None  # the client sent nothing: there is nothing to answer
        raise self._too_slow()

    def _too_slow(self) -> HttpRefusal:
        message = f"the request did not arrive within {self._endpoint.request_timeout:g} s"
        return gateway_refusal(408, "REQUEST_TIMEOUT", message, close=True)

    async def _read_body(self, request: h11.Request, deadline: float) -> bytes:
        """The whole body, at most ``max_body`` bytes, by ``deadline``."""
        max_body = self._endpoint.max_body
        message = f"the body exceeds {max_body} bytes"
        too_large = gateway_refusal(413, "BODY_TOO_LARGE", message, close=True)
        lengths = [value for name, value in request.headers if name == b"content-length"]
        if lengths and int(lengths[0]) > max_body:  # h11 made sure it is one number
            raise too_large
        if self._conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        with trio.move_on_at(deadline):
            while True:
                try:
                    event = self._conn.next_event()
                except h11.RemoteProtocolError as exc:
                    message = f"malformed body: {exc}"
                    raise gateway_refusal(400, "BAD_REQUEST", message, close=True) from None
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._receive())
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > max_body:
                        raise too_large
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                else:
                    raise _ClientGone(f"{event!r} inside the request body")
        raise self._too_slow()

    async def _answer(self, request: h11.Request, deadline: float) -> Any:
        """The JSON answer to a request; HttpRefusal for anything but 200."""
        endpoint = self._endpoint
        destination, function, query = parse_target(request.target)
        if request.method not in (b"GET", b"POST"):
            message = f"{request.method.decode('ascii', 'replace')} is not allowed: use {ALLOW}"
            raise gateway_refusal(405, "METHOD_NOT_ALLOWED", message, (("Allow", ALLOW),))
        options = parse_options(query, call_timeout=endpoint.call_timeout)
        app = endpoint.authenticate(request, self._peer)
        principal = user_principal_of(request)
        if request.method == b"GET":
            await self._read_body(request, deadline)  # ignored, but bounded all the same
            return await endpoint.invoke(app, destination, function, options, None, principal)
        types = [value for name, value in request.headers if name == b"content-type"]
        if not (len(types) == 1 and is_json(types[0])) and not declares_no_body(request):
            message = "send the parameters as Content-Type: application/json"
            raise gateway_refusal(415, "UNSUPPORTED_MEDIA_TYPE", message)
        body = await self._read_body(request, deadline)
        params = parse_body(body)
        return await endpoint.invoke(app, destination, function, options, params, principal)

    async def _refuse(self, refusal: HttpRefusal) -> bool:
        """Answer with an error; whether the connection takes another request."""
        error = refusal.error
        log.info(
            "RFC JSON %s: %d %s:%s %s",
            self._peer,
            refusal.status,
            error["class"],
            error["key"],
            error["message"],
        )
        close = refusal.close or not self._take_buffered_body()
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False  # nothing can be answered any more
        headers = [("X-Backchannel-Error", error_header(error)), *refusal.headers]
        await self._respond(refusal.status, json_bytes({"error": error}), headers, close=close)
        return not close and self._next_cycle()

    def _take_buffered_body(self) -> bool:
        """Take the rest of the request body from what has arrived; whether that completed
        the request (if not, the connection cannot carry another one)."""
        if self._conn.their_state is h11.SEND_BODY:
            with contextlib.suppress(h11.RemoteProtocolError):
                while isinstance(self._conn.next_event(), h11.Data):
                    pass
        return self._conn.their_state is h11.DONE

    async def _respond(
        self,
        status: int,
        payload: bytes,
        headers: Sequence[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        head = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *headers,
        ]
        if close:
            head.append(("Connection", "close"))
        response = h11.Response(
            status_code=status, headers=head, reason=http.HTTPStatus(status).phrase
        )
        if self._head_request:  # HEAD is refused (405), and its answer has no body
            await self._send(response, h11.EndOfMessage())
        else:
            await self._send(response, h11.Data(data=payload), h11.EndOfMessage())

    def _next_cycle(self) -> bool:
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
            return True
        return False
