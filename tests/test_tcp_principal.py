"""Principal propagation over TCP: a cloud app sends ``<app token>,<user JWT>`` with SOCKS5
method 0x80; for a ``tcps`` mapping with ``principal_propagation = "certificate"`` the
connector presents the user's certificate as its TLS client certificate, and a backend that
verifies it against the connector's user CA sees the user. Every refusal is a SOCKS5 reply,
audited on the connector."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backchannel import (
    AppIdentity,
    ConnectorConfig,
    GatewayConfig,
    HostPort,
    Secret,
    open_connector,
    open_gateway,
)
from backchannel._apptoken import issue_app_token
from backchannel._exceptions import ConfigError
from backchannel._user_ca import UserCertificateAuthority
from tests.harness import (
    APP_SECRET,
    audit_lines,
    connector_document,
    gateway_document,
    tls_material,
)
from tests.test_cli import sap_socks5_connect

ISSUER = "https://idp.test"
AUDIENCE = "backchannel"
SOCKS_NOT_ALLOWED = 0x02
SOCKS_CONNECTION_REFUSED = 0x05


@dataclass
class Setup:
    socks: HostPort
    idp_key: ec.EllipticCurvePrivateKey
    connector_audit: Path

    def user_token(self, key: ec.EllipticCurvePrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "user_name": "alice",
        }
        payload.update(claims)
        return jwt.encode(payload, key or self.idp_key, algorithm="ES256", headers={"kid": "k1"})


def _app_token() -> str:
    return issue_app_token(AppIdentity("acme", "crm"), Secret(APP_SECRET, "test"), ttl=300)


async def _serve_who_am_i(context: ssl.SSLContext, stream: trio.SocketStream) -> None:
    """Answer the verified client certificate's common name, then close."""
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
        peer = tls.getpeercert(binary_form=True)
        assert peer is not None
        names = x509.load_der_x509_certificate(peer).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        await tls.send_all(f"hello {names[0].value!s}\n".encode())
        await tls.aclose()
    except trio.BrokenResourceError:
        await trio.aclose_forcefully(tls)


@asynccontextmanager
async def propagation_setup(tmp_path: Path) -> AsyncIterator[Setup]:
    gateway_tls = tls_material(tmp_path / "tls")
    backend_tls = tls_material(tmp_path / "backend-tls")
    user_ca_cert, user_ca_key = UserCertificateAuthority.create().save(tmp_path / "user-ca")
    idp_key = ec.generate_private_key(ec.SECP256R1())
    idp_pem = tmp_path / "idp.pem"
    idp_pem.write_bytes(
        idp_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # The backend: TLS that requires a client certificate from the connector's user CA.
    backend_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_context.load_cert_chain(str(backend_tls.cert_file), str(backend_tls.key_file))
    backend_context.verify_mode = ssl.CERT_REQUIRED
    backend_context.load_verify_locations(cafile=str(user_ca_cert))

    gateway = gateway_document(gateway_tls, tmp_path / "gateway-audit.jsonl")
    gateway["subaccounts"]["acme"]["identity_providers"] = [
        {
            "name": "corp",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "public_key_file": str(idp_pem),
            "kid": "k1",
        }
    ]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_who_am_i, backend_context), 0, host="127.0.0.1")
        )
        backend_port = listeners[0].socket.getsockname()[1]
        async with open_gateway(GatewayConfig.from_mapping(gateway)) as gw:
            assert gw.tunnel_address is not None
            tcps = {
                "protocol": "tcps",
                "internal": f"127.0.0.1:{backend_port}",
                "ca_file": str(backend_tls.ca_file),
            }
            document = connector_document(
                gateway_tls,
                gw.tunnel_address.port,
                tmp_path / "connector-audit.jsonl",
                [
                    {**tcps, "virtual": "db.virtual:5432", "principal_propagation": "certificate"},
                    {**tcps, "virtual": "plain.virtual:5432"},
                ],
            )
            document["audit"]["include_allowed"] = True
            document["principal_propagation"] = {
                "ca_cert": str(user_ca_cert),
                "ca_key": str(user_ca_key),
                "subject_rules": [{"pattern": "CN=${name}"}],
            }
            async with open_connector(ConnectorConfig.from_mapping(document)) as connector:
                resolver = connector.principal_resolver
                assert resolver is not None
                with trio.fail_after(10):
                    # The trust list follows HELLO on the tunnel.
                    await connector.wait_status(lambda _: len(resolver.trust_for("acme")) > 0)
                yield Setup(
                    gw.front_door_addresses["tcp.socks5"][0],
                    idp_key,
                    tmp_path / "connector-audit.jsonl",
                )
        nursery.cancel_scope.cancel()


async def _who(setup: Setup, credential: str, host: str = "db.virtual") -> tuple[int, bytes]:
    with trio.fail_after(10):
        reply, stream = await sap_socks5_connect(setup.socks, credential, "", host, 5432)
        async with stream:
            answer = b""
            while reply == 0 and (data := await stream.receive_some(1024)):
                answer += data
            return reply, answer


async def test_the_backend_sees_the_cloud_user(tmp_path: Path) -> None:
    async with propagation_setup(tmp_path) as setup:
        reply, answer = await _who(setup, f"{_app_token()},{setup.user_token()}")
        assert (reply, answer) == (0, b"hello alice\n")
    allowed = [
        line
        for line in audit_lines(setup.connector_audit)
        if line["event"] == "principal_propagation" and line["decision"] == "allow"
    ]
    assert allowed
    assert allowed[0]["subject"] == "CN=alice"


async def test_refusals_are_socks_replies_and_audited(tmp_path: Path) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    async with propagation_setup(tmp_path) as setup:
        app = _app_token()
        now = int(time.time())
        cases = {
            "missing_token": app,
            "bad_signature": f"{app},{setup.user_token(stranger)}",
            "expired": f"{app},{setup.user_token(exp=now - 3600, iat=now - 7200)}",
            "wrong_audience": f"{app},{setup.user_token(aud='someone-else')}",
            "malformed_token": f"{app},not-a-jwt",
        }
        for reason, credential in cases.items():
            reply, _ = await _who(setup, credential)
            assert reply == SOCKS_CONNECTION_REFUSED, reason
        # A bad app token is refused before anything reaches the connector, user or not.
        reply, _ = await _who(setup, f"not-an-app-token,{setup.user_token()}")
        assert reply == SOCKS_CONNECTION_REFUSED
    denied = [
        line["reason"]
        for line in audit_lines(setup.connector_audit)
        if line["event"] == "principal_propagation" and line["decision"] == "deny"
    ]
    assert denied == list(cases)
    text = setup.connector_audit.read_text()
    assert "eyJ" not in text  # no token in the audit trail


async def test_without_propagation_the_backend_sees_no_user(tmp_path: Path) -> None:
    async with propagation_setup(tmp_path) as setup:
        # plain.virtual presents no client certificate: the backend refuses the handshake (with
        # TLS 1.3 after the client's side of it is done: the client sees the stream end).
        _, answer = await _who(setup, f"{_app_token()},{setup.user_token()}", "plain.virtual")
        assert answer == b""


def test_principal_propagation_needs_tcps(tmp_path: Path) -> None:
    document = connector_document(
        tls_material(tmp_path / "tls"),
        1,
        tmp_path / "audit.jsonl",
        [
            {
                "protocol": "tcp",
                "virtual": "db.virtual:5432",
                "internal": "127.0.0.1:5432",
                "principal_propagation": "certificate",
            }
        ],
    )
    from backchannel import Connector

    with pytest.raises(ConfigError, match="needs protocol 'tcps'"):
        Connector(ConnectorConfig.from_mapping(document))
    document["subaccounts"]["acme"]["mappings"][0]["protocol"] = "tcps"
    document["subaccounts"]["acme"]["mappings"][0]["principal_propagation"] = "header"
    with pytest.raises(ConfigError, match="must be 'none' or 'certificate'"):
        Connector(ConnectorConfig.from_mapping(document))
