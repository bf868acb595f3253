"""RFC principal propagation end to end: the cloud user's JWT travels from the pyrfc-compatible
client (or the JSON endpoint's ``SAP-Connectivity-Authentication`` header) through the gateway
to the connector, which validates it against the identity providers the gateway sent, issues a
short-lived certificate from its user CA, and logs the user on to the stub ABAP system with it
(``x509cert``); the stub trusts that CA and maps ``CN=alice,O=Example`` to ALICE.

Every refusal is a LogonError naming the reason, with an audit line on the connector; no token
text may appear in any message or audit line.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import h11
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backchannel import ConfigError, GatewayServices, HostPort, TableReader
from backchannel._user_ca import UserCertificateAuthority
from backchannel_rfc import _connection
from backchannel_rfc._backend import BackendConnection, BackendPool
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._destinations import RfcDestinations, read_destinations
from backchannel_rfc._errors import (
    LogonError,
    logon_failure,
    principal_refusal,
    principal_refusal_reason,
)
from backchannel_rfc._handler import RfcHandler
from backchannel_rfc._json_http import status_for
from backchannel_rfc._routing import MAX_USER_TOKEN, user_principal
from backchannel_rfc._system import AbapSystem, User
from tests.harness import APP_SECRET, audit_lines
from tests.procs import wait_until
from tests.rfc_harness import DEFAULT_FUNCTIONS, VIRTUAL_HOST, RfcSetup, in_thread, rfc_setup

ISSUER = "https://idp.test"
PARTNER_ISSUER = "https://partner.test"
AUDIENCE = "backchannel"
DESTINATION = "ERP_PP"
FUNCTIONS = (*DEFAULT_FUNCTIONS, {"name": "BAPI_USER_GET_DETAIL"})


@dataclass
class Idp:
    """An identity provider's signing key, minting ES256 tokens."""

    issuer: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def public_pem(self, path: Path) -> Path:
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def token(self, user: str = "alice", **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "user_name": user,
            **claims,
        }
        return jwt.encode(payload, self.key, algorithm="ES256")


@dataclass
class Principal:
    """A running setup with principal propagation, and what the tests look at."""

    setup: RfcSetup
    idp: Idp
    partner: Idp
    #: Every certificate logon the stub system saw (the subject's CN, as the test mapped it).
    certificate_logons: list[str]
    #: Every token minted, so that no message or audit line can be checked without them.
    tokens: list[str] = field(default_factory=list)

    def token(self, idp: Idp | None = None, user: str = "alice", **claims: Any) -> str:
        token = (idp or self.idp).token(user, **claims)
        self.tokens.append(token)
        return token

    def params(self, **overrides: str) -> dict[str, str]:
        """Through the gateway to the virtual system, client 100, no user or password."""
        return self.setup.params(**{"user": "", "passwd": "", **overrides})

    def connect(self, **overrides: str) -> Connection:
        return Connection(None, **self.params(**overrides))

    async def released(self) -> None:
        """Wait until the connector has put the backend connection back in its pool (the
        client does not wait for that when it closes)."""
        handler = self.setup.connector.handlers["rfc"]
        assert isinstance(handler, RfcHandler)
        address = HostPort("127.0.0.1", self.setup.stub_port)

        def idle() -> int:
            return trio.from_thread.run_sync(handler.pool.idle_count, address)

        await in_thread(lambda: wait_until(lambda: idle() == 1, "the connection pooled"))

    def user_of(self, **overrides: str) -> str:
        """Connect, and close again: the ABAP user the connection was logged on as."""
        with self.connect(**overrides) as connection:
            return str(connection.get_connection_attributes()["user"])

    def assert_no_token_anywhere(self, *texts: str) -> None:
        """No token (nor its signature) in ``texts`` or in either side's audit file."""
        audits = [
            path.read_text() if path.exists() else ""
            for path in (self.setup.gateway_audit, self.setup.connector_audit)
        ]
        for token in self.tokens:
            signature = token.rsplit(".", 1)[1]
            for text in (*texts, *audits):
                assert token not in text
                assert signature not in text

    def denials(self) -> list[dict[str, Any]]:
        return [
            line
            for line in audit_lines(self.setup.connector_audit)
            if line.get("event") == "principal_propagation" and line.get("decision") == "deny"
        ]


def _counting(system: AbapSystem, seen: list[str]) -> None:
    """Record each certificate logon the system accepts (by the user it mapped to)."""
    original = system.logon

    def logon(client: str, **kwargs: Any) -> Any:
        session = original(client, **kwargs)
        if kwargs.get("x509cert"):
            seen.append(session.user)
        return session

    system.logon = logon  # type: ignore[method-assign]


@asynccontextmanager
async def principal_setup(
    tmp_path: Path, *, destinations: Sequence[dict[str, Any]] = ()
) -> AsyncIterator[Principal]:
    """Gateway with two identity providers (``main`` and ``partner``), connector with a user
    CA, subject rule ``CN=${name},O=Example``, ``partner`` marked untrusted, and an ``rfc``
    mapping with principal propagation to a stub system that trusts the CA."""
    idp, partner = Idp(ISSUER), Idp(PARTNER_ISSUER)
    ca_cert, ca_key = UserCertificateAuthority.create("test PP CA").save(tmp_path / "pp-ca")
    # The connector issues certificates for the real time: the stub must use it too.
    system = demo_system(now=datetime.datetime.now)
    system.trust_certificate_authority(ca_cert.read_text())
    system.add_user("100", User("BOB", "unused-password", "Bob", "Example"))
    system.map_certificate("100", "CN=bob,O=Example", "BOB")
    system.add_user("100", User("CAROL", "unused-password", "Carol", "Example"))
    system.map_certificate("100", "CN=carol,O=Example", "CAROL")
    logons: list[str] = []
    _counting(system, logons)
    providers = [
        {
            "name": "main",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "public_key_file": str(idp.public_pem(tmp_path / "idp.pem")),
        },
        {
            "name": "partner",
            "issuer": PARTNER_ISSUER,
            "audiences": [AUDIENCE],
            "public_key_file": str(partner.public_pem(tmp_path / "partner.pem")),
        },
    ]
    propagation = {
        "ca_cert": str(ca_cert),
        "ca_key": str(ca_key),
        "subject_rules": [{"pattern": "CN=${name},O=Example"}],
    }
    audit = {"file": str(tmp_path / "connector-audit.jsonl"), "include_allowed": True}
    async with rfc_setup(
        tmp_path,
        system=system,
        functions=FUNCTIONS,
        mapping_extra={"principal_propagation": True},
        destinations=destinations,
        gateway_subaccount={"identity_providers": providers},
        connector_subaccount={"untrusted_identity_providers": ["partner"]},
        connector_root={"principal_propagation": propagation, "audit": audit},
    ) as setup:
        resolver = setup.connector.principal_resolver
        assert resolver is not None
        # The gateway sends the trust list right after the tunnel comes up.
        await in_thread(lambda: wait_until(lambda: len(resolver.trust_for("acme")) == 2, "trust"))
        yield Principal(setup, idp, partner, logons)


def _destination(**extra: Any) -> dict[str, Any]:
    return {
        "name": DESTINATION,
        "subaccount": "acme",
        "ashost": VIRTUAL_HOST,
        "sysnr": "00",
        "client": "100",
        "authentication": "PrincipalPropagation",
        **extra,
    }


@pytest.mark.integration
async def test_the_cloud_user_logs_on_as_themselves(tmp_path: Path) -> None:
    async with principal_setup(tmp_path, destinations=[_destination()]) as pp:
        token = pp.token()

        def by_virtual_system() -> tuple[str, dict[str, Any], str]:
            with pp.connect(token=token) as connection:
                text = connection.call("STFC_CONNECTION", REQUTEXT="hi")["RESPTEXT"]
                detail = connection.call("BAPI_USER_GET_DETAIL", USERNAME="ALICE")
                user = connection.get_connection_attributes()["user"]
            return text, detail, user

        resptext, detail, user = await in_thread(by_virtual_system)
        await pp.released()
        route = {"gateway": str(pp.setup.front_door), "app": "acme/crm", "app_secret": APP_SECRET}

        def by_destination(**logon: str) -> str:
            with Connection(None, dest=DESTINATION, token=token, **route, **logon) as connection:
                text: str = connection.call("STFC_CONNECTION", REQUTEXT="x")["RESPTEXT"]
                return text

        via_destination = await in_thread(by_destination)
        await pp.released()
        # A user and password the app sends are dropped: the token decides who logs on.
        with_password = await in_thread(lambda: by_destination(user="DEMO", passwd="welcome"))
        await pp.released()
        direct_with_password = await in_thread(
            partial(pp.user_of, token=token, user="DEMO", passwd="welcome")
        )
        resolver = pp.setup.connector.principal_resolver
        assert resolver is not None
        cached_after_alice = len(resolver.cache)
        # Another user gets a certificate (and a pooled backend connection) of their own.
        bob = await in_thread(partial(pp.user_of, token=pp.token(user="bob")))
        cached_after_bob = len(resolver.cache)
    assert "Logon_Data: 100/ALICE/" in resptext
    assert user == "ALICE"
    assert detail["ADDRESS"]["LASTNAME"] == "Example"
    assert detail["RETURN"] == []
    assert "Logon_Data: 100/ALICE/" in via_destination
    assert "Logon_Data: 100/ALICE/" in with_password
    assert direct_with_password == "ALICE"
    assert bob == "BOB"
    # Four connections as alice: one certificate, one backend logon (the pooled connection is
    # keyed by the certificate, so it is reused); bob needs his own of both.
    assert cached_after_alice == 1
    assert cached_after_bob == 2
    assert pp.certificate_logons == ["ALICE", "BOB"]
    lines = audit_lines(pp.setup.connector_audit)
    allowed = [e for e in lines if e["event"] == "principal_propagation"]
    assert {e["subject"] for e in allowed} == {"CN=alice,O=Example", "CN=bob,O=Example"}
    assert all(e["identity_provider"] == "main" for e in allowed)
    logons = [e for e in lines if e["event"] == "rfc_logon"]
    # The destination drops the app's user and password at the gateway already; straight to
    # the virtual system they reach the connector, which ignores them and says so.
    assert [e.get("ignored_credentials") for e in logons] == [None, None, None, "user,passwd", None]
    assert all(e["subject"] == f"CN={e['user'].lower()},O=Example" for e in logons)
    pp.assert_no_token_anywhere(resptext)


REFUSALS = ("expired", "wrong_audience", "untrusted_issuer", "idp_not_trusted", "bad_signature")


@pytest.mark.integration
async def test_refused_tokens_say_why_and_are_audited(tmp_path: Path) -> None:
    async with principal_setup(tmp_path, destinations=[_destination()]) as pp:
        stranger = Idp("https://evil.test")
        forger = Idp(ISSUER)  # the right issuer, the wrong key
        tokens = {
            "expired": pp.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
            "wrong_audience": pp.token(aud="someone-else"),
            "untrusted_issuer": pp.token(stranger),
            "idp_not_trusted": pp.token(pp.partner),
            "bad_signature": pp.token(forger),
        }
        errors: dict[str, LogonError] = {}
        for reason, token in tokens.items():
            with pytest.raises(LogonError) as info:
                await in_thread(partial(pp.connect, token=token))
            errors[reason] = info.value
        with pytest.raises(LogonError) as missing:
            await in_thread(pp.connect)
        errors["missing_token"] = missing.value
        # A destination with principal propagation: the gateway refuses before any stream.
        route = {"gateway": str(pp.setup.front_door), "app": "acme/crm", "app_secret": APP_SECRET}
        with pytest.raises(LogonError) as no_token:
            await in_thread(lambda: Connection(None, dest=DESTINATION, **route))
        # A backend that does not trust the connector's CA refuses the certificate.
        pp.setup.system.trusted_cas.clear()
        with pytest.raises(LogonError) as rejected:
            await in_thread(lambda: pp.connect(token=pp.token(user="carol")))
    for reason, error in errors.items():
        assert error.key == "RFC_LOGON_FAILURE"
        assert str(error.message).startswith(f"principal propagation ({reason}): "), error
        assert principal_refusal_reason(error) == reason
    assert "expired at" in str(errors["expired"].message)
    assert "'someone-else'" in str(errors["wrong_audience"].message)
    assert "https://evil.test" in str(errors["untrusted_issuer"].message)
    assert "'partner'" in str(errors["idp_not_trusted"].message)
    denied = [line["reason"] for line in pp.denials()]
    assert denied == [*REFUSALS, "missing_token", "backend_rejected_certificate"]
    assert no_token.value.key == "RFC_LOGON_FAILURE"
    assert str(no_token.value.message) == (
        f"gateway: destination {DESTINATION} uses principal propagation: "
        "pass token=<the user's JWT>"
    )
    assert rejected.value.key == "RFC_LOGON_FAILURE"
    message = str(rejected.value.message)
    assert message.startswith("principal propagation (backend_rejected_certificate): ")
    assert f"{VIRTUAL_HOST}:3300 refused the certificate issued for CN=carol,O=Example" in message
    assert "127.0.0.1" not in message
    gateway_denials = [
        line for line in audit_lines(pp.setup.gateway_audit) if line["event"] == "rfc_destination"
    ]
    assert gateway_denials[-1]["destination"] == DESTINATION
    pp.assert_no_token_anywhere(*(str(e) for e in (*errors.values(), rejected.value)))


@pytest.mark.integration
async def test_json_endpoint_takes_the_token_from_its_header(tmp_path: Path) -> None:
    async with principal_setup(tmp_path, destinations=[_destination()]) as pp:
        endpoint = pp.setup.json_endpoint
        token = pp.token()
        expired = pp.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
        target = f"/rfc/{DESTINATION}/STFC_CONNECTION"
        ok = await post(endpoint, target, {"REQUTEXT": "hi"}, f"Bearer {token}")
        detail = await post(
            endpoint,
            f"/rfc/{DESTINATION}/BAPI_USER_GET_DETAIL",
            {"USERNAME": "ALICE"},
            f"Bearer {token}",
        )
        missing = await post(endpoint, target, {"REQUTEXT": "hi"}, None)
        refused = await post(endpoint, target, {}, f"Bearer {expired}")
        twice = await post(endpoint, target, {}, f"Bearer {token}", repeat=2)
    assert ok.status == 200, ok.body
    assert "Logon_Data: 100/ALICE/" in ok.body["RESPTEXT"]
    assert detail.status == 200, detail.body
    assert detail.body["ADDRESS"]["FULLNAME"] == "Alice Example"
    assert missing.status == 401
    assert missing.body["error"]["key"] == "RFC_LOGON_FAILURE"
    assert missing.body["error"]["message"] == (
        f"gateway: destination {DESTINATION} uses principal propagation: send "
        "SAP-Connectivity-Authentication: Bearer <the user's JWT>"
    )
    assert "www-authenticate" not in missing.headers
    assert refused.status == 401
    assert refused.body["error"]["message"].startswith("principal propagation (expired): ")
    assert twice.status == 400
    assert [line["reason"] for line in pp.denials()] == ["expired"]
    pp.assert_no_token_anywhere(json.dumps(refused.body), json.dumps(twice.body))


@pytest.mark.integration
async def test_a_mapping_without_principal_propagation_ignores_the_token(tmp_path: Path) -> None:
    async with rfc_setup(tmp_path) as setup:
        user = await in_thread(
            lambda: Connection(None, **setup.params(token="not.a.jwt")).get_connection_attributes()[
                "user"
            ]
        )
    assert user == "DEMO"
    assert "not.a.jwt" not in setup.connector_audit.read_text()


@pytest.mark.integration
async def test_a_mapping_with_principal_propagation_needs_the_connector_ca(
    tmp_path: Path,
) -> None:
    async with rfc_setup(tmp_path, mapping_extra={"principal_propagation": True}) as setup:
        with pytest.raises(LogonError) as info:
            await in_thread(lambda: Connection(None, **setup.params(token="x.y.z")))
    assert str(info.value.message).startswith("principal propagation (ca_unusable): ")
    assert "[principal_propagation]" in str(info.value.message)


# -- the client: the token goes to the gateway, and only there -----------------------------


class _RecordingChannel:
    """Stands in for the client's socket channel: records the logon it would send."""

    sent: list[dict[str, Any]] = []

    def __init__(self, host: str, port: int, logon: dict[str, Any]) -> None:
        self.sent.append(logon)
        self.handle = 1
        self.info: dict[str, Any] = {}

    def close(self) -> None:
        pass


def test_the_token_goes_in_the_route_and_never_to_a_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_connection, "_Channel", _RecordingChannel)
    monkeypatch.setattr(_RecordingChannel, "sent", [])
    gateway = {"gateway": "gw.internal:23300", "app": "acme/crm", "app_secret": "s"}
    system = {"ashost": "erp.virtual", "sysnr": "00", "client": "100"}
    Connection(None, token="passed.as.parameter", **gateway, **system).close()
    monkeypatch.setenv("BACKCHANNEL_RFC_TOKEN", "from.the.environment")
    Connection(None, **gateway, **system).close()
    Connection(None, token="direct.to.system", user="DEMO", passwd="welcome", **system).close()
    first, second, direct = _RecordingChannel.sent
    assert first["route"]["token"] == "passed.as.parameter"
    assert "token" not in first
    assert second["route"]["token"] == "from.the.environment"
    assert "route" not in direct
    assert "direct.to.system" not in json.dumps(direct)
    assert "from.the.environment" not in json.dumps(direct)


def _never_connect(address: HostPort, logon: Mapping[str, str]) -> BackendConnection:
    raise AssertionError("only keys are computed here")


def test_pool_keys_differ_by_certificate() -> None:
    """Pooled connections logged on with a certificate are reused for that certificate only:
    the key holds a digest of it, so another user's (or a renewed one) never matches."""
    pool = BackendPool(_never_connect)
    ca = UserCertificateAuthority.create()
    now = datetime.datetime.now(datetime.UTC)
    validity = datetime.timedelta(minutes=10)

    def logon(name: str) -> dict[str, str]:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return {
            "client": "100",
            "x509cert": ca.issue(subject, now=now, validity=validity).der_base64(),
        }

    address = HostPort("127.0.0.1", 3300)
    alice = logon("alice")
    assert pool.key(address, alice) == pool.key(address, dict(alice))
    assert pool.key(address, alice) != pool.key(address, logon("bob"))
    assert pool.key(address, alice) != pool.key(address, logon("alice"))  # renewed
    assert alice["x509cert"] not in repr(pool.key(address, alice))


def test_principal_refusals_read_back() -> None:
    refusal = principal_refusal("expired", "the token expired at ...")
    assert str(refusal.message) == "principal propagation (expired): the token expired at ..."
    assert principal_refusal_reason(refusal) == "expired"
    assert principal_refusal_reason(LogonError("principal propagation (x")) is None
    assert principal_refusal_reason(LogonError("Name or password is incorrect")) is None
    # The JSON endpoint: a refused token is the caller's to renew (401); a CA the backend does
    # not trust is not (502, like any backend logon failure).
    assert status_for(refusal) == 401
    assert status_for(principal_refusal("backend_rejected_certificate", "...")) == 502
    assert status_for(principal_refusal("ca_unusable", "...")) == 502
    assert status_for(logon_failure()) == 502


class _Services:
    """The one thing read_destinations asks of the gateway."""

    def has_subaccount(self, subaccount: str) -> bool:
        return subaccount == "acme"


def test_principal_propagation_destinations_carry_no_credentials(tmp_path: Path) -> None:
    def read(**entry: Any) -> RfcDestinations:
        table = {"destinations": [{**_destination(), **entry}]}
        reader = TableReader("gateway.toml", "plugins.rfc", table, tmp_path)
        return read_destinations(reader, cast(GatewayServices, _Services()))

    destination = read(lang="EN").find("acme", "erp_pp")
    assert destination is not None
    assert destination.principal_propagation
    given = {"user": "DEMO", "passwd": "welcome", "x509cert": "MII..", "client": "200"}
    assert destination.logon(given) == {"client": "200", "lang": "EN"}
    for key in ("user", "password"):
        with pytest.raises(ConfigError, match="only used with authentication = Basic"):
            read(**{key: "x"})
    with pytest.raises(ConfigError, match="PrincipalPropagation"):
        read(authentication="Principal")


def test_user_principal_is_a_bounded_bearer_token() -> None:
    assert user_principal(None) is None
    assert user_principal("  ") is None
    assert user_principal("a.b.c") == "Bearer a.b.c"
    assert user_principal("bearer  a.b.c ") == "Bearer a.b.c"
    assert user_principal("SAML2.0 PHNhbWw+") == "SAML2.0 PHNhbWw+"
    with pytest.raises(LogonError) as info:
        user_principal("x" * (MAX_USER_TOKEN + 1))
    assert str(info.value.message).startswith("gateway: the user token is 65537 characters long")


# -- a small HTTP client --------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


async def post(
    address: HostPort,
    target: str,
    params: dict[str, Any],
    token: str | None,
    *,
    repeat: int = 1,
) -> Reply:
    """POST ``params`` as the demo app, with ``token`` in SAP-Connectivity-Authentication
    (``repeat`` times)."""
    credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
    body = json.dumps(params).encode()
    headers = [
        ("Host", "gateway"),
        ("Authorization", f"Basic {credentials}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if token is not None:
        headers += [("SAP-Connectivity-Authentication", token)] * repeat
    client = h11.Connection(h11.CLIENT)
    request = client.send(h11.Request(method="POST", target=target, headers=headers))
    data = (request or b"") + (client.send(h11.Data(data=body)) or b"")
    data += client.send(h11.EndOfMessage()) or b""
    stream = await trio.open_tcp_stream(address.host, address.port)
    status, received, payload = 0, {}, b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    received = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    payload += event.data
                else:
                    break
    return Reply(status, received, json.loads(payload))


@pytest.mark.integration
async def test_a_session_ends_with_its_users_token(tmp_path: Path) -> None:
    async with principal_setup(tmp_path) as pp:
        resolver = pp.setup.connector.principal_resolver
        assert resolver is not None
        token = pp.token()

        def run() -> tuple[str, LogonError]:
            with pp.connect(token=token) as connection:
                first: str = connection.call("STFC_CONNECTION", REQUTEXT="x")["RESPTEXT"]
                # An hour later (the connector's clock), the same session's next call.
                resolver.clock = lambda: time.time() + 3600
                with pytest.raises(LogonError) as info:
                    connection.call("STFC_CONNECTION", REQUTEXT="y")
                return first, info.value

        first, error = await in_thread(run)
    assert "Logon_Data: 100/ALICE/" in first
    assert "principal propagation (expired)" in str(error.message)
