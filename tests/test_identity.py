"""The connector's principal propagation resolver, in process: configuration, the trust list
from the gateway with this connector's untrusted IdPs, caching, and a CA that expires."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backchannel import (
    AuditLog,
    ConfigError,
    ConnectorConfig,
    HostPort,
    PrincipalError,
    PrincipalReason,
    Role,
    Session,
    SystemMapping,
)
from backchannel._identity import PrincipalPropagationConfig, PrincipalResolver
from backchannel._jwt_trust import TrustedIdp, TrustList
from backchannel._subject_rules import SubjectRule, SubjectRules
from backchannel._user_ca import UserCertificateAuthority

ISSUER = "https://idp.test"
DAY = 86400.0


def _idp() -> tuple[ec.EllipticCurvePrivateKey, TrustedIdp]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, TrustedIdp.from_pem("corp", ISSUER, pem, ["backchannel"], "k1")


def _token(key: ec.EllipticCurvePrivateKey, now: float, **claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": "backchannel", "iat": int(now), "exp": int(now) + 300}
    payload.update(user_name="alice", **claims)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "k1"})


def _session(audit: AuditLog, token: str | None) -> Session:
    mapping = SystemMapping("acme", "https", "erp.virtual", range(443, 444), "erp.corp", 443)
    return Session(
        protocol="http",
        subaccount="acme",
        location="",
        app="crm",
        virtual=HostPort("erp.virtual", 443),
        internal=HostPort("erp.corp", 443),
        mapping=mapping,
        audit=audit,
        principal=None if token is None else f"Bearer {token}",
    )


def _resolver(
    tmp_path: Path, *, valid_days: int = 30, clock: Any = time.time, **untrusted: frozenset[str]
) -> PrincipalResolver:
    cert, key = UserCertificateAuthority.create(valid_days=valid_days).save(tmp_path / "ca")
    config = PrincipalPropagationConfig(
        cert, key, None, 600, 60, SubjectRules((SubjectRule("CN=${name},O=Example"),))
    )
    return PrincipalResolver.load(config, source="connector.toml", untrusted=untrusted, clock=clock)


def test_resolve_through_the_session(tmp_path: Path) -> None:
    key, idp = _idp()
    resolver = _resolver(tmp_path)
    resolver.update_trust("acme", TrustList([idp]))
    audit = AuditLog(Role.CONNECTOR)

    def session(token: str | None) -> Session:
        plain = _session(audit, token)
        return Session(**{**_fields(plain), "principal_resolver": resolver})

    user = session(_token(key, time.time())).propagated_user()
    again = session(_token(key, time.time())).propagated_user()
    assert user.subject == "CN=alice,O=Example"
    assert user.identity_provider == "corp"
    assert again.certificate is user.certificate  # cached while fresh
    with pytest.raises(PrincipalError) as info:
        session(None).propagated_user()
    assert info.value.reason is PrincipalReason.MISSING_TOKEN


def _fields(session: Session) -> dict[str, Any]:
    return {name: getattr(session, name) for name in Session.__dataclass_fields__}


def test_untrusted_idp_on_this_connector_is_refused(tmp_path: Path) -> None:
    key, idp = _idp()
    resolver = _resolver(tmp_path, acme=frozenset({"corp"}))
    resolver.update_trust("acme", TrustList([idp]))
    session = Session(
        **{
            **_fields(_session(AuditLog(Role.CONNECTOR), _token(key, time.time()))),
            "principal_resolver": resolver,
        }
    )
    with pytest.raises(PrincipalError) as info:
        session.propagated_user()
    assert info.value.reason is PrincipalReason.IDP_NOT_TRUSTED


def test_without_the_table_every_propagation_is_ca_unusable() -> None:
    with pytest.raises(PrincipalError) as info:
        _session(AuditLog(Role.CONNECTOR), "x").propagated_user()
    assert info.value.reason is PrincipalReason.CA_UNUSABLE
    assert "[principal_propagation]" in str(info.value)


def test_a_ca_that_expired_since_start_is_ca_unusable(tmp_path: Path) -> None:
    key, idp = _idp()
    later = [time.time()]
    resolver = _resolver(tmp_path, valid_days=1, clock=lambda: later[0])
    resolver.update_trust("acme", TrustList([idp]))
    later[0] += 3 * DAY  # the connector kept running past the CA's expiry
    session = Session(
        **{
            **_fields(_session(AuditLog(Role.CONNECTOR), _token(key, later[0]))),
            "principal_resolver": resolver,
        }
    )
    with pytest.raises(PrincipalError) as info:
        session.propagated_user()
    assert info.value.reason is PrincipalReason.CA_UNUSABLE
    assert "renew it" in str(info.value)


def test_configuration_errors_name_the_key(tmp_path: Path) -> None:
    base = {
        "subaccounts": {
            "acme": {
                "gateway": "wss://127.0.0.1:1/tunnel",
                "token": "t" * 32,
                "use_environment_proxy": False,
            }
        }
    }
    with pytest.raises(ConfigError) as info:
        ConnectorConfig.from_mapping(
            {**base, "principal_propagation": {"ca_cert": "x.pem", "ca_key": "x.key"}},
            source="connector.toml",
            base_dir=tmp_path,
        )
    assert "principal_propagation.ca_cert" in str(info.value)
    cert, key = UserCertificateAuthority.create().save(tmp_path / "ca")
    table = {"ca_cert": str(cert), "ca_key": str(key)}
    with pytest.raises(ConfigError) as info:
        ConnectorConfig.from_mapping(
            {**base, "principal_propagation": table}, source="connector.toml"
        )
    assert "subject_rules" in str(info.value)
    rules = [{"pattern": "CN=${name}", "variable": "user_type", "operator": "sounds_like"}]
    with pytest.raises(ConfigError) as info:
        ConnectorConfig.from_mapping(
            {**base, "principal_propagation": {**table, "subject_rules": rules}},
            source="connector.toml",
        )
    assert "operator" in str(info.value)


def test_an_unusable_trust_list_from_the_gateway_fails_closed(tmp_path: Path) -> None:
    from backchannel._config import ConnectorSubaccount
    from backchannel._connector import _on_control_document

    _, idp = _idp()
    resolver = _resolver(tmp_path)
    resolver.update_trust("acme", TrustList([idp]))
    sub = ConnectorSubaccount.__new__(ConnectorSubaccount)
    object.__setattr__(sub, "name", "acme")
    _on_control_document(resolver, sub, {"trust": {"version": 1, "idps": "not a list"}})
    assert len(resolver.trust_for("acme")) == 0
