"""The gateway's connector authority: registration, renewal, certificate checks, revocation.

A connector registers once with a registration token (:mod:`._registration_token`) and a
certificate request; the gateway signs a client certificate naming (subaccount, location)
(:mod:`._connector_identity`) with its connector CA. From then on the connector's tunnel is
mutually authenticated TLS: the TLS layer proves the connector holds the key of a certificate
this CA signed; :meth:`ConnectorAuthority.authenticate` then checks its validity period and the
revocation list itself, so that a refusal can name the certificate instead of ending in a bare
TLS alert.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._configutil import TableReader
from ._connector_identity import ConnectorIdentity, describe, identity_of, serial_text, when
from ._exceptions import ConfigError, TunnelError
from ._pki import CLOCK_SKEW, CertificateAuthority, end_entity_key_usage
from ._proto._errors import ResetCode
from ._registration_state import RegistrationState, RevocationListError
from ._registration_token import RegistrationError, mint_token, verify_token

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the TLS layer checks the chain and key possession,
#: the gateway checks the validity period itself (to name the certificate when refusing it).
_NO_CHECK_TIME = 0x200000
_MAX_CSR_BYTES = 16 * 1024
#: A certificate may be renewed once less than this share of its lifetime is left (the
#: connector renews at a third by default, at half at the most).
RENEWAL_WINDOW = 0.6

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    """The wall clock, timezone-aware UTC."""
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """``[registration]`` in gateway.toml: connectors authenticate with certificates."""

    ca_cert: Path
    ca_key: Path
    state_dir: Path
    certificate_days: int = 30
    revocation_check_interval: float = 10.0

    @classmethod
    def read(cls, reader: TableReader) -> RegistrationConfig:
        """Parse the table (paths relative to the config file)."""
        ca_cert = reader.path("ca_cert", required=True)
        ca_key = reader.path("ca_key", required=True)
        state_dir = reader.path("state_dir", required=True, must_exist=False)
        assert ca_cert is not None
        assert ca_key is not None
        assert state_dir is not None
        config = cls(
            ca_cert,
            ca_key,
            state_dir,
            reader.integer("certificate_days", 30, minimum=1, maximum=825),
            reader.number("revocation_check_interval", 10.0, minimum=0.05, maximum=3600),
        )
        reader.finish()
        return config


class ConnectorAuthority:
    """Signs and checks connector certificates for one gateway."""

    def __init__(
        self, config: RegistrationConfig, *, source: str = "<config>", clock: Clock | None = None
    ) -> None:
        self.config = config
        try:
            self.ca = CertificateAuthority.load(config.ca_cert, config.ca_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                source,
                "registration.ca_key",
                f"the connector CA is unusable: {exc} (create one with "
                "`backchannel pki init-ca --dir <folder> --name 'backchannel connector CA'`)",
            ) from None
        self.state = RegistrationState(config.state_dir)
        self._clock = clock or utc_now

    def now(self) -> datetime.datetime:
        """The authority's clock (replaceable in tests)."""
        return self._clock()

    def configure_server_context(self, context: ssl.SSLContext) -> None:
        """Ask tunnel clients for a certificate (optional: token connectors have none) and
        verify one that is presented against the connector CA."""
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(self.config.ca_cert))
        context.verify_flags |= _NO_CHECK_TIME

    # ------------------------------------------------------------------ tokens

    def mint_token(self, identity: ConnectorIdentity, lifetime: datetime.timedelta) -> str:
        """A one-time registration token for ``identity``."""
        self._not_after()  # no token that could never be honoured
        return mint_token(self.ca.private_key, identity, lifetime, now=self.now())

    def _not_after(self) -> datetime.datetime:
        """The expiry of a certificate signed now; RegistrationError if the CA cannot sign."""
        now = self.now()
        ca_expiry = self.ca.certificate.not_valid_after_utc
        if ca_expiry <= now + CLOCK_SKEW:
            raise RegistrationError(
                f"the gateway's connector CA expired at {when(ca_expiry)}: the operator must "
                "create a new connector CA (ca_cert/ca_key in [registration])"
            )
        return min(now + datetime.timedelta(days=self.config.certificate_days), ca_expiry)

    # ------------------------------------------------------------------ signing

    def register(
        self, token: str, csr_pem: str, *, wanted: ConnectorIdentity | None = None
    ) -> x509.Certificate:
        """Check ``token`` (signature, expiry, not used before) and sign the request's key
        for the identity the token names (which must be ``wanted``, the identity the
        connector is configured with, when given). Raises :class:`RegistrationError`."""
        public_key = ca_public_key(self.ca)
        claims = verify_token(token, public_key, now=self.now())
        if wanted is not None and wanted != claims.identity:
            raise RegistrationError(
                f"this registration token is for connector {claims.identity}, but the connector "
                f"is configured as {wanted}: fix subaccount/location in connector.toml or ask "
                "for a token for it"
            )
        key = _requested_key(csr_pem)
        self._not_after()  # a CA that cannot sign must not spend the token
        if not self.state.spend_token(claims.token_id, claims.expires, now=self.now()):
            raise RegistrationError(
                f"this registration token for {claims.identity} was already used: registration "
                "tokens are single-use, ask the gateway operator for a new one"
            )
        return self._sign(claims.identity, key, reason="registration")

    def renew(
        self, identity: ConnectorIdentity, csr_pem: str, current: x509.Certificate
    ) -> x509.Certificate:
        """Sign a new key for a connector authenticated with ``current``: refused when
        ``current`` (or one it renewed) is revoked or expired, or has more than
        :data:`RENEWAL_WINDOW` of its lifetime left (no renewal storms that outrun
        revocation)."""
        problem = self.refusal(current)
        if problem is not None:
            raise RegistrationError(problem)
        lifetime = current.not_valid_after_utc - current.not_valid_before_utc
        left = current.not_valid_after_utc - self.now()
        if left > lifetime * RENEWAL_WINDOW:
            raise RegistrationError(
                f"connector certificate {describe(current)} is renewed only in the last "
                f"{RENEWAL_WINDOW:.0%} of its lifetime"
            )
        key = _requested_key(csr_pem)
        return self._sign(identity, key, reason="renewal", previous=serial_text(current))

    def _sign(
        self,
        identity: ConnectorIdentity,
        key: CertificatePublicKey,
        *,
        reason: str,
        previous: str | None = None,
    ) -> x509.Certificate:
        now = self.now()
        not_after = self._not_after()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "backchannel connectors"),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"connector {identity}"),
                    ]
                )
            )
            .issuer_name(self.ca.certificate.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(end_entity_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key(self.ca)),
                critical=False,
            )
            .sign(self.ca.private_key, hashes.SHA256())
        )
        self.state.record_issued(certificate, reason=reason, now=now, previous=previous)
        return certificate

    # ------------------------------------------------------------------ checking

    def authenticate(self, certificate_der: bytes) -> tuple[ConnectorIdentity, x509.Certificate]:
        """The identity of a tunnel client's certificate (its chain was verified by TLS).

        Raises :class:`TunnelError` (UNAUTHENTICATED) naming the certificate when it is not a
        connector certificate, not valid yet, expired or revoked.
        """
        certificate = x509.load_der_x509_certificate(certificate_der)
        identity = identity_of(certificate)
        if identity is None:
            raise TunnelError(
                f"the client certificate {certificate.subject.rfc4514_string()!r} (serial "
                f"{serial_text(certificate)}) is not a backchannel connector certificate",
                ResetCode.UNAUTHENTICATED,
            )
        problem = self.refusal(certificate)
        if problem is not None:
            raise TunnelError(problem, ResetCode.UNAUTHENTICATED)
        return identity, certificate

    def refusal(self, certificate: x509.Certificate) -> str | None:
        """Why ``certificate`` may not (or no longer) hold a tunnel, or None if it may."""
        now = self.now()
        name = f"connector certificate {describe(certificate)}"
        try:
            revoked = self.state.revoked()
        except RevocationListError as exc:
            return f"{name} cannot be checked: {exc}; fix or remove the file"
        for serial in self.state.lineage(serial_text(certificate)):
            revocation = revoked.get(serial)
            if revocation is None:
                continue
            which = "" if serial == serial_text(certificate) else f" (it renewed serial {serial})"
            return (
                f"{name} was revoked{which} at {when(revocation.revoked_at)} "
                f"({revocation.reason}): register the connector again with a new registration "
                "token"
            )
        if now > certificate.not_valid_after_utc:
            return (
                f"{name} expired at {when(certificate.not_valid_after_utc)}: register the "
                "connector again with a new registration token"
            )
        if now < certificate.not_valid_before_utc:
            return (
                f"{name} is not valid before {when(certificate.not_valid_before_utc)}: check "
                "the clocks of connector and gateway"
            )
        return None


CertificatePublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def ca_public_key(ca: CertificateAuthority) -> ec.EllipticCurvePublicKey:
    """The connector CA's public key (always EC: see :meth:`CertificateAuthority.load`)."""
    return ca.private_key.public_key()


def _requested_key(csr_pem: str) -> CertificatePublicKey:
    """The public key of a certificate request whose self-signature verifies."""
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise RegistrationError(f"the certificate request is larger than {_MAX_CSR_BYTES} bytes")
    try:
        request = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise RegistrationError(
            "the certificate request is not a PEM certificate request"
        ) from None
    if not request.is_signature_valid:
        raise RegistrationError(
            "the certificate request's signature does not verify (proof of key possession)"
        )
    key = request.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise RegistrationError(
        "the certificate request's key is not accepted: use EC P-256/P-384, RSA of 2048 bits "
        "or more, or Ed25519"
    )
