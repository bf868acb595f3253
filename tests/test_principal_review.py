"""Principal propagation, from a security review: a client's own certificate headers in any
spelling, a gateway renaming an IdP the connector refuses, and a token that expires while its
stream is kept alive."""

from __future__ import annotations

import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backchannel import (
    AuditLog,
    CertificateAuthority,
    HostPort,
    PrincipalError,
    PrincipalReason,
    Role,
    Session,
    SystemMapping,
    TableReader,
)
from backchannel._identity import PrincipalPropagationConfig, PrincipalResolver
from backchannel._jwt_trust import TrustedIdp, TrustList
from backchannel._subject_rules import SubjectRule, SubjectRules
from backchannel._user_ca import UserCertificateAuthority
from backchannel_http._handler import HttpHandler
from backchannel_http._rewrite import Origin, request_headers
from tests.test_http_handler import Client, RecordingAudit, start_backend
from tests.tunnel_pair import tunnel_pair

ISSUER = "https://idp.test"
VHOST, VPORT = "erp.virtual", 8000  # the Host that test_http_handler.Client sends


def _idp(name: str = "corp") -> tuple[ec.EllipticCurvePrivateKey, TrustedIdp]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, TrustedIdp.from_pem(name, ISSUER, pem, ["backchannel"], "k1")


def _token(key: ec.EllipticCurvePrivateKey, now: float, lifetime: int = 300) -> str:
    payload = {
        "iss": ISSUER,
        "aud": "backchannel",
        "iat": int(now),
        "exp": int(now) + lifetime,
        "user_name": "alice",
    }
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "k1"})


def _resolver(
    tmp_path: Path, *, clock: Any = time.time, **untrusted: frozenset[str]
) -> PrincipalResolver:
    cert, key = UserCertificateAuthority.create(valid_days=30).save(tmp_path / "ca")
    config = PrincipalPropagationConfig(
        cert, key, None, 600, 60, SubjectRules((SubjectRule("CN=${name},O=Example"),))
    )
    return PrincipalResolver.load(config, source="connector.toml", untrusted=untrusted, clock=clock)


def _session(resolver: PrincipalResolver, token: str, audit: AuditLog | None = None) -> Session:
    mapping = SystemMapping("acme", "https", VHOST, range(VPORT, VPORT + 1), "erp.corp", 443)
    return Session(
        protocol="http",
        subaccount="acme",
        location="",
        app="crm",
        virtual=HostPort(VHOST, VPORT),
        internal=HostPort("erp.corp", 443),
        mapping=mapping,
        audit=audit or AuditLog(Role.CONNECTOR),
        principal=f"Bearer {token}",
        principal_resolver=resolver,
    )


# --------------------------------------------------------------------------- client headers


@pytest.mark.parametrize(
    "name",
    [
        b"ssl-client_cert",
        b"ssl_client-cert",
        b"x_ssl_client_cert",
        b"x-ssl_client-cert",
        b"client-cert",
        b"client_cert",
        b"x-forwarded-client-cert",
        b"x_forwarded_for",
        b"x_real_ip",
    ],
)
def test_certificate_and_forwarding_headers_in_any_spelling_are_stripped(name: bytes) -> None:
    # CGI, WSGI and PHP read "SSL-Client_Cert" as HTTP_SSL_CLIENT_CERT, exactly like the
    # connector's own SSL_CLIENT_CERT: a client must not be able to send it in any spelling.
    out = request_headers(
        [(b"host", b"erp.virtual"), (name, b"forged"), (b"x-kept", b"yes")],
        host_mode="virtual",
        internal=Origin("https", "erp.corp", 443),
        virtual=Origin("http", VHOST, VPORT),
        client_ip="203.0.113.7",
        scheme="http",
        websocket=False,
    )
    assert b"forged" not in [v for _, v in out]
    assert (b"x-kept", b"yes") in out


# --------------------------------------------------------------------------- the gateway's names


def test_a_gateway_renaming_an_untrusted_idp_does_not_make_it_trusted(tmp_path: Path) -> None:
    key, idp = _idp("corp")
    resolver = _resolver(tmp_path, acme=frozenset({"corp"}))
    resolver.update_trust("acme", TrustList([idp]))
    # The gateway (partly trusted) sends the same IdP again under another name.
    resolver.update_trust("acme", TrustList([dataclasses.replace(idp, name="corp-2")]))
    with pytest.raises(PrincipalError) as info:
        _session(resolver, _token(key, time.time())).propagated_user()
    assert info.value.reason is PrincipalReason.IDP_NOT_TRUSTED


def test_untrusted_identity_providers_may_name_the_issuer(tmp_path: Path) -> None:
    key, idp = _idp("whatever-the-gateway-calls-it")
    resolver = _resolver(tmp_path, acme=frozenset({ISSUER}))
    resolver.update_trust("acme", TrustList([idp]))
    with pytest.raises(PrincipalError) as info:
        _session(resolver, _token(key, time.time())).propagated_user()
    assert info.value.reason is PrincipalReason.IDP_NOT_TRUSTED


def test_other_subaccounts_keep_their_own_untrusted_list(tmp_path: Path) -> None:
    key, idp = _idp("corp")
    resolver = _resolver(tmp_path, other=frozenset({"corp"}))
    resolver.update_trust("other", TrustList([idp]))
    resolver.update_trust("acme", TrustList([idp]))
    assert _session(resolver, _token(key, time.time())).propagated_user().subject == (
        "CN=alice,O=Example"
    )


# --------------------------------------------------------------------------- kept-alive streams


@asynccontextmanager
async def _header_mode_stream(
    tmp_path: Path, resolver: PrincipalResolver, token: str
) -> AsyncIterator[tuple[Client, RecordingAudit, list[dict[str, Any]]]]:
    """A handler serving one stream of ``header`` propagation to an mTLS backend."""
    ca = CertificateAuthority.create("backend CA")
    ca_file, _ = ca.save(tmp_path, name="ca")
    server_cert, server_key = ca.issue_server_certificate(["backend.corp"]).save(tmp_path, "srv")
    client_cert, client_key = ca.issue_client_certificate("connector-7").save(tmp_path, "cli")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    table = {
        "protocol": "https",
        "ca_file": str(ca_file),
        "server_name": "backend.corp",
        "client_cert": str(client_cert),
        "client_key": str(client_key),
        "principal_propagation": "header",
        "resources": [{"path": "/public"}],
    }
    options = HttpHandler().parse_mapping_options(
        TableReader("connector.toml", "mappings[0]", table, tmp_path)
    )
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, context)
        mapping = SystemMapping(
            "acme",
            "https",
            VHOST,
            range(VPORT, VPORT + 1),
            "127.0.0.1",
            backend.port,
            options=options,
        )
        audit = RecordingAudit()
        session = dataclasses.replace(
            _session(resolver, token, audit),
            mapping=mapping,
            internal=HostPort("127.0.0.1", backend.port),
            attributes={"client_ip": "203.0.113.7", "scheme": "http"},
        )
        metadata = {"protocol": "http", "host": VHOST, "port": VPORT}
        async with tunnel_pair(accept=False) as pair:
            opener, acceptor = await pair.open_pair(metadata, wait_accepted=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(HttpHandler(connect_timeout=5).handle, session, acceptor)
                with trio.fail_after(30):
                    yield Client(opener), audit, backend.requests
                nursery.cancel_scope.cancel()
        backends.cancel_scope.cancel()


def _sent_certificate(seen: dict[str, Any]) -> str:
    values = [v for k, v in seen["headers"] if k.replace("_", "-") == "ssl-client-cert"]
    assert len(values) == 1, values
    return str(values[0])


async def test_a_token_that_expires_while_its_stream_is_kept_alive_is_refused(
    tmp_path: Path,
) -> None:
    now = [time.time()]
    key, idp = _idp()
    resolver = _resolver(tmp_path, clock=lambda: now[0])
    resolver.update_trust("acme", TrustList([idp]))
    token = _token(key, now[0], lifetime=300)
    async with _header_mode_stream(tmp_path, resolver, token) as (client, audit, seen):
        first = await client.request("GET", "/public/a", [("ssl-client_cert", "forged")])
        assert first.status == 200, first.body
        assert _sent_certificate(seen[0]) not in ("", "forged")
        now[0] += 300 + 60 + 1  # past exp and the leeway; the stream is still open
        second = await client.request("GET", "/public/b")
    assert second.status == 401, second.body
    assert b"(expired)" in second.body
    assert len(seen) == 1  # the backend never heard of the second request
    assert any(d["reason"] == "expired" for d in audit.denials_seen)
    assert json.dumps(audit.denials_seen).find(token) < 0


async def test_the_user_certificate_is_renewed_on_a_long_kept_alive_stream(
    tmp_path: Path,
) -> None:
    now = [time.time()]
    key, idp = _idp()
    resolver = _resolver(tmp_path, clock=lambda: now[0])
    resolver.update_trust("acme", TrustList([idp]))
    token = _token(key, now[0], lifetime=3600)
    async with _header_mode_stream(tmp_path, resolver, token) as (client, _, seen):
        assert (await client.request("GET", "/public/a")).status == 200
        now[0] += 600  # the 600 s certificate has expired; the token has not
        assert (await client.request("GET", "/public/b")).status == 200
    assert _sent_certificate(seen[0]) != _sent_certificate(seen[1])
