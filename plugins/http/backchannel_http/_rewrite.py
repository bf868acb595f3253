"""Header rewriting between the tunnel (virtual system) and the backend (internal system).

Pure functions over h11-style header lists (``[(name, value), ...]`` with lower-case names):
no I/O, so every rule is unit-tested with plain bytes.

Requests lose their hop-by-hop headers (RFC 9110 section 7.6.1), get the Host the mapping asks
for and the ``X-Forwarded-*`` headers. Responses lose their hop-by-hop headers and every
mention of the internal system that a redirect or a cookie would otherwise carry back to the
cloud: ``Location``/``Content-Location`` authorities and ``Set-Cookie`` domains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "Headers",
    "HostHeaderMode",
    "Origin",
    "has_body",
    "host_matches",
    "map_cookie_domain",
    "map_location",
    "printable",
    "request_headers",
    "response_headers",
    "wants_websocket",
]

Headers = list[tuple[bytes, bytes]]
HostHeaderMode = Literal["virtual", "internal"]

DEFAULT_PORTS = {"http": 80, "https": 443}

#: Hop-by-hop headers (RFC 9110 7.6.1 plus the historical Keep-Alive and Proxy-Connection).
#: Transfer-Encoding is not here: it is the framing, which h11 re-creates on each leg.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"http2-settings"}
)


@dataclass(frozen=True, slots=True)
class Origin:
    """A scheme, host and port: one side's idea of where the web server lives."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host[:port]``, the port left out when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if DEFAULT_PORTS.get(self.scheme) == self.port:
            return host
        return f"{host}:{self.port}"

    def same_server(self, host: str, port: int) -> bool:
        """Whether ``host:port`` (host without brackets) names this origin's server."""
        return host.lower() == self.host.lower() and port == self.port


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated tokens of every ``name`` header, stripped and lower-cased."""
    found: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            found.extend(t.strip().lower() for t in value.split(b",") if t.strip())
    return found


def wants_websocket(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the request asks to be upgraded to a WebSocket."""
    return b"websocket" in _tokens(headers, b"upgrade")


def has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request with these headers carries a body (RFC 9112 6.3: requests without
    Content-Length or Transfer-Encoding have none)."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() != b"0"):
            return True
    return False


def host_matches(value: bytes, origin: Origin) -> bool:
    """Whether a Host header value names ``origin`` (no port or an empty one: the scheme's
    default)."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return False
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        port = DEFAULT_PORTS.get(origin.scheme, 0)
    elif port_text.isdigit() and port_text.isascii():
        port = int(port_text)
    else:
        return False
    return bool(host) and origin.same_server(host, port)


_PROTECTED = frozenset({b"host", b"content-length", b"transfer-encoding"})


def _strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], *, keep_upgrade: bool) -> Headers:
    """Remove hop-by-hop headers and those the Connection header names.

    With ``keep_upgrade`` the ``Upgrade`` header survives and ``Connection: upgrade`` is put
    back (a WebSocket handshake needs both on the next hop too).
    """
    # Framing and routing headers are never the sender's to remove (the gateway keeps the
    # same set): dropping them would desynchronise the two ends' idea of the message.
    named = set(_tokens(headers, b"connection")) - {
        b"host",
        b"content-length",
        b"transfer-encoding",
    }
    out: Headers = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"upgrade":
            continue  # only ever "websocket", set below: no h2c or other protocol switch
        if lower == b"te":
            # "TE: trailers" is the only value that means something end to end.
            if b"trailers" in _tokens([(name, value)], b"te"):
                out.append((b"te", b"trailers"))
        elif lower in _HOP_BY_HOP or lower in named or lower.startswith(b"proxy-"):
            continue
        else:
            out.append((lower, value))
    if keep_upgrade:
        out.append((b"upgrade", b"websocket"))
        out.append((b"connection", b"upgrade"))
    return out


#: Forwarding headers a client could forge to mislead the backend; the connector sets its own.
#: Compared with ``_`` read as ``-``: CGI, WSGI and PHP read ``SSL_CLIENT_CERT``,
#: ``ssl-client-cert`` and ``SSL-Client_Cert`` alike (all three are ``HTTP_SSL_CLIENT_CERT``).
_CLIENT_FORWARDING = frozenset(
    {
        # Only the connector may say which certificate a user has (principal propagation): a
        # client's own SSL_CLIENT_CERT would be believed by a backend that trusts the connector.
        b"ssl-client-cert",
        b"x-ssl-client-cert",
        b"client-cert",  # RFC 9440
        b"client-cert-chain",
        b"x-client-cert",
        b"x-forwarded-client-cert",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)


def _without(headers: Headers, *names: bytes) -> Headers:
    return [(k, v) for k, v in headers if k not in names]


def request_trailers(trailers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """A request's trailers as the backend may see them: without the headers only the
    connector may set (user certificates, forwarding), which some servers merge into the
    request's headers."""
    return _without_client_forwarding(list(trailers))


def _without_client_forwarding(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k.replace(b"_", b"-") not in _CLIENT_FORWARDING]


def request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    host_mode: HostHeaderMode,
    internal: Origin,
    virtual: Origin,
    client_ip: object,
    scheme: str,
    websocket: bool,
) -> Headers:
    """The headers to send to the backend for a request that arrived through the tunnel.

    ``host_mode="virtual"`` keeps the Host as received; ``"internal"`` sends the internal
    authority and the received one in ``X-Forwarded-Host`` (a request without Host, HTTP/1.0,
    gets the ``virtual`` authority). ``X-Forwarded-For`` gets ``client_ip`` appended (the
    gateway's stream attribute, used only if it is a printable ASCII string) and
    ``X-Forwarded-Proto`` says ``scheme``. With ``websocket`` the Upgrade handshake headers
    are kept. Content-Length is dropped when Transfer-Encoding is
    present (a request with both is a smuggling attempt; the chunked framing wins, as in h11).
    """
    out = _without_client_forwarding(_strip_hop_by_hop(headers, keep_upgrade=websocket))
    received_host = next((v for k, v in out if k == b"host"), None)
    if received_host is None:
        received_host = virtual.authority.encode("ascii")
        out.insert(0, (b"host", received_host))
    if host_mode == "internal":
        out = _without(out, b"host", b"x-forwarded-host")
        out.insert(0, (b"host", internal.authority.encode("ascii")))
        out.append((b"x-forwarded-host", received_host))
    forwarded_for: list[bytes] = []
    ip = client_ip if isinstance(client_ip, str) else ""
    if ip and ip.isascii() and ip.isprintable():
        forwarded_for.append(ip.encode("ascii"))
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", scheme.encode("ascii", "replace")))
    if any(k == b"transfer-encoding" for k, _ in out):
        out = _without(out, b"content-length")
    return out


def response_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    status: int,
    backend: Origin,
    virtual: Origin,
) -> Headers:
    """The headers to send through the tunnel for a backend response.

    Hop-by-hop headers go (except the Upgrade handshake of a 101); redirects and cookies that
    name the backend name the virtual system instead.
    """
    out = _strip_hop_by_hop(headers, keep_upgrade=status == 101)
    mapped: Headers = []
    for name, value in out:
        if name in (b"location", b"content-location"):
            value = map_location(value, backend=backend, virtual=virtual)
        elif name == b"set-cookie":
            value = map_cookie_domain(value, internal_host=backend.host, virtual_host=virtual.host)
        mapped.append((name, value))
    return mapped


def map_location(value: bytes, *, backend: Origin, virtual: Origin) -> bytes:
    """Map an absolute URL on the backend's host and port to the virtual system.

    Relative references, other hosts and other ports are returned unchanged. A URL without a
    port is on the default port of its scheme (or of the backend's, for ``//host/path``).
    """
    try:
        text = value.decode("ascii")
        parts = urlsplit(text)
        port = parts.port
    except (UnicodeDecodeError, ValueError):
        return value
    if not parts.netloc or parts.hostname is None:
        return value
    scheme = parts.scheme.lower() or backend.scheme
    if scheme not in DEFAULT_PORTS:
        return value
    if not backend.same_server(parts.hostname, port or DEFAULT_PORTS[scheme]):
        return value
    new_scheme = virtual.scheme if parts.scheme else ""
    url = urlunsplit((new_scheme, virtual.authority, parts.path, parts.query, parts.fragment))
    if not parts.path and (parts.query or parts.fragment):
        url = url.replace(virtual.authority, virtual.authority + "/", 1)
    return url.encode("ascii")


def map_cookie_domain(value: bytes, *, internal_host: str, virtual_host: str) -> bytes:
    """Replace a ``Domain`` attribute naming the internal host (or a domain above it) with
    the virtual host; other cookies are returned unchanged.

    A cookie for a parent domain of the internal host becomes a cookie for the virtual host:
    the cloud client would reject the internal domain anyway, and it must not learn it.
    """
    internal = internal_host.lower().encode("ascii", "replace")
    parts = value.split(b";")
    changed = False
    for index in range(1, len(parts)):
        name, sep, domain = parts[index].partition(b"=")
        if not sep or name.strip().lower() != b"domain":
            continue
        domain = domain.strip().lstrip(b".").lower()
        if domain and (domain == internal or internal.endswith(b"." + domain)):
            parts[index] = b" Domain=" + virtual_host.encode("ascii", "replace")
            changed = True
    return b";".join(parts) if changed else value


def printable(raw: bytes) -> str:
    """``raw`` (a request target, a header value) for a message: printable ASCII kept,
    everything else percent-encoded."""
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in raw)
