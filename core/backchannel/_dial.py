"""Open the connector's outbound TCP stream: directly, or through an HTTP(S) proxy via CONNECT.

Companies often only let outbound traffic leave through an HTTP proxy. The connector's wss://
connection to the gateway therefore goes either straight to the gateway or through a tunnel
opened with ``CONNECT host:port``. Either way :func:`open_tcp` returns a plain byte stream; the
caller wraps it in :class:`trio.SSLStream` for the gateway's TLS, so with an ``https://`` proxy
there is TLS inside TLS (the proxy never sees the gateway traffic in clear).

Errors: everything that goes wrong while dialling is raised as :class:`DialError` (an
:class:`OSError`, so callers that already treat network failures as ``OSError`` keep working);
failures that are the proxy's doing (unreachable proxy, refusal, malformed response, time-out)
are the subclass :class:`ProxyError`. Messages name the proxy only in its redacted form.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

import h11
import trio

from ._version import __version__

__all__ = [
    "DialError",
    "ProxyError",
    "ProxySettings",
    "open_tcp",
    "proxy_from_environment",
]

#: Upper bound on the proxy's response head. A real CONNECT response is a few hundred bytes;
#: the bound stops a broken or hostile proxy from making us buffer without limit.
MAX_RESPONSE_HEAD: Final = 64 * 1024

#: Port used when the proxy URL has none. We follow the URL scheme's default (80 / 443), like
#: Python's urllib/requests/pip and Go's net/http do, because ``https_proxy`` is shared with
#: those tools and the same value should reach the same proxy. (Squid's conventional 3128 and
#: curl's 1080 are not assumed: write the port explicitly.)
DEFAULT_PROXY_PORTS: Final[Mapping[str, int]] = {"http": 80, "https": 443}

_USER_AGENT: Final = f"backchannel/{__version__}"


class DialError(OSError):
    """The TCP stream to the gateway could not be opened (connect failure or time-out)."""


class ProxyError(DialError):
    """The proxy could not be reached, refused the CONNECT, misbehaved or timed out.

    ``status_code`` is the proxy's HTTP status when it answered with a non-2xx response,
    else ``None``.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _has_unsafe_chars(text: str) -> bool:
    # Whitespace and control characters would let a value inject into the CONNECT request
    # line or headers, and urlsplit silently strips some of them: reject them up front.
    return any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _authority(host: str, port: int) -> str:
    """``host:port`` as written in a CONNECT request line, bracketing IPv6 literals."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True, repr=False)
class ProxySettings:
    """An HTTP proxy to tunnel through with CONNECT, usually built with :meth:`parse`.

    ``scheme`` is ``"http"`` (plain TCP to the proxy) or ``"https"`` (TLS to the proxy itself).
    ``username``/``password`` come from the URL's userinfo, percent-decoded; ``password`` is
    ``""`` when only a username was given and ``None`` when there are no credentials. The
    password never appears in :func:`repr` or :meth:`redacted`.
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in DEFAULT_PROXY_PORTS:
            raise ValueError(
                f"unsupported proxy scheme {self.scheme!r}: only 'http' and 'https' are supported"
            )
        if not self.host or _has_unsafe_chars(self.host):
            raise ValueError(f"invalid proxy host {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"proxy port {self.port} is out of range 1-65535")
        if self.username is None and self.password is not None:
            raise ValueError("proxy password given without a username")
        if self.username is not None and ":" in self.username:
            # Basic auth joins user and password with ':' (RFC 7617), so the user can't hold one.
            raise ValueError("proxy username must not contain ':'")

    @classmethod
    def parse(cls, url: str) -> ProxySettings:
        """Parse ``http[s]://[user[:password]@]host[:port][/]``.

        A value without ``://`` (``proxy.corp:3128``) is taken as ``http://``, as curl and
        requests do, because that form is common in ``https_proxy``. A missing port defaults to
        the scheme's (80 or 443, see :data:`DEFAULT_PROXY_PORTS`). Raises :class:`ValueError`
        naming what is wrong; the message never repeats the password.
        """
        text = url.strip()
        if not text:
            raise ValueError("proxy URL is empty")
        if _has_unsafe_chars(text):
            raise ValueError("proxy URL contains whitespace or control characters")
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
        except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed '['
            raise ValueError(f"invalid proxy URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PROXY_PORTS:
            raise ValueError(
                f"unsupported proxy scheme {parts.scheme!r}: only 'http' and 'https' are supported"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("proxy URL must not have a path, query or fragment")
        host = parts.hostname
        if not host:
            raise ValueError("proxy URL has no host")
        try:
            explicit_port = parts.port
        except ValueError as exc:
            # urlsplit's own message ("Port out of range 0-65535", "Port could not be cast to
            # integer value as '...'") names the culprit; say where it came from.
            raise ValueError(f"invalid proxy port: {exc}") from None
        port = DEFAULT_PROXY_PORTS[scheme] if explicit_port is None else explicit_port
        username = None if parts.username is None else unquote(parts.username)
        password = None
        if username is not None:
            password = "" if parts.password is None else unquote(parts.password)
        return cls(scheme=scheme, host=host, port=port, username=username, password=password)

    @property
    def authority(self) -> str:
        """``host:port`` of the proxy (IPv6 hosts bracketed), without credentials."""
        return _authority(self.host, self.port)

    def redacted(self) -> str:
        """The proxy URL for logs and error messages: the password is replaced by ``***``."""
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password:
                userinfo += ":***"
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{self.authority}"

    def __repr__(self) -> str:
        password = None if self.password is None else "***"
        return (
            f"ProxySettings(scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
            f"username={self.username!r}, password={password!r})"
        )

    def _authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic, UTF-8 as RFC 7617 allows), or ``None``."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Environment


def _first_set(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    # An empty variable counts as unset (how shells "unset" it in practice), so we fall back
    # to the next spelling rather than treating "" as a proxy URL.
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def _strip_port(entry: str) -> str:
    """Drop a ``:port`` suffix from a no_proxy entry without mangling bare IPv6 literals."""
    if entry.startswith("["):
        end = entry.find("]")
        return entry[1:end] if end != -1 else entry[1:]
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry  # no colon, or a bare IPv6 literal (several colons)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _bypasses_proxy(target_host: str, no_proxy: str) -> bool:
    """Whether ``target_host`` matches a ``no_proxy`` list (see :func:`proxy_from_environment`)."""
    host = _normalise_host(target_host)
    host_ip = _parse_ip(host)
    for raw_entry in no_proxy.split(","):
        entry = raw_entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry = _normalise_host(_strip_port(entry))
        entry_ip = _parse_ip(entry)
        if entry_ip is not None:
            # Compare parsed addresses so "::1" and "0:0::1" are the same host; no DNS lookups.
            if host_ip is not None and entry_ip == host_ip:
                return True
            continue
        if host_ip is not None:
            continue  # a domain entry never matches an IP literal (no suffix games on digits)
        # ".corp.example", "*.corp.example" and "corp.example" all mean the domain and below.
        domain = entry.removeprefix("*").lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def proxy_from_environment(
    target_host: str, environ: Mapping[str, str] | None = None
) -> ProxySettings | None:
    """The proxy to use for ``target_host`` according to the environment, or ``None``.

    Reads ``https_proxy`` then ``HTTPS_PROXY`` (the first non-empty wins) because the gateway
    is reached over wss://, and skips the proxy when ``no_proxy`` / ``NO_PROXY`` (same order)
    matches: a comma-separated list where ``*`` matches every host, a name matches itself and
    its subdomains (a leading ``.`` or ``*.`` is optional), an IP literal matches only that
    address, and any ``:port`` on an entry is ignored. CIDR ranges are not supported.

    ``environ`` defaults to :data:`os.environ`. Raises :class:`ValueError` naming the variable
    when its URL is invalid.
    """
    env = os.environ if environ is None else environ
    found = _first_set(env, "https_proxy", "HTTPS_PROXY")
    if found is None:
        return None
    name, url = found
    bypass = _first_set(env, "no_proxy", "NO_PROXY")
    if bypass is not None and _bypasses_proxy(target_host, bypass[1]):
        return None
    try:
        return ProxySettings.parse(url)
    except ValueError as exc:
        raise ValueError(f"invalid {name}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Dialling


class _PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``transport_stream``.

    h11 may read past the proxy's response head in the same ``receive_some`` (the gateway can
    speak first, or a proxy can coalesce its 200 with tunnel bytes); those bytes belong to the
    tunnel and are replayed here before reading from the transport again.
    """

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes, *, eof: bool) -> None:
        self.transport_stream = transport_stream
        self._prefix = bytearray(prefix)
        # h11 already saw EOF: the transport must not be read again.
        self._eof = eof
        self._closed = False
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if not self._prefix and not self._eof:
                return await self.transport_stream.receive_some(max_bytes)
            # Every receive_some must be a checkpoint, even when served from memory.
            await trio.lowlevel.checkpoint()
            count = len(self._prefix) if max_bytes is None else min(max_bytes, len(self._prefix))
            chunk = bytes(self._prefix[:count])
            del self._prefix[:count]
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        self._prefix.clear()
        await self.transport_stream.aclose()


class _Phase:
    """What the dial is doing right now, so a time-out message can say where it got stuck."""

    def __init__(self, description: str) -> None:
        self.description = description


def _set_nodelay(stream: trio.SocketStream) -> None:
    # The tunnel carries small interactive frames; Nagle plus delayed ACKs would add ~40 ms
    # stalls. trio enables TCP_NODELAY by default today, but we must not depend on that.
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connect(host: str, port: int, *, proxy: ProxySettings | None) -> trio.SocketStream:
    """TCP-connect with TCP_NODELAY; OSError becomes DialError/ProxyError naming the peer."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        if proxy is not None:
            raise ProxyError(f"cannot connect to proxy {proxy.redacted()}: {exc}") from exc
        raise DialError(f"cannot connect to {_authority(host, port)}: {exc}") from exc
    try:
        _set_nodelay(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _establish_tunnel(
    stream: trio.abc.Stream, host: str, port: int, proxy: ProxySettings
) -> trio.abc.Stream:
    """Run the CONNECT exchange on ``stream`` (already connected to ``proxy``).

    Returns the tunnel stream. Raises :class:`ProxyError`; does not close ``stream`` (the
    caller owns it and closes it on failure).
    """
    target = _authority(host, port)
    headers = [("Host", target), ("User-Agent", _USER_AGENT)]
    authorization = proxy._authorization()
    if authorization is not None:
        headers.append(("Proxy-Authorization", authorization))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    request = conn.send(h11.Request(method="CONNECT", target=target, headers=headers))
    # A CONNECT request has no body; EndOfMessage moves h11 to MIGHT_SWITCH_PROTOCOL.
    request += conn.send(h11.EndOfMessage())
    where = f"proxy {proxy.redacted()}"
    try:
        await stream.send_all(request)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # Also covers a head larger than MAX_RESPONSE_HEAD ("Receive buffer too long")
                # and the proxy closing before it answered.
                raise ProxyError(
                    f"{where} sent an invalid response to CONNECT {target}: {exc}"
                ) from exc
            if event is h11.NEED_DATA:
                # bytes(): trio may hand us a bytearray; h11 is typed for bytes.
                conn.receive_data(bytes(await stream.receive_some()))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue  # 1xx interim responses precede the real answer; skip them
            if isinstance(event, h11.Response):
                break
            raise ProxyError(  # pragma: no cover - h11 yields nothing else before a Response
                f"{where} sent an unexpected {type(event).__name__} to CONNECT {target}"
            )
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        raise ProxyError(f"connection to {where} broke during CONNECT {target}: {cause}") from exc

    status = event.status_code
    reason = event.reason.decode("latin-1", errors="replace")
    if not 200 <= status < 300:
        message = f"{where} refused CONNECT {target}: {status} {reason}".rstrip()
        if status == 407:
            if proxy.username is None:
                message += "; proxy authentication required: set credentials in https_proxy"
                message += " (http://user:password@host:port)"
            else:
                message += (
                    f"; proxy authentication failed for user {proxy.username!r}:"
                    " check the credentials in https_proxy"
                )
        raise ProxyError(message, status_code=status)
    if conn.their_state is not h11.SWITCHED_PROTOCOL:  # pragma: no cover - h11 guarantees it
        raise ProxyError(f"{where} answered CONNECT {target} with {status} but did not switch")
    trailing, closed = conn.trailing_data
    if trailing or closed:
        return _PrefixedStream(stream, trailing, eof=closed)
    return stream


async def _dial_proxy(
    host: str,
    port: int,
    proxy: ProxySettings,
    proxy_ssl_context: ssl.SSLContext | None,
    phase: _Phase,
) -> trio.abc.Stream:
    phase.description = "connecting to"
    tcp = await _connect(proxy.host, proxy.port, proxy=proxy)
    stream: trio.abc.Stream = tcp
    try:
        if proxy.scheme == "https":
            phase.description = "in the TLS handshake with"
            context = proxy_ssl_context or ssl.create_default_context()
            # https_compatible: proxies routinely close TLS without close_notify, and we never
            # need to tell truncation from a clean end at this layer (the gateway TLS runs
            # inside the tunnel and has its own close_notify).
            tls = trio.SSLStream(tcp, context, server_hostname=proxy.host, https_compatible=True)
            stream = tls
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__ or exc
                raise ProxyError(
                    f"TLS handshake with proxy {proxy.redacted()} failed: {cause}"
                ) from exc
        phase.description = f"waiting for the CONNECT {_authority(host, port)} response from"
        return await _establish_tunnel(stream, host, port, proxy)
    except BaseException:
        # Includes Cancelled (e.g. our own time-out): never leak the half-open connection.
        await trio.aclose_forcefully(stream)
        raise


def _check_target(host: str, port: int) -> None:
    # The host ends up in the CONNECT request line; refuse anything that could inject into it.
    if not host or _has_unsafe_chars(host) or "/" in host:
        raise ValueError(f"invalid target host {host!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"target port {port} is out of range 1-65535")


async def open_tcp(
    host: str,
    port: int,
    *,
    proxy: ProxySettings | None,
    proxy_ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
) -> trio.abc.Stream:
    """Open a TCP byte stream to ``host:port``, directly or through an HTTP CONNECT proxy.

    With ``proxy=None`` this is :func:`trio.open_tcp_stream`. With a proxy it connects to the
    proxy (over TLS for ``https://`` proxies, verified with ``proxy_ssl_context`` or
    :func:`ssl.create_default_context`; ignored for ``http://`` proxies), sends
    ``CONNECT host:port`` with Basic credentials when the proxy has them, and returns the
    tunnel once the proxy answers 2xx. Bytes the proxy sent after its response head are kept
    and returned first. TCP_NODELAY is set on the TCP socket either way.

    ``connect_timeout`` bounds the whole dial (DNS, TCP, proxy TLS and the CONNECT exchange).
    Raises :class:`DialError` (direct) or :class:`ProxyError` (proxy), both ``OSError``, with
    the cause chained; the stream is closed on every failure. Raises :class:`ValueError` for
    an invalid ``host`` or ``port``. The caller wraps the result in :class:`trio.SSLStream`
    for the gateway's TLS.
    """
    _check_target(host, port)
    if proxy is None:
        try:
            with trio.fail_after(connect_timeout):
                return await _connect(host, port, proxy=None)
        except trio.TooSlowError:
            raise DialError(
                f"timed out after {connect_timeout:g} s connecting to {_authority(host, port)}"
            ) from None
    phase = _Phase("connecting to")
    try:
        with trio.fail_after(connect_timeout):
            return await _dial_proxy(host, port, proxy, proxy_ssl_context, phase)
    except trio.TooSlowError:
        raise ProxyError(
            f"timed out after {connect_timeout:g} s {phase.description} proxy {proxy.redacted()}"
        ) from None


def is_connection_refused(exc: BaseException) -> bool:
    """Whether a connect failure was a refusal (ECONNREFUSED), also when trio.open_tcp_stream
    reports all its attempts as one OSError with their errors in an ExceptionGroup as context."""
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(is_connection_refused(inner) for inner in exc.exceptions)
    linked = exc.__cause__ or exc.__context__
    return linked is not None and is_connection_refused(linked)
