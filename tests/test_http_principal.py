"""Principal propagation over HTTP, end to end: a cloud app sends its user's JWT in
``SAP-Connectivity-Authentication``; the gateway hands it to the connector, which validates it
against the IdP the gateway trusts, maps it to a subject and issues a short-lived certificate
from its own CA. Two real HTTPS backends receive the user:

* nginx, verifying the user's certificate as the TLS client certificate against the connector's
  CA (``principal_propagation = "certificate"``), answers with the verified subject;
* a trio HTTPS server that trusts the connector's *system* certificate as a reverse proxy,
  verifies the user certificate in ``SSL_CLIENT_CERT`` against the connector's CA, maps its
  subject to a user and answers with that user (``principal_propagation = "header"``).

Everything listens on 127.0.0.1; the JWTs are minted here with a throwaway IdP key.
"""

from __future__ import annotations

import base64
import datetime
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information
from signxml.signer import XMLSigner

from backchannel import (
    Connector,
    ConnectorConfig,
    GatewayConfig,
    open_connector,
    open_gateway,
)
from backchannel._user_ca import UserCertificateAuthority
from tests.harness import (
    APP_SECRET,
    audit_lines,
    connector_document,
    gateway_document,
    tls_material,
)
from tests.nginx import Nginx, Pki, make_pki, nginx_server
from tests.procs import require_tool, wait_until

pytestmark = pytest.mark.integration

ISSUER = "https://idp.test"
AUDIENCE = "backchannel"
#: The header backend's user mapping (what an SAP system does in CERTRULE / VUSREXTID).
USERS = {"CN=alice,O=Example": "ALICE"}


@dataclass(frozen=True)
class Idp:
    """A throwaway identity provider: its key and a token minter."""

    key: ec.EllipticCurvePrivateKey
    public_pem: Path

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "user_name": "alice",
            "email": "alice@example.com",
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Nginx]:
    require_tool("nginx")
    with nginx_server(tmp_path_factory.mktemp("nginx"), pki) as server:
        yield server


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Idp:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("idp") / "idp.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Idp(key, path)


# ------------------------------------------------------------------ the header backend


@dataclass
class HeaderBackend:
    """HTTPS; trusts the connector's system certificate (verified by TLS) as a reverse proxy
    and the user certificate in SSL_CLIENT_CERT only if the connector's CA issued it."""

    user_ca: x509.Certificate

    def user_of(self, header: bytes) -> tuple[int, str]:
        if not header:
            return 403, "no user: the reverse proxy sent an empty SSL_CLIENT_CERT"
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(header, validate=True))
            cert.verify_directly_issued_by(self.user_ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            return 403, f"untrusted user certificate: {exc}"
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return 403, "user certificate expired"
        subject = cert.subject.rfc4514_string()
        user = USERS.get(subject)
        return (200, f"user={user}") if user else (403, f"no user is mapped to {subject}")

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if isinstance(event, h11.Request):
                    headers = dict(event.headers)
                    status, text = self.user_of(headers.get(b"ssl_client_cert", b""))
                    body = (text + "\n").encode()
                    response = h11.Response(
                        status_code=status, headers=[("Content-Length", str(len(body)))]
                    )
                    await stream.send_all(conn.send(response) + conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return


async def serve_header_backend(
    backend: HeaderBackend, pki: Pki, *, task_status: trio.TaskStatus[int]
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.client_ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED  # only the connector (system certificate) may call
    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    transport = listeners[0].transport_listener
    assert isinstance(transport, trio.SocketListener)
    task_status.started(transport.socket.getsockname()[1])
    await trio.serve_listeners(backend.handle, listeners)


# ------------------------------------------------------------------------- the set-up


@dataclass
class Setup:
    proxy_port: int
    connector: Connector
    gateway_audit: Path
    connector_audit: Path


@pytest.fixture
async def setup(tmp_path: Path, pki: Pki, nginx: Nginx, idp: Idp) -> AsyncIterator[Setup]:
    # The connector's principal propagation CA: for nginx to verify user certificates it is
    # the CA nginx trusts for clients (pki.client_ca), so load that one.
    user_ca = UserCertificateAuthority.load(pki.client_ca, pki.client_ca.with_name("client-ca.key"))
    backend = HeaderBackend(user_ca.certificate)
    tls = tls_material(tmp_path / "tls")
    gateway_audit, connector_audit = tmp_path / "gateway.jsonl", tmp_path / "connector.jsonl"
    document = gateway_document(tls, gateway_audit, socks=False)
    # The same IdP also signs SAML assertions, with a certificate for the same key.
    idp_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-idp saml signing")])
    now = datetime.datetime.now(datetime.UTC)
    saml_certificate = (
        x509.CertificateBuilder()
        .subject_name(idp_name)
        .issuer_name(idp_name)
        .public_key(idp.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(idp.key, hashes.SHA256())
    )
    saml_pem = tmp_path / "idp-saml.pem"
    saml_pem.write_bytes(saml_certificate.public_bytes(serialization.Encoding.PEM))
    document["subaccounts"]["acme"]["identity_providers"] = [
        {
            "name": "test-idp",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "public_key_file": str(idp.public_pem),
            "kid": "k1",
            "saml_certificate_file": str(saml_pem),
        }
    ]
    document["plugins"]["http"] = {"proxy_listen": "127.0.0.1:0"}
    async with trio.open_nursery() as nursery:
        header_port = await nursery.start(serve_header_backend, backend, pki)
        async with open_gateway(GatewayConfig.from_mapping(document, source="gateway.toml")) as gw:
            assert gw.tunnel_address is not None

            def https(virtual: str, port: int, mode: str, **extra: Any) -> dict[str, Any]:
                return {
                    "protocol": "https",
                    "virtual": virtual,
                    "internal": f"127.0.0.1:{port}",
                    "ca_file": str(pki.backend_ca),
                    "principal_propagation": mode,
                    "resources": [{"path": "/"}],
                    **extra,
                }

            system = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
            connector = connector_document(
                tls,
                gw.tunnel_address.port,
                connector_audit,
                [
                    https("nginx.virtual:443", nginx.mtls_port, "certificate"),
                    https("erp.virtual:443", header_port, "header", **system),
                    https("plain.virtual:443", header_port, "none", **system),
                ],
            )
            connector["principal_propagation"] = {
                "ca_cert": str(pki.client_ca),
                "ca_key": str(pki.client_ca.with_name("client-ca.key")),
                "certificate_validity": 600,
                "subject_rules": [{"pattern": "CN=${name},O=Example"}],
            }
            config = ConnectorConfig.from_mapping(connector, source="connector.toml")
            async with open_connector(config) as running:
                with trio.fail_after(10):
                    await running.wait_connected()
                resolver = running.principal_resolver
                assert resolver is not None
                await trio.to_thread.run_sync(
                    lambda: wait_until(lambda: len(resolver.trust_for("acme")) == 1, "trust list")
                )
                port = gw.front_door_addresses["http.proxy"][0].port
                yield Setup(port, running, gateway_audit, connector_audit)
        nursery.cancel_scope.cancel()


async def get(setup: Setup, url: str, token: str | None) -> tuple[int, dict[str, str], str]:
    """GET through the HTTP proxy with the app's credentials and the user's token."""
    stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    conn = h11.Connection(h11.CLIENT)
    credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
    headers = [("Host", url.split("/")[2]), ("Proxy-Authorization", f"Basic {credentials}")]
    if token is not None:
        headers.append(("SAP-Connectivity-Authentication", f"Bearer {token}"))
    async with stream:
        await stream.send_all(conn.send(h11.Request(method="GET", target=url, headers=headers)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, response_headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, response_headers, body.decode()


# ------------------------------------------------------------------------------- tests


async def test_user_certificate_as_tls_client_certificate(setup: Setup, idp: Idp) -> None:
    with trio.fail_after(20):
        status, headers, body = await get(setup, "http://nginx.virtual:443/", idp.token())
    assert status == 200, (body, headers)
    assert headers["x-client-dn"] == "CN=alice,O=Example"  # nginx verified it against the CA
    assert body == "mutual TLS ok: SUCCESS\n"


async def test_user_certificate_in_ssl_client_cert_behind_the_system_certificate(
    setup: Setup, idp: Idp
) -> None:
    with trio.fail_after(20):
        status, _, body = await get(setup, "http://erp.virtual:443/x", idp.token())
        # Without propagation the backend gets an empty header: the system certificate alone
        # is no logon, and a client's own SSL_CLIENT_CERT never gets through.
        plain_status, _, plain_body = await get(setup, "http://plain.virtual:443/x", None)
    assert (status, body) == (200, "user=ALICE\n")
    assert plain_status == 403
    assert "empty SSL_CLIENT_CERT" in plain_body


async def test_certificates_are_cached_per_user(setup: Setup, idp: Idp) -> None:
    resolver = setup.connector.principal_resolver
    assert resolver is not None
    for _ in range(3):
        status, _, _ = await get(setup, "http://erp.virtual:443/x", idp.token())
        assert status == 200
    assert len(resolver.cache) == 1


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "wrong_audience"),
        ({"iss": "https://evil.test"}, "untrusted_issuer"),
        ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
        ({"user_name": None, "email": None, "sub": None}, "no_subject"),
    ],
)
async def test_bad_tokens_are_refused_with_their_reason(
    setup: Setup, idp: Idp, claims: dict[str, Any], reason: str
) -> None:
    token = idp.token(**claims)
    status, _, body = await get(setup, "http://erp.virtual:443/x", token)
    assert status == (403 if reason == "no_subject" else 401)
    assert f"({reason})" in body
    denials = [
        line
        for line in audit_lines(setup.connector_audit)
        if line["event"] == "principal_propagation"
    ]
    assert denials[-1]["reason"] == reason
    assert token not in setup.connector_audit.read_text()
    assert token.split(".")[2] not in body


async def test_forged_and_missing_tokens(setup: Setup, idp: Idp, tmp_path: Path) -> None:
    attacker = Idp(ec.generate_private_key(ec.SECP256R1()), tmp_path / "unused.pem")
    status, _, body = await get(setup, "http://erp.virtual:443/x", attacker.token())
    assert (status, "(bad_signature)" in body) == (401, True)
    status, _, body = await get(setup, "http://erp.virtual:443/x", None)
    assert (status, "(missing_token)" in body) == (401, True)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "user_name": "alice"}
    unsigned = jwt.encode(claims, None, "none")  # type: ignore[arg-type]
    status, _, body = await get(setup, "http://erp.virtual:443/x", unsigned)
    assert (status, "(unsigned_token)" in body) == (401, True)


def saml_assertion(key: ec.EllipticCurvePrivateKey, name_id: str) -> str:
    """A SAML 2.0 assertion for ``name_id`` signed (ECDSA-SHA256) by the test IdP, base64."""

    def when(offset: float) -> str:
        moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    saml = "urn:oasis:names:tc:SAML:2.0:assertion"
    xml = (
        f'<saml2:Assertion xmlns:saml2="{saml}" ID="_e2e" Version="2.0" IssueInstant="{when(0)}">'
        f"<saml2:Issuer>{ISSUER}</saml2:Issuer>"
        '<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#" Id="placeholder"/>'
        f"<saml2:Subject><saml2:NameID>{name_id}</saml2:NameID>"
        '<saml2:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer">'
        f'<saml2:SubjectConfirmationData NotOnOrAfter="{when(300)}"/>'
        "</saml2:SubjectConfirmation></saml2:Subject>"
        f'<saml2:Conditions NotBefore="{when(-60)}" NotOnOrAfter="{when(300)}">'
        f"<saml2:AudienceRestriction><saml2:Audience>{AUDIENCE}</saml2:Audience>"
        "</saml2:AudienceRestriction></saml2:Conditions>"
        "</saml2:Assertion>"
    )
    signer = XMLSigner(
        signature_algorithm="ecdsa-sha256",
        digest_algorithm="sha256",
        c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
    )
    signed = signer.sign(etree.fromstring(xml), key=key, id_attribute="ID")
    return base64.b64encode(etree.tostring(signed)).decode("ascii")


async def test_saml_assertion_propagates_the_user(setup: Setup, idp: Idp) -> None:
    """``SAP-Connectivity-Authentication: SAML2.0 <base64 assertion>``: the connector verifies
    the assertion with the IdP's SAML signing certificate and the backend sees alice."""
    assertion = saml_assertion(idp.key, "alice")
    stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    conn = h11.Connection(h11.CLIENT)
    credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
    headers = [
        ("Host", "erp.virtual:443"),
        ("Proxy-Authorization", f"Basic {credentials}"),
        ("SAP-Connectivity-Authentication", f"SAML2.0 {assertion}"),
    ]
    request = h11.Request(method="GET", target="http://erp.virtual:443/x", headers=headers)
    status, body = 0, b""
    with trio.fail_after(20):
        async with stream:
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    assert (status, body.decode()) == (200, "user=ALICE\n")
    assert assertion not in setup.connector_audit.read_text()


async def test_the_user_tls_context_is_built_once_per_certificate(setup: Setup, idp: Idp) -> None:
    handler = setup.connector.handlers["http"]
    contexts = handler.user_contexts  # type: ignore[attr-defined]
    for _ in range(3):  # a new client connection, so a new tunnel stream, each time
        status, headers, _ = await get(setup, "http://nginx.virtual:443/", idp.token())
        assert (status, headers["x-client-dn"]) == (200, "CN=alice,O=Example")
    assert len(contexts._contexts) == 1
