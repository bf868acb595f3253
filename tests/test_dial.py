"""Tests for backchannel._dial: direct dialling, HTTP CONNECT proxies, proxy settings."""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backchannel._dial import (
    DialError,
    ProxyError,
    ProxySettings,
    _establish_tunnel,
    _PrefixedStream,
    open_tcp,
    proxy_from_environment,
)
from tests.connect_proxy import serve_connect_proxy

#: Upper bound for any single test; everything here is loopback or in-memory.
GUARD = 10.0
GREETING = b"HELLO from target\n"
SECRET = "s3cr3t-p@ss"


# ---------------------------------------------------------------------------------------------
# Helpers


async def start_echo_server(
    nursery: trio.Nursery, *, greeting: bytes = b"", ssl_context: ssl.SSLContext | None = None
) -> int:
    """An echo server on 127.0.0.1 that sends ``greeting`` as soon as a client connects."""

    async def handler(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            stream = trio.SSLStream(tcp, ssl_context, server_side=True, https_compatible=True)
        try:
            if greeting:
                await stream.send_all(greeting)
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start_silent_server(nursery: trio.Nursery, saw_eof: trio.Event) -> int:
    """A server that never answers; sets ``saw_eof`` when the client closes its connection."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        saw_eof.set()

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def receive_exactly(stream: trio.abc.Stream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


async def echo_roundtrip(stream: trio.abc.Stream, payload: bytes = b"ping\n") -> None:
    await stream.send_all(payload)
    assert await receive_exactly(stream, len(payload)) == payload


async def read_head(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"EOF before end of head: {data!r}"
        data += chunk
    return data


async def run_against_canned_proxy(
    reply: bytes,
    client: Callable[[trio.abc.Stream], Awaitable[None]],
    *,
    then_eof: bool = False,
) -> bytes:
    """Run ``client`` against an in-memory proxy that answers any head with ``reply``.

    One ``send_all`` means the client's first ``receive_some`` sees the whole reply, so any
    bytes after the head deterministically land in h11's trailing data. Returns the request.
    """
    client_side, proxy_side = trio.testing.memory_stream_pair()
    request = b""

    async def proxy_task() -> None:
        nonlocal request
        request = await read_head(proxy_side)
        await proxy_side.send_all(reply)
        if then_eof:
            await proxy_side.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy_task)
        await client(client_side)
    return request


# ---------------------------------------------------------------------------------------------
# TLS material, generated per session (no files shipped, nothing fetched)


class TlsMaterial:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backchannel test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial(tmp_path_factory.mktemp("tls"))


# ---------------------------------------------------------------------------------------------
# Direct connections


async def test_direct_connection_echoes_and_sets_nodelay(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        port = await start_echo_server(nursery)
        stream = await open_tcp("127.0.0.1", port, proxy=None)
        async with stream:
            assert isinstance(stream, trio.SocketStream)
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            await echo_roundtrip(stream)


async def test_direct_connection_refused_names_target() -> None:
    port = closed_port()
    with trio.fail_after(GUARD), pytest.raises(DialError) as info:
        await open_tcp("127.0.0.1", port, proxy=None)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert not isinstance(info.value, ProxyError)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    ("host", "port"),
    [("", 443), ("a b", 443), ("evil\r\nX-Injected: 1", 443), ("ok", 0), ("ok", 65536)],
)
async def test_open_tcp_rejects_invalid_target(host: str, port: int) -> None:
    with pytest.raises(ValueError, match="target"):
        await open_tcp(host, port, proxy=None)


# ---------------------------------------------------------------------------------------------
# Through the test proxy


async def test_proxy_without_credentials(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        target = await start_echo_server(nursery, greeting=GREETING)
        proxy = await serve_connect_proxy(nursery)
        settings = ProxySettings.parse(proxy.url())
        stream = await open_tcp("127.0.0.1", target, proxy=settings)
        async with stream:
            assert await receive_exactly(stream, len(GREETING)) == GREETING
            await echo_roundtrip(stream)
        assert proxy.connect_log == [f"127.0.0.1:{target}"]
        assert proxy.auth_log == [False]


async def test_proxy_with_credentials_keeps_pipelined_bytes(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        target = await start_echo_server(nursery, greeting=GREETING)
        # The proxy writes its 200 and the target's greeting in one send, so the greeting is
        # read together with the response head and must come back via trailing_data.
        proxy = await serve_connect_proxy(
            nursery, username="alice", password=SECRET, coalesce_first_chunk=True
        )
        settings = ProxySettings.parse(proxy.url(userinfo="alice:s3cr3t-p%40ss@"))
        assert settings.password == SECRET
        stream = await open_tcp("localhost", target, proxy=settings)
        async with stream:
            assert isinstance(stream, _PrefixedStream)
            assert await receive_exactly(stream, len(GREETING)) == GREETING
            await echo_roundtrip(stream, b"x" * 100_000)
        assert proxy.connect_log == [f"localhost:{target}"]
        assert proxy.auth_log == [True]


async def test_wrong_credentials_report_407_without_password(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        target = await start_echo_server(nursery)
        proxy = await serve_connect_proxy(nursery, username="alice", password="right")
        settings = ProxySettings.parse(proxy.url(userinfo=f"alice:{SECRET.replace('@', '%40')}@"))
        with pytest.raises(ProxyError) as info:
            await open_tcp("127.0.0.1", target, proxy=settings)
    message = str(info.value)
    assert info.value.status_code == 407
    assert "407" in message
    assert "authentication failed for user 'alice'" in message
    assert f"127.0.0.1:{proxy.port}" in message
    assert SECRET not in message
    assert "s3cr3t" not in message
    assert proxy.auth_log == [True]


async def test_missing_credentials_hint(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        target = await start_echo_server(nursery)
        proxy = await serve_connect_proxy(nursery, username="alice", password="right")
        with pytest.raises(ProxyError, match="407") as info:
            await open_tcp("127.0.0.1", target, proxy=ProxySettings.parse(proxy.url()))
    assert "proxy authentication required: set credentials in https_proxy" in str(info.value)
    assert proxy.auth_log == [False]


async def test_proxy_refuses_non_local_target(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        proxy = await serve_connect_proxy(nursery)
        with pytest.raises(ProxyError, match="403") as info:
            await open_tcp("gateway.example", 443, proxy=ProxySettings.parse(proxy.url()))
    assert info.value.status_code == 403
    assert "CONNECT gateway.example:443" in str(info.value)
    assert proxy.connect_log == ["gateway.example:443"]


async def test_proxy_cannot_reach_target(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        proxy = await serve_connect_proxy(nursery)
        with pytest.raises(ProxyError) as info:
            await open_tcp("127.0.0.1", closed_port(), proxy=ProxySettings.parse(proxy.url()))
    assert info.value.status_code == 502


async def test_test_proxy_rejects_other_methods(nursery: trio.Nursery) -> None:
    with trio.fail_after(GUARD):
        proxy = await serve_connect_proxy(nursery)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as stream:
            await stream.send_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await read_head(stream)).startswith(b"HTTP/1.1 405 ")
    assert proxy.connect_log == []
    assert [r.status for r in proxy.records] == [405]


async def test_unreachable_proxy() -> None:
    settings = ProxySettings.parse(
        f"http://bob:{SECRET.replace('@', '%40')}@127.0.0.1:{closed_port()}"
    )
    with trio.fail_after(GUARD), pytest.raises(ProxyError, match="cannot connect to proxy") as info:
        await open_tcp("127.0.0.1", 443, proxy=settings)
    assert settings.redacted() in str(info.value)
    assert "s3cr3t" not in str(info.value)


async def test_proxy_timeout_closes_connection(nursery: trio.Nursery) -> None:
    saw_eof = trio.Event()
    with trio.fail_after(GUARD):
        port = await start_silent_server(nursery, saw_eof)
        settings = ProxySettings.parse(f"http://127.0.0.1:{port}")
        with pytest.raises(
            ProxyError, match=re.escape("timed out after 0.2 s waiting for the CONNECT")
        ):
            await open_tcp("127.0.0.1", 443, proxy=settings, connect_timeout=0.2)
        await saw_eof.wait()  # the half-open proxy connection was closed, not leaked


async def test_https_proxy_with_tls_inside(nursery: trio.Nursery, tls: TlsMaterial) -> None:
    with trio.fail_after(GUARD):
        target = await start_echo_server(
            nursery, greeting=GREETING, ssl_context=tls.server_context()
        )
        proxy = await serve_connect_proxy(nursery, ssl_context=tls.server_context())
        settings = ProxySettings.parse(proxy.url(scheme="https"))
        tunnel = await open_tcp(
            "localhost", target, proxy=settings, proxy_ssl_context=tls.client_context()
        )
        # TLS to the gateway inside the TLS to the proxy, as the connector does it.
        stream = trio.SSLStream(tunnel, tls.client_context(), server_hostname="localhost")
        async with stream:
            assert await receive_exactly(stream, len(GREETING)) == GREETING
            await echo_roundtrip(stream)
        assert proxy.connect_log == [f"localhost:{target}"]


async def test_https_proxy_untrusted_certificate(nursery: trio.Nursery, tls: TlsMaterial) -> None:
    with trio.fail_after(GUARD):
        proxy = await serve_connect_proxy(nursery, ssl_context=tls.server_context())
        settings = ProxySettings.parse(proxy.url(scheme="https"))
        with pytest.raises(
            ProxyError, match=re.escape("TLS handshake with proxy https://127.0.0.1")
        ):
            # The default context does not trust the throwaway CA.
            await open_tcp("localhost", 443, proxy=settings)
    assert proxy.connect_log == []


# ---------------------------------------------------------------------------------------------
# The CONNECT exchange against canned in-memory responses

PLAIN = ProxySettings("http", "proxy.corp", 3128)


async def test_trailing_bytes_are_replayed_first() -> None:
    received: list[bytes | bytearray] = []

    async def client(stream: trio.abc.Stream) -> None:
        tunnel = await _establish_tunnel(stream, "gw.example", 443, PLAIN)
        received.append(await tunnel.receive_some(3))
        received.append(await tunnel.receive_some())
        await tunnel.send_all(b"up")  # sending goes straight to the transport

    with trio.fail_after(GUARD):
        request = await run_against_canned_proxy(
            b"HTTP/1.1 200 Connection established\r\n\r\nPIPELINED", client
        )
    assert received == [b"PIP", b"ELINED"]
    assert request.startswith(b"CONNECT gw.example:443 HTTP/1.1\r\n")
    assert b"\r\nhost: gw.example:443\r\n" in request.lower()
    assert b"proxy-authorization" not in request.lower()


async def test_request_carries_basic_credentials_and_ipv6_authority() -> None:
    settings = ProxySettings("http", "proxy.corp", 3128, "alice", "pä:ss")

    async def client(stream: trio.abc.Stream) -> None:
        tunnel = await _establish_tunnel(stream, "2001:db8::1", 443, settings)
        assert tunnel is stream  # nothing buffered: no wrapper needed

    with trio.fail_after(GUARD):
        request = await run_against_canned_proxy(b"HTTP/1.0 200 OK\r\n\r\n", client)
    assert request.startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n")
    # base64("alice:pä:ss" as UTF-8)
    assert b"Proxy-Authorization: Basic YWxpY2U6cMOkOnNz\r\n" in request


async def test_interim_response_is_skipped_and_eof_is_kept() -> None:
    async def client(stream: trio.abc.Stream) -> None:
        tunnel = await _establish_tunnel(stream, "gw.example", 443, PLAIN)
        assert await tunnel.receive_some() == b"last words"
        assert await tunnel.receive_some() == b""

    with trio.fail_after(GUARD):
        await run_against_canned_proxy(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: b\r\n\r\nlast words",
            client,
            then_eof=True,
        )


@pytest.mark.parametrize(
    ("reply", "pattern"),
    [
        (b"", "invalid response"),  # closed before answering
        (b"SSH-2.0-OpenSSH\r\n\r\n", "invalid response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024), "invalid response"),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "503 Service Unav"),
    ],
)
async def test_bad_proxy_responses(reply: bytes, pattern: str) -> None:
    async def client(stream: trio.abc.Stream) -> None:
        with pytest.raises(ProxyError, match=pattern) as info:
            await _establish_tunnel(stream, "gw.example", 443, PLAIN)
        assert "http://proxy.corp:3128" in str(info.value)

    with trio.fail_after(GUARD):
        await run_against_canned_proxy(reply, client, then_eof=True)


# ---------------------------------------------------------------------------------------------
# ProxySettings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp:3128", ProxySettings("http", "proxy.corp", 3128)),
        ("https://proxy.corp", ProxySettings("https", "proxy.corp", 443)),
        ("http://proxy.corp", ProxySettings("http", "proxy.corp", 80)),
        ("HTTP://Proxy.Corp:8080/", ProxySettings("http", "proxy.corp", 8080)),
        ("proxy.corp:3128", ProxySettings("http", "proxy.corp", 3128)),
        ("  http://10.0.0.1:3128  ", ProxySettings("http", "10.0.0.1", 3128)),
        ("http://[::1]:3128", ProxySettings("http", "::1", 3128)),
        (
            "http://al%20ice:p%40ss%3Aword@proxy:1",
            ProxySettings("http", "proxy", 1, "al ice", "p@ss:word"),
        ),
        ("http://bob@proxy:1", ProxySettings("http", "proxy", 1, "bob", "")),
        ("http://bob:p@ss@proxy:1", ProxySettings("http", "proxy", 1, "bob", "p@ss")),
    ],
)
def test_parse_good(url: str, expected: ProxySettings) -> None:
    assert ProxySettings.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("socks5://proxy:1080", "unsupported proxy scheme 'socks5'"),
        ("ftp://proxy", "unsupported proxy scheme"),
        ("http://", "no host"),
        ("http://user:pw@:3128", "no host"),
        ("http://proxy:99999", "invalid proxy port: Port out of range"),
        ("http://proxy:abc", "invalid proxy port"),
        ("http://proxy:0", "out of range 1-65535"),
        ("http://proxy:3128/path", "path, query or fragment"),
        ("http://proxy:3128?x=1", "path, query or fragment"),
        ("http://proxy:3128#frag", "path, query or fragment"),
        ("http://pro xy:3128", "whitespace or control"),
        ("http://proxy:3128\r\nX: y", "whitespace or control"),
        ("http://[::1:3128", "invalid proxy URL"),
        ("http://a%3Ab:pw@proxy:1", "username must not contain ':'"),
    ],
)
def test_parse_bad(url: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ProxySettings.parse(url)


def test_parse_error_does_not_echo_password() -> None:
    with pytest.raises(ValueError, match="path") as info:
        ProxySettings.parse(f"http://bob:{SECRET.replace('@', '%40')}@proxy:1/x")
    assert "s3cr3t" not in str(info.value)


def test_repr_and_redacted_hide_password() -> None:
    settings = ProxySettings.parse("https://alice:s3cr3t%21@proxy.corp:8443")
    assert settings.password == "s3cr3t!"
    for text in (repr(settings), str(settings), settings.redacted(), f"{settings}"):
        assert "s3cr3t" not in text
    assert settings.redacted() == "https://alice:***@proxy.corp:8443"
    assert "password='***'" in repr(settings)
    assert "username='alice'" in repr(settings)
    assert ProxySettings.parse("http://[::1]").redacted() == "http://[::1]:80"
    assert ProxySettings.parse("http://bob@h:1").redacted() == "http://bob@h:1"


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="scheme"):
        ProxySettings("socks5", "h", 1)
    with pytest.raises(ValueError, match="without a username"):
        ProxySettings("http", "h", 1, None, "pw")


# ---------------------------------------------------------------------------------------------
# proxy_from_environment

PROXY = "http://proxy.corp:3128"


def test_environment_without_proxy() -> None:
    assert proxy_from_environment("gw.example", {}) is None
    assert proxy_from_environment("gw.example", {"https_proxy": "  "}) is None
    assert proxy_from_environment("gw.example", {"http_proxy": PROXY}) is None


def test_environment_lowercase_wins() -> None:
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert proxy_from_environment("gw.example", env) == ProxySettings("http", "lower", 1)
    env = {"https_proxy": "", "HTTPS_PROXY": "http://upper:2"}
    assert proxy_from_environment("gw.example", env) == ProxySettings("http", "upper", 2)


def test_environment_invalid_url_names_variable() -> None:
    with pytest.raises(ValueError, match="invalid HTTPS_PROXY: unsupported proxy scheme"):
        proxy_from_environment("gw.example", {"HTTPS_PROXY": "socks5://p:1"})


def test_environment_no_proxy_lowercase_wins() -> None:
    env = {"https_proxy": PROXY, "no_proxy": "other.example", "NO_PROXY": "gw.example"}
    assert proxy_from_environment("gw.example", env) is not None
    env = {"https_proxy": PROXY, "NO_PROXY": "gw.example"}
    assert proxy_from_environment("gw.example", env) is None


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypassed"),
    [
        ("*", "gw.example", True),
        ("", "gw.example", False),
        ("gw.example", "gw.example", True),
        ("GW.Example", "gw.EXAMPLE", True),
        ("example", "gw.example", True),
        (".example", "gw.example", True),
        (".example", "example", True),
        ("*.example", "a.b.example", True),
        ("example", "badexample", False),
        ("gw.example", "example", False),
        ("gw.example.", "gw.example", True),
        ("gw.example:443", "gw.example", True),
        (" other.example , gw.example ", "gw.example", True),
        ("other.example,,", "gw.example", False),
        ("10.0.0.1", "10.0.0.1", True),
        ("10.0.0.1:8443", "10.0.0.1", True),
        ("10.0.0.1", "10.0.0.10", False),
        ("0.0.1", "10.0.0.1", False),
        ("::1", "::1", True),
        ("[::1]:443", "0:0::1", True),
        ("[::1]", "[::1]", True),
        ("::1", "::2", False),
        ("10.0.0.1", "host10.0.0.1.example", False),
        ("localhost,127.0.0.1", "localhost", True),
        ("localhost,127.0.0.1", "gw.example", False),
    ],
)
def test_no_proxy_matrix(no_proxy: str, host: str, bypassed: bool) -> None:
    env = {"HTTPS_PROXY": PROXY, "NO_PROXY": no_proxy}
    result = proxy_from_environment(host, env)
    assert (result is None) is bypassed
    if not bypassed:
        assert result == ProxySettings.parse(PROXY)
