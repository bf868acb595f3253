"""The claims of docs/security.md, one test (or a few) per claim.

Each test is written so that it fails when the claim breaks: where a test shows that something
is refused, it also shows that the same set-up allows the legitimate case, so a refusal for the
wrong reason (nothing works at all) cannot pass.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning
from python_socks import ProxyError

import backchannel._connector as connector_module
from backchannel import (
    AppIdentity,
    AuditLog,
    AuthenticationError,
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    ResetCode,
    Role,
    Secret,
    StreamError,
    open_connector,
    open_gateway,
)
from backchannel._access import AccessControl
from backchannel._apptoken import AUDIENCE, _signing_key, issue_app_token, verify_app_token
from backchannel._cli import build_parser
from backchannel._config import AuditConfig
from backchannel._pki import CertificateAuthority, TlsMaterial, write_throwaway_tls_material
from backchannel._transport import client_ssl_context, dial_gateway, server_ssl_context
from backchannel._tunnel import Tunnel
from tests.harness import (
    APP_SECRET,
    CONNECTOR_TOKEN,
    audit_lines,
    connector_document,
    echo_server,
    gateway_document,
    receive_exactly,
    running_pair,
    socks_connect,
    tls_material,
)

GLOBEX_SECRET = "globex-erp-secret-5b8e7d"
GLOBEX_TOKEN = CONNECTOR_TOKEN + "-globex"

# --------------------------------------------------------------------------- helpers


@dataclass
class Wire:
    """Everything a connector sent to its gateway: HELLO documents and tunnel messages."""

    hellos: list[dict[str, Any]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)

    def everything(self) -> bytes:
        return json.dumps(self.hellos).encode() + b"".join(self.messages)


class _RecordingTransport:
    """A tunnel transport that keeps a copy of every message sent through it."""

    def __init__(self, inner: Any, sent: list[bytes]) -> None:
        self._inner = inner
        self._sent = sent

    async def send_message(self, message: bytes) -> None:
        self._sent.append(bytes(message))
        await self._inner.send_message(message)

    async def get_message(self) -> bytes | str:
        message: bytes | str = await self._inner.get_message()
        return message

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._inner.aclose(code, reason)


def record_connector_wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Record what every connector started afterwards sends to its gateway."""
    wire = Wire()
    real_dial = dial_gateway

    async def dial(*args: Any, hello: dict[str, Any], **kwargs: Any) -> Any:
        wire.hellos.append(dict(hello))
        ws, mux, info = await real_dial(*args, hello=hello, **kwargs)
        return _RecordingTransport(ws, wire.messages), mux, info

    monkeypatch.setattr(connector_module, "dial_gateway", dial)
    return wire


class _LogWaiter(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.messages: list[str] = []
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.needle in message:
            self.messages.append(message)
            self.seen.set()


@contextmanager
def log_waiter(logger_name: str, needle: str) -> Iterator[_LogWaiter]:
    """``waiter.seen`` is set when ``logger_name`` logs a message containing ``needle``."""
    logger = logging.getLogger(logger_name)
    waiter = _LogWaiter(needle)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(waiter)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(level)


async def first_tunnel_error(config: ConnectorConfig, needle: str = "tunnel acme/") -> str:
    """Run a connector until it logs its first tunnel error; return that log message."""
    with log_waiter("backchannel.connector", needle) as waiter:
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                await waiter.seen.wait()
            assert not any(status.connected for status in connector.status.values())
    return waiter.messages[0]


async def socks_reply(
    socks: HostPort, host: str, port: int, *, user: str = "acme/crm", password: str = APP_SECRET
) -> int:
    """The SOCKS5 reply code for a CONNECT (0 = succeeded; the connection is then closed)."""
    try:
        stream = await socks_connect(socks, host, port, user=user, password=password)
    except ProxyError as exc:
        return exc.error_code if exc.error_code is not None else -1
    await stream.aclose()
    return 0


async def socks_sap(socks: HostPort, token: str, location: str, host: str, port: int) -> int:
    """SAP's SOCKS5 method 0x80 (JWT + base64 location id); returns the reply code."""
    stream = await trio.open_tcp_stream(socks.host, socks.port)
    async with stream:
        await stream.send_all(b"\x05\x01\x80")
        assert await receive_exactly(stream, 2) == b"\x05\x80"
        raw_token = token.encode("ascii")
        raw_location = base64.b64encode(location.encode())
        await stream.send_all(
            b"\x01"
            + len(raw_token).to_bytes(4, "big")
            + raw_token
            + bytes([len(raw_location)])
            + raw_location
        )
        assert await receive_exactly(stream, 2) == b"\x01\x00"
        raw_host = host.encode()
        request = b"\x05\x01\x00\x03" + bytes([len(raw_host)]) + raw_host
        await stream.send_all(request + port.to_bytes(2, "big"))
        reply = await receive_exactly(stream, 10)
        return reply[1]


async def echo_via_socks(socks: HostPort, host: str, port: int) -> bool:
    """Whether bytes sent through SOCKS5 to ``host:port`` come back unchanged."""
    payload = os.urandom(16).hex().encode()
    stream = await socks_connect(socks, host, port)
    async with stream:
        await stream.send_all(payload)
        return await receive_exactly(stream, len(payload)) == payload


def gateway_tunnel(gateway: Gateway, subaccount: str, location: str = "") -> Tunnel:
    entry = gateway.registry.lookup(subaccount, location)
    assert entry is not None
    assert entry.tunnel is not None
    return entry.tunnel


def tcp_mapping(virtual: str, internal: str, protocol: str = "tcp", **extra: Any) -> dict[str, Any]:
    return {"virtual": virtual, "internal": internal, "protocol": protocol, **extra}


def dead_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def tls_echo_server(tls: TlsMaterial) -> AsyncIterator[int]:
    """A TLS echo server on 127.0.0.1 with the certificate of ``tls``; yields its port."""
    context = server_ssl_context(tls.cert_file, tls.key_file)

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- two tenants


@dataclass
class Tenants:
    """A gateway with subaccounts acme and globex, and one connector serving both."""

    gateway: Gateway
    connector: Connector
    connector_audit: Path
    wire: Wire

    @property
    def socks(self) -> HostPort:
        return self.gateway.front_door_addresses["tcp.socks5"][0]


@asynccontextmanager
async def two_tenants(
    tmp_path: Path, echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Tenants]:
    """acme (app crm, default location) and globex (app erp, location plant-2); each maps its
    own virtual host to the same echo server."""
    wire = record_connector_wire(monkeypatch)
    tls = tls_material(tmp_path / "tls")
    document = gateway_document(tls, tmp_path / "gateway-audit.jsonl")
    document["subaccounts"]["globex"]["apps"] = {"erp": {"secret": GLOBEX_SECRET}}
    async with open_gateway(GatewayConfig.from_mapping(document)) as gateway:
        assert gateway.tunnel_address is not None
        audit = tmp_path / "connector-audit.jsonl"
        internal = f"127.0.0.1:{echo_port}"
        connector_doc = connector_document(
            tls, gateway.tunnel_address.port, audit, [tcp_mapping("acme-db.virtual:7", internal)]
        )
        globex = dict(connector_doc["subaccounts"]["acme"])
        globex.update(
            token=GLOBEX_TOKEN,
            location="plant-2",
            mappings=[tcp_mapping("globex-db.virtual:7", internal)],
        )
        connector_doc["subaccounts"]["globex"] = globex
        async with open_connector(ConnectorConfig.from_mapping(connector_doc)) as connector:
            with trio.fail_after(10):
                await connector.wait_connected("acme")
                await connector.wait_connected("globex")
            yield Tenants(gateway, connector, audit, wire)


# --------------------------------------------------------------------------- tenant isolation


async def test_app_cannot_reach_another_subaccounts_connector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with echo_server() as port, two_tenants(tmp_path, port, monkeypatch) as tenants:
        socks = tenants.socks
        with trio.fail_after(10):
            # The legitimate paths work ...
            assert await socks_reply(socks, "acme-db.virtual", 7) == 0
            globex = {"user": "globex/erp/plant-2", "password": GLOBEX_SECRET}
            assert await socks_reply(socks, "globex-db.virtual", 7, **globex) == 0
            # ... acme's app naming globex's virtual host reaches acme's connector only: 0x02.
            assert await socks_reply(socks, "globex-db.virtual", 7) == 0x02
            denial = audit_lines(tenants.connector_audit)[-1]
            assert (denial["subaccount"], denial["decision"]) == ("acme", "deny")
            # ... globex's location id under acme's identity is acme's location: none there.
            assert await socks_reply(socks, "globex-db.virtual", 7, user="acme/crm/plant-2") == 3
            # ... and acme's secret opens nothing under globex's name.
            for user in ("globex/crm", "globex/erp", "globex/erp/plant-2"):
                assert await socks_reply(socks, "globex-db.virtual", 7, user=user) == 0x05


async def test_app_token_cannot_name_another_subaccount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme_secret = Secret(APP_SECRET, "test")
    async with echo_server() as port, two_tenants(tmp_path, port, monkeypatch) as tenants:
        socks = tenants.socks
        acme = issue_app_token(AppIdentity("acme", "crm"), acme_secret)
        globex = issue_app_token(AppIdentity("globex", "erp"), Secret(GLOBEX_SECRET, "test"))
        now = int(time.time())
        claims = {"sub": "globex/erp", "aud": AUDIENCE, "iat": now, "exp": now + 60}
        forged = jwt.encode(claims, _signing_key(acme_secret), algorithm="HS256")
        with trio.fail_after(10):
            assert await socks_sap(socks, acme, "", "acme-db.virtual", 7) == 0
            assert await socks_sap(socks, globex, "plant-2", "globex-db.virtual", 7) == 0
            assert await socks_sap(socks, acme, "plant-2", "globex-db.virtual", 7) == 0x03
            assert await socks_sap(socks, forged, "plant-2", "globex-db.virtual", 7) == 0x05


async def test_gateway_cannot_use_one_tunnel_for_another_subaccount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malicious gateway writes any OPEN it likes; the connector takes the subaccount from
    the tunnel, never from the OPEN, and sends each gateway only that subaccount's token."""
    async with echo_server() as port, two_tenants(tmp_path, port, monkeypatch) as tenants:
        acme_tunnel = gateway_tunnel(tenants.gateway, "acme")
        forged = {
            "protocol": "tcp",
            "host": "globex-db.virtual",
            "port": 7,
            "subaccount": "globex",
            "location": "plant-2",
            "app": "erp",
        }
        with trio.fail_after(10), pytest.raises(StreamError) as info:
            await acme_tunnel.open_stream(forged)
        assert info.value.code == ResetCode.ACCESS_DENIED
        denial = audit_lines(tenants.connector_audit)[-1]
        assert (denial["subaccount"], denial["location"]) == ("acme", "")
        # The same OPEN on globex's own tunnel is allowed: the refusal was about the tunnel.
        globex_tunnel = gateway_tunnel(tenants.gateway, "globex", "plant-2")
        with trio.fail_after(10):
            stream = await globex_tunnel.open_stream(forged)
            await stream.aclose()
        tokens = {hello["subaccount"]: hello["token"] for hello in tenants.wire.hellos}
        assert tokens == {"acme": CONNECTOR_TOKEN, "globex": GLOBEX_TOKEN}
        for hello in tenants.wire.hellos:
            other = GLOBEX_TOKEN if hello["subaccount"] == "acme" else CONNECTOR_TOKEN + '"'
            assert other not in json.dumps(hello)


# --------------------------------------------------------------------------- access control


async def test_default_deny_without_mappings(tmp_path: Path) -> None:
    async with running_pair(tmp_path, []) as pair:
        with trio.fail_after(10):
            for host, port in [("anything.virtual", 80), ("127.0.0.1", 22), ("localhost", 6379)]:
                assert await socks_reply(pair.socks, host, port) == 0x02
        denials = [x for x in audit_lines(pair.connector_audit) if x["decision"] == "deny"]
        assert [x["target"] for x in denials] == [
            "anything.virtual:80",
            "127.0.0.1:22",
            "localhost:6379",
        ]
        assert all("no system mapping" in x["reason"] for x in denials)


@asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server on 127.0.0.1 that keeps what each connection sent (one entry per
    connection, filled as bytes come) and answers nothing; yields (port, entries)."""
    received: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        index = len(received)
        received.append(b"")
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    received[index] += data

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], received
        nursery.cancel_scope.cancel()


async def test_bytes_sent_with_an_open_reach_no_backend_before_access_is_granted(
    tmp_path: Path,
) -> None:
    """A gateway may send DATA right behind its OPEN (``first_data``, as the port forward
    does): the connector holds it until the access check, and a refused stream's bytes are
    dropped without a connection to any backend."""
    async with recording_server() as (port, received):
        mappings = [tcp_mapping("rec.virtual:7000", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            app = AppIdentity("acme", "crm")
            with trio.fail_after(10):
                refused = [
                    ("tcp", HostPort("rec.virtual", 7001)),  # unmapped port
                    ("tcp", HostPort("127.0.0.1", port)),  # the internal address itself
                    ("http", HostPort("rec.virtual", 7000)),  # mapped for another protocol
                ]
                for protocol, target in refused:
                    with pytest.raises(StreamError) as info:
                        await pair.gateway.open_stream(
                            app, protocol=protocol, target=target, first_data=b"DROP TABLE x;"
                        )
                    assert info.value.code == ResetCode.ACCESS_DENIED
                stream = await pair.gateway.open_stream(
                    app,
                    protocol="tcp",
                    target=HostPort("rec.virtual", 7000),
                    first_data=b"SELECT 1;",
                )
                async with stream:
                    await stream.send_all(b" SELECT 2;")
                    await stream.send_eof()
                    assert await stream.receive_some() == b""  # the server closed after EOF
        assert received == [b"SELECT 1; SELECT 2;"]  # one connection: the granted stream's


async def test_only_mapped_ports_and_protocols_are_allowed(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7000-7001", f"127.0.0.1:{port}-{port + 1}")]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(10):
                assert await socks_reply(pair.socks, "ECHO.virtual.", 7000) == 0  # allowed
                assert await socks_reply(pair.socks, "echo.virtual", 6999) == 0x02
                assert await socks_reply(pair.socks, "echo.virtual", 7002) == 0x02
                assert await socks_reply(pair.socks, "echo.virtual.other", 7000) == 0x02
                # A plugin of another protocol cannot use a tcp mapping.
                with pytest.raises(StreamError) as info:
                    await pair.gateway.open_stream(
                        AppIdentity("acme", "crm"),
                        protocol="http",
                        target=HostPort("echo.virtual", 7000),
                    )
                # A protocol no plugin serves is refused as such, mapping or not.
                with pytest.raises(StreamError) as unsupported:
                    await pair.gateway.open_stream(
                        AppIdentity("acme", "crm"),
                        protocol="ldap",
                        target=HostPort("echo.virtual", 7000),
                    )
            assert info.value.code == ResetCode.ACCESS_DENIED
            assert info.value.reason == (
                "virtual host echo.virtual:7000 is mapped for tcp, not for http"
            )
            assert unsupported.value.code == ResetCode.UNSUPPORTED_PROTOCOL
            assert unsupported.value.reason == "this connector has no plugin for protocol 'ldap'"


async def test_access_is_checked_on_every_stream_open(tmp_path: Path) -> None:
    """Not once per tunnel or per app: withdraw the mapping and the next stream on the same,
    still-open tunnel is refused."""
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(10):
                assert await socks_reply(pair.socks, "echo.virtual", 7) == 0
                tunnel = await pair.connector.wait_connected()
                pair.connector.access = AccessControl([])
                assert await socks_reply(pair.socks, "echo.virtual", 7) == 0x02
            assert await pair.connector.wait_connected() is tunnel
            assert pair.connector.status["acme"].connects == 1


async def test_gateway_naming_an_internal_address_is_denied(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            tunnel = gateway_tunnel(pair.gateway, "acme")
            with trio.fail_after(10):
                for host, target_port in [("127.0.0.1", port), ("echo.virtual", port)]:
                    metadata = {"protocol": "tcp", "host": host, "port": target_port, "app": "x"}
                    with pytest.raises(StreamError) as info:
                        await tunnel.open_stream(metadata)
                    assert info.value.code == ResetCode.ACCESS_DENIED
                stream = await tunnel.open_stream(
                    {"protocol": "tcp", "host": "echo.virtual", "port": 7, "app": "x"}
                )
                await stream.aclose()


@pytest.mark.parametrize(
    "metadata",
    [
        {"protocol": "tcp", "host": "echo.virtual", "port": "7"},
        {"protocol": "tcp", "host": "echo.virtual", "port": True},
        {"protocol": "tcp", "host": "echo.virtual", "port": 0},
        {"protocol": "tcp", "host": "echo.virtual", "port": 65536},
        {"protocol": "tcp", "port": 7},
        {"host": "echo.virtual", "port": 7},
    ],
)
async def test_malformed_open_is_refused(tmp_path: Path, metadata: dict[str, Any]) -> None:
    mappings = [tcp_mapping("echo.virtual:7", "127.0.0.1:7")]
    async with running_pair(tmp_path, mappings) as pair:
        with trio.fail_after(10), pytest.raises(StreamError) as info:
            await gateway_tunnel(pair.gateway, "acme").open_stream(metadata)
        assert info.value.code == ResetCode.PROTOCOL_ERROR


# --------------------------------------------------------------------------- internal names


async def test_gateway_never_learns_internal_host_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused, unresolvable, untrusted-TLS and working backends: nothing the connector sends
    (RESET reasons included) and no gateway audit line names an internal host or port."""
    wire = record_connector_wire(monkeypatch)
    tls = tls_material(tmp_path / "tls")
    refused_port = dead_port("127.77.88.99")
    async with echo_server() as echo_port, tls_echo_server(tls) as tls_port:
        internal = {
            "refused.virtual:7": f"127.77.88.99:{refused_port}",
            "nxdomain.virtual:7": "internal-db.invalid:5432",
            "tls.virtual:7": f"localhost:{tls_port}",  # no ca_file: the test CA is untrusted
            "echo.virtual:7": f"127.0.0.1:{echo_port}",
        }
        mappings = [
            tcp_mapping(v, i, "tcps" if v.startswith("tls.") else "tcp")
            for v, i in internal.items()
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(10):
                for virtual in ("refused.virtual", "nxdomain.virtual", "tls.virtual"):
                    assert await socks_reply(pair.socks, virtual, 7) == 0x04
                assert await echo_via_socks(pair.socks, "echo.virtual", 7)
                with pytest.raises(StreamError):
                    await pair.gateway.open_stream(
                        AppIdentity("acme", "crm"),
                        protocol="http",
                        target=HostPort("echo.virtual", 7),
                    )
        gateway_audit = pair.gateway_audit.read_bytes()
    sent = wire.everything()
    # The recording worked: the reasons for the gateway name the virtual targets.
    for virtual in ("refused.virtual:7", "nxdomain.virtual:7", "tls.virtual:7"):
        assert virtual.encode() in sent
        assert virtual.encode() in gateway_audit
    assert b"certificate not trusted" in sent
    for secret_place in (sent, gateway_audit):
        for text in ("127.77.88.99", "internal-db.invalid", "localhost", "127.0.0.1:"):
            assert text.encode() not in secret_place
        for number in (refused_port, tls_port, echo_port, 5432):
            assert str(number).encode() not in secret_place


# --------------------------------------------------------------------------- TLS to the gateway


@asynccontextmanager
async def lone_gateway(tmp_path: Path, tls: TlsMaterial) -> AsyncIterator[Gateway]:
    document = gateway_document(tls, tmp_path / "gateway-audit.jsonl")
    async with open_gateway(GatewayConfig.from_mapping(document)) as gateway:
        yield gateway


async def connector_error(
    tmp_path: Path, gateway: Gateway, tls: TlsMaterial, *, ca_file: Path | None
) -> str:
    """Start a connector with ``ca_file`` (None: system trust store) and return the first
    tunnel error it logs."""
    assert gateway.tunnel_address is not None
    document = connector_document(
        tls, gateway.tunnel_address.port, tmp_path / "connector-audit.jsonl", []
    )
    sub = document["subaccounts"]["acme"]
    if ca_file is None:
        del sub["ca_file"]
    else:
        sub["ca_file"] = str(ca_file)
    message = await first_tunnel_error(ConnectorConfig.from_mapping(document))
    assert gateway.registry.entries() == []
    return message


async def test_connector_refuses_gateway_certificate_from_another_ca(tmp_path: Path) -> None:
    tls = tls_material(tmp_path / "tls")
    other = write_throwaway_tls_material(tmp_path / "other")
    async with lone_gateway(tmp_path, tls) as gateway:
        message = await connector_error(tmp_path, gateway, tls, ca_file=other.ca_file)
    assert "presented a certificate that is not trusted" in message
    # OpenSSL's verify message names the problem (server.pem carries the untrusted CA).
    assert re.search(r"\(self[- ]signed certificate in certificate chain\)", message)
    assert "set ca_file to the CA that signed it" in message
    assert audit_lines(tmp_path / "gateway-audit.jsonl") == []


async def test_verification_is_on_without_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ca_file means the system trust store, not "trust anything"."""
    tls = tls_material(tmp_path / "tls")
    other = write_throwaway_tls_material(tmp_path / "other")
    empty = tmp_path / "empty-cert-dir"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    monkeypatch.setenv("SSL_CERT_FILE", str(other.ca_file))
    async with lone_gateway(tmp_path, tls) as gateway:
        message = await connector_error(tmp_path, gateway, tls, ca_file=None)
        assert re.search(r"not trusted \(self[- ]signed certificate in certificate chain", message)
        # The same connector connects once the system store holds the gateway's CA.
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
        assert gateway.tunnel_address is not None
        document = connector_document(
            tls, gateway.tunnel_address.port, tmp_path / "connector-audit.jsonl", []
        )
        del document["subaccounts"]["acme"]["ca_file"]
        async with open_connector(ConnectorConfig.from_mapping(document)) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()


async def test_connector_checks_the_gateway_host_name(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("host name test CA")
    ca_file, _ = ca.save(tmp_path / "ca")
    cert, key = ca.issue_server_certificate(["gateway.example"]).save(tmp_path / "srv", "server")
    tls = TlsMaterial(ca_file, cert, key)
    async with lone_gateway(tmp_path, tls) as gateway:
        message = await connector_error(tmp_path, gateway, tls, ca_file=ca_file)
    assert "not trusted" in message
    assert "mismatch, certificate is not valid for '127.0.0.1'" in message


async def test_connector_keeps_retrying_after_a_refused_dial(tmp_path: Path) -> None:
    """One bad certificate (an attacker on the path, a gateway restart) must not stop the
    connector for good: it logs the refusal and dials again."""
    tls = tls_material(tmp_path / "tls")
    other = write_throwaway_tls_material(tmp_path / "other")
    async with lone_gateway(tmp_path, tls) as gateway:
        assert gateway.tunnel_address is not None
        document = connector_document(
            tls, gateway.tunnel_address.port, tmp_path / "connector-audit.jsonl", []
        )
        document["subaccounts"]["acme"]["ca_file"] = str(other.ca_file)
        with log_waiter("backchannel.connector", "not trusted") as waiter:
            async with open_connector(ConnectorConfig.from_mapping(document)) as connector:
                with trio.fail_after(10):
                    while len(waiter.messages) < 2:
                        waiter.seen = trio.Event()
                        await waiter.seen.wait()
                assert connector.status["acme"].attempts >= 2


def test_tls_contexts_verify_and_require_tls12(tmp_path: Path) -> None:
    tls = tls_material(tmp_path / "tls")
    for context in (client_ssl_context(None), client_ssl_context(tls.ca_file)):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    server = server_ssl_context(tls.cert_file, tls.key_file)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_ca_file_is_the_only_trusted_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ca_file set, a gateway certificate from a CA of the system store is refused."""
    tls = tls_material(tmp_path / "tls")
    pinned = write_throwaway_tls_material(tmp_path / "pinned")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))  # "a public CA" signed the gateway
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    async with lone_gateway(tmp_path, tls) as gateway:
        assert gateway.tunnel_address is not None
        address = gateway.tunnel_address
        stream = await trio.open_ssl_over_tcp_stream(
            address.host,
            address.port,
            ssl_context=client_ssl_context(pinned.ca_file),
            https_compatible=True,
        )
        try:
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
                await stream.do_handshake()
        finally:
            await trio.aclose_forcefully(stream)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


# --------------------------------------------------------------------------- TLS to backends


async def test_tcps_backend_certificate_is_verified(tmp_path: Path) -> None:
    tls = tls_material(tmp_path / "tls")
    async with tls_echo_server(tls) as port:
        mappings = [
            tcp_mapping(
                "trusted.virtual:636", f"localhost:{port}", "tcps", ca_file=str(tls.ca_file)
            ),
            tcp_mapping("untrusted.virtual:636", f"localhost:{port}", "tcps"),
            tcp_mapping(
                "wrongname.virtual:636",
                f"localhost:{port}",
                "tcps",
                ca_file=str(tls.ca_file),
                server_name="ldap.corp.example",
            ),
        ]
        with log_waiter("backchannel.tcp", "TLS handshake failed") as waiter:
            async with running_pair(tmp_path, mappings) as pair:
                with trio.fail_after(10):
                    assert await echo_via_socks(pair.socks, "trusted.virtual", 636)
                    assert await socks_reply(pair.socks, "untrusted.virtual", 636) == 0x04
                    assert await socks_reply(pair.socks, "wrongname.virtual", 636) == 0x04
    assert len(waiter.messages) == 2
    assert "certificate verify failed" in waiter.messages[0]
    assert "Hostname mismatch" in waiter.messages[1]


# --------------------------------------------------------------------------- app credentials


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "acme/crm", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


_KEY = _signing_key(Secret(APP_SECRET, "test"))
_OTHER_KEY = _signing_key(Secret("some-other-secret", "test"))

FORGERIES: dict[str, Callable[[], str]] = {
    "alg none": lambda: jwt.encode(_claims(), "", algorithm="none"),
    "signed with another app's key": lambda: jwt.encode(_claims(), _OTHER_KEY, algorithm="HS256"),
    "signed with the raw secret": lambda: jwt.encode(
        _claims(), APP_SECRET.encode(), algorithm="HS256"
    ),
    "HS512 with the right key": lambda: jwt.encode(_claims(), _KEY, algorithm="HS512"),
    "expired": lambda: jwt.encode(
        _claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), _KEY, algorithm="HS256"
    ),
    "other audience": lambda: jwt.encode(_claims(aud="someone-else"), _KEY, algorithm="HS256"),
    "no expiry": lambda: jwt.encode(_claims(exp=None), _KEY, algorithm="HS256"),
    "unknown app, zero key": lambda: jwt.encode(
        _claims(sub="acme/ghost"), b"\x00" * 32, algorithm="HS256"
    ),
    "tampered subject": lambda: _swap_payload(
        issue_app_token(AppIdentity("acme", "crm"), Secret(APP_SECRET, "t")), sub="acme/admin"
    ),
    "not a JWT": lambda: "acme/crm:" + APP_SECRET,
}


def forge(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # short keys are the point
        return FORGERIES[name]()


def _swap_payload(token: str, **claims: Any) -> str:
    header, payload, signature = token.split(".")
    padded = payload + "=" * (-len(payload) % 4)
    data = json.loads(base64.urlsafe_b64decode(padded))
    data.update(claims)
    new = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{new}.{signature}"


def _secret_for(subaccount: str, app: str) -> Secret | None:
    return Secret(APP_SECRET, "test") if (subaccount, app) == ("acme", "crm") else None


def test_a_genuine_app_token_is_accepted() -> None:
    token = issue_app_token(AppIdentity("acme", "crm"), Secret(APP_SECRET, "test"), ttl=60)
    assert verify_app_token(token, _secret_for) == AppIdentity("acme", "crm")


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_app_tokens_are_refused(forgery: str) -> None:
    token = forge(forgery)
    with pytest.raises(AuthenticationError) as info:
        verify_app_token(token, _secret_for)
    assert APP_SECRET not in str(info.value)


async def test_forged_token_over_socks_method_0x80(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            genuine = issue_app_token(AppIdentity("acme", "crm"), Secret(APP_SECRET, "t"))
            with trio.fail_after(10):
                assert await socks_sap(pair.socks, genuine, "", "echo.virtual", 7) == 0
                for forgery in ("alg none", "signed with another app's key", "expired"):
                    token = forge(forgery)
                    assert await socks_sap(pair.socks, token, "", "echo.virtual", 7) == 0x05
            refusals = [x for x in audit_lines(pair.gateway_audit) if x["event"] == "socks5_auth"]
            assert len(refusals) == 3


def test_rotating_the_app_secret_invalidates_its_tokens() -> None:
    token = issue_app_token(AppIdentity("acme", "crm"), Secret("old-secret", "t"))
    with pytest.raises(AuthenticationError, match="Signature verification failed"):
        verify_app_token(token, lambda s, a: Secret("new-secret", "t"))


def test_app_secret_is_compared_even_for_unknown_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One constant-time comparison per attempt, whether or not the subaccount and app exist,
    and the same answer for each way of being wrong."""
    tls = tls_material(tmp_path / "tls")
    gateway = Gateway(GatewayConfig.from_mapping(gateway_document(tls, tmp_path / "a.jsonl")))
    gateway.audit.close()
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module the gateway calls
    messages = []
    for user in ("nobody/crm", "acme/nobody", "acme/crm"):
        calls.clear()
        with pytest.raises(AuthenticationError) as info:
            gateway.authenticate_basic(user, "guess-123")
        assert len(calls) == 1
        assert calls[0][1] == b"guess-123"
        messages.append(str(info.value).replace(user, "USER"))
        assert "guess-123" not in str(info.value)
    assert len(set(messages)) == 1
    calls.clear()
    assert gateway.authenticate_basic("acme/crm", APP_SECRET) == AppIdentity("acme", "crm")
    assert len(calls) == 1


# --------------------------------------------------------------------------- connector identity


async def test_second_connector_for_a_held_location_is_refused(tmp_path: Path) -> None:
    """A copy of the connector token cannot take over a location that a connector holds."""
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            assert pair.gateway.tunnel_address is not None
            tls = tls_material(tmp_path / "tls")
            document = connector_document(
                tls, pair.gateway.tunnel_address.port, tmp_path / "intruder.jsonl", []
            )
            message = await first_tunnel_error(ConnectorConfig.from_mapping(document))
            assert "is already connected" in message
            with trio.fail_after(10):
                assert await echo_via_socks(pair.socks, "echo.virtual", 7)
            refusal = audit_lines(pair.gateway_audit)[-1]
            assert (refusal["event"], refusal["reason"]) == (
                "connector_register",
                "already connected",
            )


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_reach_logs_or_audit_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logging.getLogger("backchannel"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="backchannel")
    wrong_password = "wrong-password-31c9a7"
    wrong_token = "wrong-connector-token-8e2f44"
    token = issue_app_token(AppIdentity("acme", "crm"), Secret(APP_SECRET, "t"))
    async with echo_server() as port:
        mappings = [tcp_mapping("echo.virtual:7", f"127.0.0.1:{port}")]
        async with running_pair(tmp_path, mappings) as pair:
            assert pair.gateway.tunnel_address is not None
            with trio.fail_after(10):
                assert await echo_via_socks(pair.socks, "echo.virtual", 7)
                assert (
                    await socks_reply(pair.socks, "echo.virtual", 7, password=wrong_password) == 5
                )
                assert await socks_sap(pair.socks, token, "", "echo.virtual", 7) == 0
                assert await socks_sap(pair.socks, token + "x", "", "echo.virtual", 7) == 5
            document = connector_document(
                tls_material(tmp_path / "tls"),
                pair.gateway.tunnel_address.port,
                tmp_path / "intruder.jsonl",
                [],
                token=wrong_token,
                location="elsewhere",
            )
            message = await first_tunnel_error(ConnectorConfig.from_mapping(document))
            assert "authentication failed for subaccount 'acme'" in message
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    audits = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    # The capture worked: the run's events are all there.
    assert "connector acme/-@" in logged
    assert "socks5_auth" in audits
    assert "connector_register" in audits
    for secret in (APP_SECRET, CONNECTOR_TOKEN, wrong_password, wrong_token, token):
        assert secret not in logged
        assert secret not in audits


def _option_strings(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _option_strings(sub)


def test_command_line_takes_no_secrets() -> None:
    options = set(_option_strings(build_parser()))
    assert {"--config", "--ca-dir", "--app"} <= options  # the walk reached the subcommands
    for option in options:
        if option.endswith(("-file", "-env")):
            continue  # names where a secret is (a file, an environment variable), as in config
        for word in ("secret", "token", "password", "passwd", "passphrase", "credential"):
            assert word not in option, option
    # Secrets for the CA commands come only from such places.
    assert {"--password-file", "--password-env", "--key-passphrase-file"} <= options


# --------------------------------------------------------------------------- local files


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")
def test_audit_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "connector-audit.jsonl"
    previous = os.umask(0)
    try:
        audit = AuditLog(Role.CONNECTOR, AuditConfig(file=path))
    finally:
        os.umask(previous)
    audit.denied("stream", "test")
    audit.close()
    assert path.stat().st_mode & 0o777 == 0o640
    assert json.loads(path.read_text())["reason"] == "test"
