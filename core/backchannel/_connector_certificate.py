"""The connector's side of registration: its key and certificate file, requests, renewal.

The credential is one PEM file holding the certificate and its private key (mode 0600),
replaced atomically, so a crash never leaves a certificate beside the wrong key.
"""

from __future__ import annotations

import datetime
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._connector_identity import (
    ConnectorIdentity,
    describe,
    identity_of,
    registration_path,
    serial_text,
    when,
)
from ._dial import ProxySettings
from ._exceptions import TunnelError
from ._pki import replace_file
from ._transport import GatewayAddress, exchange_text, verifying_client_context

#: Renew when less than this share of a certificate's lifetime is left (unless configured).
RENEW_AT_REMAINING_SHARE = 1 / 3
_FILE_MODE = 0o600


class CredentialError(Exception):
    """The connector's certificate file is missing, unreadable or unusable; says what to do."""


@dataclass(frozen=True, slots=True)
class Credential:
    """A loaded connector certificate (the key stays in the file; TLS loads it from there)."""

    path: Path
    certificate: x509.Certificate
    identity: ConnectorIdentity

    @property
    def lifetime(self) -> datetime.timedelta:
        """From not-before to not-after."""
        return self.certificate.not_valid_after_utc - self.certificate.not_valid_before_utc

    def renewal_due(self, renew_before: datetime.timedelta | None) -> datetime.datetime:
        """When renewal should start: ``renew_before`` ahead of expiry (default: when a
        third of the lifetime is left; at most half the lifetime, so that a short-lived
        certificate is not renewed at every check)."""
        margin = renew_before if renew_before is not None else self.lifetime / 3
        margin = min(margin, self.lifetime / 2)
        return self.certificate.not_valid_after_utc - margin

    def describe(self) -> str:
        """``serial ... (sub/loc, valid until ...)``."""
        return describe(self.certificate)


def register_hint(subaccount: str) -> str:
    """The command that fixes a missing or dead certificate."""
    return (
        f"register with `backchannel register --config <connector.toml> --subaccount {subaccount}`"
        " and a registration token from the gateway operator"
    )


def load_credential(path: Path, expected: ConnectorIdentity) -> Credential:
    """Read and check the certificate file; raise :class:`CredentialError` saying what to do."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(
            f"connector certificate {path} does not exist: {register_hint(expected.subaccount)}"
        ) from None
    except OSError as exc:
        raise CredentialError(f"cannot read connector certificate {path}: {exc.strerror}") from None
    try:
        certificate = x509.load_pem_x509_certificate(data)
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialError(
            f"{path} is not a PEM certificate with its unencrypted private key ({exc}): "
            f"{register_hint(expected.subaccount)}"
        ) from None
    identity = identity_of(certificate)
    if identity != expected:
        raise CredentialError(
            f"{path} holds the certificate of connector {identity or 'unknown'}, but this "
            f"connector is configured as {expected}: {register_hint(expected.subaccount)}"
        )
    return Credential(path, certificate, identity)


def expiry_problem(credential: Credential, now: datetime.datetime) -> str | None:
    """Why the credential cannot authenticate now (expired, not yet valid), or None."""
    certificate = credential.certificate
    if now > certificate.not_valid_after_utc:
        return (
            f"connector certificate {credential.describe()} expired at "
            f"{when(certificate.not_valid_after_utc)}: "
            f"{register_hint(credential.identity.subaccount)}"
        )
    if now < certificate.not_valid_before_utc:
        return (
            f"connector certificate {credential.describe()} is not valid before "
            f"{when(certificate.not_valid_before_utc)}: check this machine's clock"
        )
    return None


def tunnel_ssl_context(ca_file: Path | None, credential: Credential) -> ssl.SSLContext:
    """Verify the gateway (as for token connectors) and present the connector certificate."""
    context = verifying_client_context(ca_file)
    context.load_cert_chain(str(credential.path))
    return context


def new_key_and_request(identity: ConnectorIdentity) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a certificate request for it (PEM).

    The gateway ignores the request's subject: it writes the identity itself.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"connector {identity}")])
        )
        .sign(key, hashes.SHA256())
    )
    return key, request.public_bytes(serialization.Encoding.PEM).decode("ascii")


def accept_issued(
    certificate_pem: str, key: ec.EllipticCurvePrivateKey, identity: ConnectorIdentity
) -> x509.Certificate:
    """Check what the gateway signed: our key, our identity. Raises :class:`CredentialError`."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise CredentialError(
            "the gateway answered with something that is not a certificate"
        ) from None
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise CredentialError("the gateway signed a different key than the one requested")
    if identity_of(certificate) != identity:
        raise CredentialError(
            f"the gateway issued a certificate for {identity_of(certificate)}, not {identity}"
        )
    return certificate


def store_credential(
    path: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> None:
    """Write certificate and key into ``path`` (0600), replacing it atomically."""
    data = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, _FILE_MODE)


async def register(
    address: GatewayAddress,
    identity: ConnectorIdentity,
    token: str,
    *,
    ssl_context: ssl.SSLContext,
    proxy: ProxySettings | None,
    answer_within: float,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Register with the gateway: send a new key's request with the token, get the certificate.

    Raises :class:`TunnelError` (gateway unreachable or it refused; its message says why) or
    :class:`CredentialError` (it answered with something unusable).
    """
    key, request = new_key_and_request(identity)
    message = json.dumps(
        {
            "token": token,
            "csr": request,
            "subaccount": identity.subaccount,
            "location": identity.location,
        }
    )
    answer = await exchange_text(
        address,
        registration_path(address.path),
        message,
        ssl_context=ssl_context,
        proxy=proxy,
        answer_within=answer_within,
    )
    try:
        document = json.loads(answer)
    except ValueError:
        raise CredentialError("the gateway's answer to the registration is not JSON") from None
    if not isinstance(document, dict):
        raise CredentialError("the gateway's answer to the registration is not a JSON object")
    if "error" in document:
        raise TunnelError(f"the gateway refused the registration: {document['error']}")
    certificate = accept_issued(str(document.get("certificate", "")), key, identity)
    return key, certificate


__all__ = [
    "Credential",
    "CredentialError",
    "accept_issued",
    "expiry_problem",
    "load_credential",
    "new_key_and_request",
    "register",
    "serial_text",
    "store_credential",
    "tunnel_ssl_context",
]
