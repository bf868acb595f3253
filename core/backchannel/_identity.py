"""Principal propagation on the connector: from a cloud user's token to a short-lived certificate.

The gateway hands each stream the user's token (``Session.principal``: ``Bearer <JWT>`` or
``SAML2.0 <assertion>``) and, when a tunnel comes up, the subaccount's trusted identity
providers (a CONTROL document ``{"trust": ...}``). A plugin serving a mapping with principal
propagation calls ``session.propagated_user()``: the token is validated against the trusted
IdPs (minus those this connector marks untrusted), the claims are mapped to a subject by the
subject pattern rules, and a certificate for that subject is issued by the connector's CA (or
taken from the cache while it is fresh). Every refusal is a :class:`PrincipalError` with its
reason, audited as ``principal_propagation``; the token never reaches a log or audit line.

```toml
[principal_propagation]
ca_cert = "pp-ca/ca.pem"            # backchannel ca init --dir pp-ca
ca_key = "pp-ca/ca.key"
certificate_validity = 600          # seconds
token_leeway = 60                   # clock skew tolerated on exp / nbf / iat

[[principal_propagation.subject_rules]]
pattern = "CN=${name},O=Example"
# variable = "user_type", operator = "equals", value = "business"   (optional condition)
```
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ._configutil import Secret, TableReader
from ._jwt_trust import TrustedIdp, TrustList, load_saml_certificates, validate_jwt
from ._principal_errors import PrincipalError, PrincipalReason
from ._saml_trust import validate_saml
from ._subject_rules import Condition, Operator, SubjectRule, SubjectRules
from ._user_ca import (
    UnusableCAError,
    UserCertificate,
    UserCertificateAuthority,
    UserCertificateCache,
)

if TYPE_CHECKING:
    from ._plugin_api import Session

#: Where a certificate subject may come from: the variables ``${...}`` and conditions know.
OPERATORS = tuple(op.value for op in Operator)


@dataclass(frozen=True, slots=True)
class PropagatedUser:
    """A cloud user whose token the connector accepted, with the certificate issued for them."""

    #: The certificate subject, RFC 4514 text (``CN=alice,O=Example``).
    subject: str
    #: The identity provider that vouched for the user (its name as the gateway configured it).
    identity_provider: str
    #: The short-lived certificate and key, for the backend leg.
    certificate: UserCertificate
    #: Seconds since the epoch (the resolver's clock) after which this user must be resolved
    #: again: the token's expiry plus the leeway, or the certificate's renewal time if sooner.
    #: A plugin serving several requests on one stream checks it before each one.
    valid_until: float = math.inf


@dataclass(frozen=True, slots=True)
class PrincipalPropagationConfig:
    """The connector's ``[principal_propagation]`` table."""

    ca_cert: Path
    ca_key: Path
    ca_key_passphrase: Secret | None
    certificate_validity: float
    token_leeway: float
    subject_rules: SubjectRules
    #: The ``aud`` a token must carry; without it, any audience the IdP lists.
    audience: str | None = None

    @classmethod
    def read(cls, table: TableReader) -> PrincipalPropagationConfig:
        """Read and check the table (the CA is loaded by :class:`PrincipalResolver`)."""
        ca_cert = table.path("ca_cert", required=True)
        ca_key = table.path("ca_key", required=True)
        assert ca_cert is not None
        assert ca_key is not None
        passphrase = table.secret("ca_key_passphrase", required=False)
        validity = table.number("certificate_validity", 600, minimum=60, maximum=86400)
        leeway = table.number("token_leeway", 60, minimum=0, maximum=3600)
        audience = table.optional_string("audience") or None
        rules: list[SubjectRule] = []
        for rule in table.tables("subject_rules"):
            rules.append(_read_rule(rule))
        if not rules:
            raise table.error(
                "subject_rules",
                "at least one [[principal_propagation.subject_rules]] with a pattern such as "
                '"CN=${name}" is needed',
            )
        table.finish()
        return cls(
            ca_cert, ca_key, passphrase, validity, leeway, SubjectRules(tuple(rules)), audience
        )


def _read_rule(rule: TableReader) -> SubjectRule:
    pattern = rule.string("pattern", required=True)
    description = rule.string("description", "")
    condition: Condition | None = None
    if "variable" in rule or "operator" in rule:
        variable = rule.string("variable", required=True)
        operator = rule.string("operator", "equals")
        if operator not in OPERATORS:
            raise rule.error("operator", f"must be one of {', '.join(OPERATORS)}")
        value = rule.optional_string("value")
        try:
            condition = Condition(variable, Operator(operator), value)
        except ValueError as exc:
            raise rule.error("variable", str(exc)) from None
    try:
        made = SubjectRule(pattern, condition, description)
    except ValueError as exc:
        raise rule.error("pattern", str(exc)) from None
    rule.finish()
    return made


def read_identity_providers(sub: TableReader) -> TrustList:
    """The gateway's ``[[subaccounts.<name>.identity_providers]]``: the IdPs whose users'
    tokens this subaccount's connectors may accept (sent to them when their tunnel comes up).

    Each has ``name``, ``issuer`` (the tokens' ``iss``, exactly), ``audiences`` (``aud``
    values meant for the connector) and its signing keys: ``jwks_file`` (a JWKS document) or
    ``public_key_file`` (a PEM public key or certificate, with an optional ``kid``) for its
    JWTs, and/or ``saml_certificate_file`` (PEM, one or more signing certificates) for its SAML
    assertions, whose ``Issuer`` and ``Audience`` are matched against ``issuer`` and
    ``audiences`` too.
    """
    idps = []
    names: set[str] = set()
    for entry in sub.tables("identity_providers"):
        name = entry.string("name", required=True)
        if name in names:
            raise entry.error("name", f"two identity providers are named {name!r}")
        names.add(name)
        issuer = entry.string("issuer", required=True)
        audiences = entry.string_list("audiences")
        jwks = entry.path("jwks_file")
        pem = entry.path("public_key_file")
        kid = entry.optional_string("kid")
        saml = entry.path("saml_certificate_file")
        try:
            if jwks is not None and pem is not None:
                raise entry.error("jwks_file", "set only one of jwks_file or public_key_file")
            if jwks is None and pem is None and saml is None:
                raise entry.error(
                    "jwks_file",
                    "set jwks_file or public_key_file (JWTs), saml_certificate_file (SAML "
                    "assertions), or both",
                )
            certificates = () if saml is None else load_saml_certificates(name, saml.read_bytes())
            jwt_idp: TrustedIdp | None = None
            if jwks is not None:
                jwt_idp = TrustedIdp.from_jwks(
                    name, issuer, jwks.read_text(encoding="utf-8"), audiences
                )
            elif pem is not None:
                jwt_idp = TrustedIdp.from_pem(name, issuer, pem.read_bytes(), audiences, kid)
            idp = (
                TrustedIdp(name, issuer, (), tuple(audiences), saml_certificates=certificates)
                if jwt_idp is None
                else replace(jwt_idp, saml_certificates=certificates)
            )
        except (ValueError, OSError) as exc:
            raise entry.error("issuer", f"identity provider {name!r}: {exc}") from None
        entry.finish()
        idps.append(idp)
    try:
        return TrustList(idps)
    except ValueError as exc:
        raise sub.error("identity_providers", str(exc)) from None


@dataclass
class PrincipalResolver:
    """Validates tokens and issues user certificates for one connector."""

    config: PrincipalPropagationConfig
    cache: UserCertificateCache
    #: Identity provider names this connector does not trust, per subaccount.
    untrusted: Mapping[str, frozenset[str]] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    _trust: dict[str, TrustList] = field(default_factory=dict)
    #: Issuers of IdPs this connector refused, per subaccount: a gateway that renames such an
    #: IdP in a later trust list must not make its tokens acceptable.
    _untrusted_issuers: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        config: PrincipalPropagationConfig,
        *,
        source: str,
        untrusted: Mapping[str, frozenset[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PrincipalResolver:
        """Load the CA (an unusable one is a ConfigError naming the file and the problem)."""
        try:
            authority = UserCertificateAuthority.load(
                config.ca_cert, config.ca_key, passphrase=config.ca_key_passphrase
            )
        except UnusableCAError as exc:
            raise UnusableCAError(source, f"principal_propagation: {exc}") from None
        cache = UserCertificateCache(
            authority,
            validity=datetime.timedelta(seconds=config.certificate_validity),
            clock=lambda: datetime.datetime.fromtimestamp(clock(), datetime.UTC),
        )
        return cls(config, cache, dict(untrusted or {}), clock)

    def update_trust(self, subaccount: str, trust: TrustList) -> None:
        """The gateway's trust list for ``subaccount``, with this connector's untrusted IdPs
        marked so (their tokens are refused with IDP_NOT_TRUSTED).

        ``untrusted_identity_providers`` may name an IdP by its name or by its issuer. The
        gateway chooses the names, so an issuer once refused stays refused for this process
        whatever the IdP is called in a later list."""
        untrusted = self.untrusted.get(subaccount, frozenset())
        issuers = self._untrusted_issuers.setdefault(subaccount, set())
        issuers.update(idp.issuer for idp in trust if idp.name in untrusted)
        self._trust[subaccount] = TrustList(
            replace(idp, trusted=False)
            if idp.name in untrusted or idp.issuer in untrusted or idp.issuer in issuers
            else idp
            for idp in trust
        )

    def trust_for(self, subaccount: str) -> TrustList:
        """The trust list in force for ``subaccount`` (empty before the gateway sent one)."""
        return self._trust.get(subaccount, TrustList())

    def resolve(self, session: Session) -> PropagatedUser:
        """The user behind the stream's token, or PrincipalError (audited)."""
        fields = {
            "subaccount": session.subaccount,
            "app": session.app,
            "system": str(session.virtual),
        }
        try:
            user = self._resolve(session)
        except PrincipalError as exc:
            session.audit.denied(
                "principal_propagation", exc.code, **fields, **exc.details, message=exc.message
            )
            raise
        session.audit.allowed(
            "principal_propagation",
            **fields,
            subject=user.subject,
            identity_provider=user.identity_provider,
        )
        return user

    def _resolve(self, session: Session) -> PropagatedUser:
        principal = session.principal
        if not principal:
            raise PrincipalError(
                PrincipalReason.MISSING_TOKEN,
                f"{session.virtual} needs the cloud user's token for principal propagation: "
                "send it as 'SAP-Connectivity-Authentication: Bearer <JWT>' (HTTP), pass "
                "token=... (RFC) or send '<app token>,<JWT>' with SOCKS5 method 0x80 (TCP)",
            )
        scheme, _, token = principal.partition(" ")
        trust = self.trust_for(session.subaccount)
        if scheme.lower() == "saml2.0":
            claims = validate_saml(
                token.strip(),
                trust,
                now=self.clock(),
                leeway=self.config.token_leeway,
                required_audience=self.config.audience,
            )
        else:
            if scheme.lower() != "bearer" or not token:
                raise PrincipalError(
                    PrincipalReason.MALFORMED_TOKEN,
                    "the user's token must be 'Bearer <JWT>' or 'SAML2.0 <base64 assertion>'",
                )
            claims = validate_jwt(
                token.strip(),
                trust,
                now=self.clock(),
                leeway=self.config.token_leeway,
                required_audience=self.config.audience,
            )
        subject = self.config.subject_rules.subject_for(claims)
        idp = trust.get(str(claims.get("iss", "")))
        try:
            certificate = self.cache.get(subject.name)
        except UnusableCAError as exc:  # the CA expired since the connector started
            raise PrincipalError(
                PrincipalReason.CA_UNUSABLE,
                f"the principal propagation CA cannot issue certificates: {exc}; renew it "
                "(backchannel ca init / import) and restart the connector",
            ) from None
        renew_at = certificate.certificate.not_valid_after_utc - self.cache.renew_before
        valid_until = min(float(claims["exp"]) + self.config.token_leeway, renew_at.timestamp())
        return PropagatedUser(subject.rfc4514, idp.name if idp else "", certificate, valid_until)
