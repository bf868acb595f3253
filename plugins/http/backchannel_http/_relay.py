"""The rules of the HTTP relay, sans I/O: which request heads are admitted (limits and the
framing checks against request smuggling), where a proxy request goes, which headers cross from
one leg to the other, and what the client sees when the gateway refuses or a stream fails.

:class:`HeadScanner` looks at the raw bytes of a request head before h11 parses it, for what h11
either cannot tell apart (a long request line from a large header block) or tolerates (obs-fold,
bare LF, duplicated Content-Length, Content-Length together with Transfer-Encoding). The I/O side
is :mod:`backchannel_http._front_door`.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import h11

from backchannel import (
    AppIdentity,
    AuthenticationError,
    ConnectionLimit,
    GatewayServices,
    HostPort,
    NotConnectedError,
    ResetCode,
    StreamError,
    authenticate_authorization,
    is_valid_location_id,
)

#: Removed from every request before it enters a stream; TE: trailers and a WebSocket
#: Upgrade are put back where they apply.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"http2-settings",  # connection-specific (RFC 9113 3.2.1): only an h2c upgrade uses it
    }
)
#: SAP Cloud Connector's control headers and backchannel's alias: for the gateway only.
CONTROL_HEADERS = frozenset(
    {
        b"sap-connectivity-scc-location_id",
        b"sap-connectivity-authentication",
        b"x-backchannel-location",
    }
)
#: A Connection header may name these, but they are never dropped because of it: they carry
#: the message framing and the routing, and removing them would desynchronise the legs.
_PROTECTED = frozenset({b"host", b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what a client may send before its request is routed."""

    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout: float = 30.0
    #: Time a client may wait to send its request body, plus a second per min_body_rate bytes.
    body_timeout: float = 30.0
    min_body_rate: int = 500
    #: Client connections a listener serves at once; more are closed at once.
    max_connections: int = ConnectionLimit.DEFAULT


@dataclass(frozen=True, slots=True)
class Refusal:
    """A response the gateway gives itself instead of relaying one."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the stream to use and the request to write on it."""

    app: AppIdentity
    target: HostPort
    location: str
    path: bytes
    headers: list[tuple[bytes, bytes]]
    #: Extra OPEN attributes; requests with different ones never share a stream.
    attributes: tuple[tuple[str, str], ...] = ()
    #: The cloud user's token for principal propagation (``SAP-Connectivity-Authentication``:
    #: ``Bearer <JWT>`` or ``SAML2.0 <base64 assertion>``), validated by the connector.
    principal: str | None = None

    @property
    def key(self) -> tuple[AppIdentity, HostPort, str, tuple[tuple[str, str], ...], str | None]:
        """Requests with equal keys may share one tunnel stream (one user per stream)."""
        return (self.app, self.target, self.location, self.attributes, self.principal)


@dataclass(frozen=True, slots=True)
class Client:
    """The peer of a client connection, as routers and the OPEN attributes see it."""

    host: str
    port: int

    def __str__(self) -> str:
        return str(HostPort(self.host, self.port))


class RequestFields(Protocol):
    """A request head's fields: items ``(lower-cased name, value)``, :meth:`raw_items` with
    the names as sent (h11's ``Headers``, or :class:`backchannel_http._h1.Fields`)."""

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]: ...

    def raw_items(self) -> list[tuple[bytes, bytes]]:
        """The fields with their names as sent."""
        ...


class Request(Protocol):
    """A parsed request head: an ``h11.Request`` or a plain one from :mod:`._h1`."""

    @property
    def method(self) -> bytes:
        """The method, as sent."""
        ...

    @property
    def target(self) -> bytes:
        """The request target, as sent."""
        ...

    @property
    def headers(self) -> RequestFields:
        """The fields."""
        ...


class Router(Protocol):
    """Decides where each request of a client connection goes."""

    def route(self, request: Request, client: Client) -> Route | Refusal:
        """A route for ``request``, or the refusal to answer instead."""
        ...


class BadHead(Exception):
    """The raw request head breaks a limit or is malformed; ``refusal`` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(status, message, close=True)


class HeadScanner:
    """Incremental checks on the raw bytes of one request head, before h11 parses it.

    :meth:`feed` returns the length of the head once it is complete and valid, None while it
    is incomplete, and raises :class:`BadHead` (414, 431, 400 or 501) as soon as it can tell.
    Lines are found with ``bytes.find``, so a head dripping in byte by byte costs O(n).
    """

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._line_start = 0
        self._headers_start: int | None = None
        self._header_count = 0
        self._framing: list[tuple[bytes, bytes]] = []

    @property
    def size(self) -> int:
        """Bytes seen so far."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> int | None:
        """Add ``data``; the head's length once it is complete."""
        self._buffer += data
        buffer, limits = self._buffer, self._limits
        while True:
            start = self._line_start
            newline = buffer.find(b"\n", start)
            if newline == -1:
                self._check_incomplete(start)
                return None
            if newline == start or buffer[newline - 1] != 0x0D:
                raise BadHead(400, "bare LF in the request head: lines must end with CRLF")
            end = newline - 1  # the line without its CRLF
            if buffer.find(b"\r", start, end) != -1:
                raise BadHead(400, "bare CR in the request head")
            self._line_start = newline + 1
            if self._headers_start is None:
                if end - start > limits.max_request_line:
                    raise _uri_too_long(limits)
                self._headers_start = newline + 1
                continue
            if newline + 1 - self._headers_start > limits.max_header_bytes:
                raise _headers_too_large(limits)
            if end == start:
                self._check_framing()
                return newline + 1
            if buffer[start] in b" \t":
                raise BadHead(400, "obsolete line folding (a header line starting with a space)")
            self._header_count += 1
            if self._header_count > limits.max_headers:
                raise BadHead(431, f"more than {limits.max_headers} header fields")
            line = bytes(buffer[start:end])
            if _CONTROL.search(line):
                # h11 lets most control bytes through in values; backends and log readers
                # may not treat them as harmless text.
                raise BadHead(400, "a control character in a header line")
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in (b"content-length", b"transfer-encoding"):
                self._framing.append((name, value.strip(b" \t")))

    def _check_incomplete(self, start: int) -> None:
        buffer, limits = self._buffer, self._limits
        carriage = buffer.find(b"\r", start)
        if carriage != -1 and carriage != len(buffer) - 1:
            raise BadHead(400, "bare CR in the request head")
        if self._headers_start is None:
            if len(buffer) > limits.max_request_line + 1:
                raise _uri_too_long(limits)
        elif len(buffer) - self._headers_start > limits.max_header_bytes:
            raise _headers_too_large(limits)

    def _check_framing(self) -> None:
        """Refuse the framing ambiguities that request smuggling is built on."""
        lengths = [value for name, value in self._framing if name == b"content-length"]
        codings = [value for name, value in self._framing if name == b"transfer-encoding"]
        if lengths and codings:
            raise BadHead(400, "both Content-Length and Transfer-Encoding are present")
        if len(lengths) > 1 or any(b"," in value for value in lengths):
            raise BadHead(400, "more than one Content-Length")
        if len(codings) > 1:
            raise BadHead(400, "more than one Transfer-Encoding header")
        if codings and codings[0].lower() != b"chunked":
            raise BadHead(501, "only Transfer-Encoding: chunked is supported in requests")


#: Control bytes other than horizontal tab (CR and LF are checked separately).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _uri_too_long(limits: HttpLimits) -> BadHead:
    return BadHead(414, f"the request line is longer than {limits.max_request_line} bytes")


def _headers_too_large(limits: HttpLimits) -> BadHead:
    return BadHead(431, f"the header block is larger than {limits.max_header_bytes} bytes")


# ---------------------------------------------------------------------------- headers


def comma_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The lower-cased comma-separated tokens of every ``name`` header."""
    tokens: set[bytes] = set()
    for key, value in headers:
        if key.lower() == name:
            tokens.update(t.strip(b" \t").lower() for t in value.split(b","))
    tokens.discard(b"")
    return tokens


def is_websocket_upgrade(request: Request) -> bool:
    """An HTTP/1.1 GET asking to switch to WebSocket."""
    headers = request.headers.raw_items()  # comma_tokens compares names lower-cased
    return (
        request.method == b"GET"
        and b"websocket" in comma_tokens(headers, b"upgrade")
        and b"upgrade" in comma_tokens(headers, b"connection")
    )


def host_header(target: HostPort) -> bytes:
    """``host[:port]`` for the Host header (port omitted when 80)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (host if target.port == 80 else f"{host}:{target.port}").encode("ascii")


def forward_request_headers(
    request: Request, host: bytes, *, drop: Iterable[bytes] = ()
) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers for the tunnel leg, with ``Host: host`` first."""
    raw = request.headers.raw_items()
    named = comma_tokens(raw, b"connection") - _PROTECTED
    removed = HOP_BY_HOP | CONTROL_HEADERS | named | {b"host", *drop}
    websocket = is_websocket_upgrade(request)
    headers = [(b"Host", host)]
    for name, value in raw:
        lower = name.lower()
        if lower not in removed:
            headers.append((name, value))
        elif lower == b"te" and value.strip(b" \t").lower() == b"trailers":
            headers.append((name, b"trailers"))
        elif lower == b"upgrade" and websocket:
            headers.append((name, value))
    if websocket:
        headers.append((b"Connection", b"Upgrade"))
    return headers


def forward_response_headers(
    raw: Sequence[tuple[bytes, bytes]], *, switching: bool = False
) -> list[tuple[bytes, bytes]]:
    """The connector's response headers for the client leg (hop-by-hop ones removed)."""
    named = comma_tokens(raw, b"connection") - _PROTECTED
    chunked = bool(comma_tokens(raw, b"transfer-encoding"))
    headers = []
    for name, value in raw:
        lower = name.lower()
        if lower == b"upgrade" and switching:
            headers.append((name, value))
        elif lower in HOP_BY_HOP or lower in named:
            continue
        elif lower == b"content-length" and chunked:
            continue  # never hand a client both framings
        else:
            headers.append((name, value))
    if switching:
        headers.append((b"Connection", b"Upgrade"))
    return headers


# ---------------------------------------------------------------------------- errors


def authenticate(services: GatewayServices, value: bytes | None) -> AppIdentity:
    """Check an ``Authorization`` / ``Proxy-Authorization`` value (see
    :func:`backchannel.authenticate_authorization`). Raises AuthenticationError."""
    return authenticate_authorization(services, value)


def describe_location(location: str) -> str:
    """``location id 'x'`` or ``the default location``, for messages."""
    return f"location id {location!r}" if location else "the default location (no location id)"


def refusal_for_stream_error(error: StreamError, route: Route) -> Refusal:
    """The HTTP answer to a refused or reset tunnel stream."""
    code, reason, target = error.code, error.reason, route.target
    headers = (("X-Backchannel-Error", code.name),)
    if code is ResetCode.NOT_CONNECTED:
        subaccount = (
            error.subaccount if isinstance(error, NotConnectedError) else route.app.subaccount
        )
        location = error.location if isinstance(error, NotConnectedError) else route.location
        message = (
            f"no connector of subaccount {subaccount!r} is connected for "
            f"{describe_location(location)}"
        )
        return Refusal(503, message, headers)
    if code is ResetCode.ACCESS_DENIED:
        return Refusal(403, f"access denied by the connector: {reason}", headers)
    if code is ResetCode.REFUSED:  # a limit (max_streams_per_app, the tunnel's streams)
        return Refusal(503, f"the stream to {target} was refused: {reason}", headers)
    if code is ResetCode.BACKEND_TIMEOUT:
        return Refusal(504, f"the backend of {target} did not answer in time: {reason}", headers)
    if code is ResetCode.BACKEND_UNREACHABLE:
        return Refusal(
            502, f"the connector cannot reach the backend of {target}: {reason}", headers
        )
    if code is ResetCode.UNSUPPORTED_PROTOCOL:
        message = (
            f"the connector does not serve HTTP for {target} (is its mapping's protocol "
            f"http or https?): {reason}"
        )
        return Refusal(502, message, headers)
    return Refusal(502, f"the tunnel stream to {target} failed ({code.name}): {reason}", headers)


def render_refusal(refusal: Refusal, *, body: bool = True) -> tuple[h11.Response, bytes]:
    """The response head and body for a refusal (plain text, one line)."""
    payload = (refusal.message + "\n").encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(payload))),
        *refusal.headers,
    ]
    if refusal.close:
        headers.append(("Connection", "close"))
    try:
        phrase = http.HTTPStatus(refusal.status).phrase
    except ValueError:
        phrase = ""
    response = h11.Response(status_code=refusal.status, headers=headers, reason=phrase)
    return response, payload if body else b""


# ---------------------------------------------------------------------------- proxy targets

LOCATION_HEADERS = (b"sap-connectivity-scc-location_id", b"x-backchannel-location")
PROXY_CHALLENGE = (("Proxy-Authenticate", 'Basic realm="backchannel"'),)

HTTPS_EXPLANATION = (
    "the backchannel proxy does not tunnel TLS: send plain http:// URLs through it; the "
    "connector speaks TLS to the backend itself when the system mapping's protocol is https"
)
ABSOLUTE_URL_EXPLANATION = (
    "this is an HTTP proxy: requests need an absolute URL such as "
    "'GET http://erp.virtual:8000/path HTTP/1.1' (configure this address as the HTTP proxy)"
)

_ALLOW = (("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),)
_ABSOLUTE = re.compile(
    rb"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.S
)
_AUTHORITY = re.compile(
    rb"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?))"
    rb"(?::(?P<port>[0-9]{0,5}))?"
)


class BadTarget(ValueError):
    """A request target the proxy cannot route; ``refusal`` says why."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def parse_proxy_target(method: bytes, target: bytes) -> tuple[HostPort, bytes]:
    """``http://host[:port]/path?q`` → (virtual host:port, origin-form path); raises BadTarget."""
    if method == b"CONNECT":
        raise BadTarget(Refusal(405, HTTPS_EXPLANATION, _ALLOW, close=True))
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        raise BadTarget(Refusal(400, ABSOLUTE_URL_EXPLANATION))
    scheme = match["scheme"].lower()
    if scheme == b"https":
        raise BadTarget(Refusal(405, HTTPS_EXPLANATION, _ALLOW))
    if scheme != b"http":
        message = f"unsupported URL scheme {scheme.decode()!r}: only http:// URLs"
        raise BadTarget(Refusal(400, message))
    authority = _AUTHORITY.fullmatch(match["authority"])
    if authority is None:
        text = match["authority"].decode("ascii", "replace")
        raise BadTarget(Refusal(400, f"invalid host in the URL: {text!r}"))
    host = (authority["v6"] or authority["host"]).decode("ascii").lower()
    port = int(authority["port"]) if authority["port"] else 80
    if not 1 <= port <= 65535:
        raise BadTarget(Refusal(400, f"invalid port {port} in the URL"))
    rest = match["rest"].partition(b"#")[0]
    path = rest if rest.startswith(b"/") else b"/" + rest
    return HostPort(host, port), path


def location_from(headers: Iterable[tuple[bytes, bytes]]) -> str | Refusal:
    """The location id named by the control headers ("" when none), or a 400 refusal."""
    values = {value.strip() for name, value in headers if name in LOCATION_HEADERS}
    if len(values) > 1:
        return Refusal(
            400,
            "conflicting location ids in SAP-Connectivity-SCC-Location_ID / X-Backchannel-Location",
        )
    location = values.pop().decode("ascii", "replace") if values else ""
    if not is_valid_location_id(location):
        return Refusal(
            400, f"invalid location id {location!r}: up to 64 letters, digits, '.', '_' or '-'"
        )
    return location


#: The header that carries the cloud user's token, as SAP's connectivity proxy expects it.
PRINCIPAL_HEADER = b"sap-connectivity-authentication"
_PRINCIPAL_SCHEMES = (b"bearer", b"saml2.0")
#: Longest token accepted in the header (a SAML assertion is the large case).
MAX_PRINCIPAL = 48 * 1024


def principal_from(headers: Iterable[tuple[bytes, bytes]]) -> str | Refusal | None:
    """The user's token from ``SAP-Connectivity-Authentication`` (None without one), or a
    400 refusal for a malformed or repeated header. The connector validates the token."""
    values = [value.strip() for name, value in headers if name == PRINCIPAL_HEADER]
    if not values:
        return None
    if len(values) > 1:
        return Refusal(400, "more than one SAP-Connectivity-Authentication header")
    scheme, _, token = values[0].partition(b" ")
    if scheme.lower() not in _PRINCIPAL_SCHEMES or not token.strip():
        return Refusal(
            400,
            "SAP-Connectivity-Authentication must be 'Bearer <JWT>' or "
            "'SAML2.0 <base64 assertion>'",
        )
    if len(token) > MAX_PRINCIPAL:
        return Refusal(431, f"SAP-Connectivity-Authentication is longer than {MAX_PRINCIPAL} bytes")
    canonical = b"Bearer " if scheme.lower() == b"bearer" else b"SAML2.0 "
    return (canonical + token.strip()).decode("ascii", "replace")


class ProxyRouter:
    """Routes absolute-form ``http://`` requests by URL, credentials and location header."""

    def __init__(self, services: GatewayServices) -> None:
        self._services = services

    def route(self, request: Request, client: Client) -> Route | Refusal:
        """See :class:`backchannel_http._relay.Router`."""
        try:
            target, path = parse_proxy_target(request.method, request.target)
        except BadTarget as exc:
            return exc.refusal
        headers = list(request.headers)
        credentials = [value for name, value in headers if name == b"proxy-authorization"]
        try:
            if len(credentials) > 1:
                raise AuthenticationError("more than one Proxy-Authorization header")
            app = authenticate(self._services, credentials[0] if credentials else None)
        except AuthenticationError as exc:
            self._services.audit.denied(
                "http_proxy_auth", str(exc), client=str(client), target=str(target)
            )
            message = f"proxy authentication required: {exc}"
            return Refusal(407, message, PROXY_CHALLENGE)
        location = location_from(headers)
        if isinstance(location, Refusal):
            return location
        principal = principal_from(headers)
        if isinstance(principal, Refusal):
            return principal
        return Route(
            app,
            target,
            location,
            path,
            forward_request_headers(request, host_header(target)),
            principal=principal,
        )
