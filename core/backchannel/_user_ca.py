"""Short-lived user certificates for principal propagation.

Once the connector has mapped a cloud user to a subject DN, it issues that user an X.509
certificate from a local CA and presents it to the backend: to HTTPS backends as the TLS
client certificate (or in the ``SSL_CLIENT_CERT`` header), to RFC backends as the
``x509cert`` logon parameter (base64 DER).  The backend trusts the CA and maps the subject
to one of its own users.

* :class:`UserCertificateAuthority` loads (and checks) the CA, or imports it from PKCS#12.
* :meth:`UserCertificateAuthority.issue` makes one certificate with a fresh key.
* :class:`UserCertificateCache` keeps one certificate per subject until it nears expiry.

Issued private keys exist only in memory: nothing here writes them anywhere except, via
:meth:`UserCertificate.load_into`, momentarily into an anonymous memory file (or, where
there is none, a private temporary file) for OpenSSL, encrypted with a one-time password.

Issuing an EC P-256 certificate takes well under a millisecond; an RSA 2048 key takes tens
of milliseconds to generate, so with ``KeyType.RSA_2048`` call from a worker thread
(``trio.to_thread.run_sync``) rather than on the event loop.

This module does not import trio and does no I/O beyond reading and writing files.
"""

from __future__ import annotations

import base64
import datetime
import enum
import os
import secrets
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from ._configutil import Secret
from ._exceptions import ConfigError
from ._pki import CLOCK_SKEW, CertificateAuthority, _save_pair, end_entity_key_usage

__all__ = [
    "KeyType",
    "UnusableCAError",
    "UserCertificate",
    "UserCertificateAuthority",
    "UserCertificateCache",
    "default_renew_before",
    "describe_key",
]

#: The private key types a CA may have (and an issued certificate has).
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_MIN_RSA_BITS = 2048


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class UnusableCAError(ConfigError):
    """The CA certificate or key cannot be used to issue user certificates.

    The message names the file (or other source) and what is wrong with it.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(source, "", problem)


class KeyType(enum.Enum):
    """The kind of key generated for each issued certificate."""

    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"


# --------------------------------------------------------------------------- issued


@dataclass(frozen=True, slots=True)
class UserCertificate:
    """A user certificate, its private key, and the CA chain above it (CA first)."""

    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]

    @property
    def subject(self) -> x509.Name:
        """The user's subject DN."""
        return self.certificate.subject

    @property
    def not_valid_after(self) -> datetime.datetime:
        """The end of validity (UTC, timezone-aware)."""
        return self.certificate.not_valid_after_utc

    def remaining(self, now: datetime.datetime) -> datetime.timedelta:
        """How much validity is left at ``now`` (negative once expired)."""
        return self.certificate.not_valid_after_utc - now

    def der(self) -> bytes:
        """The certificate alone, DER-encoded."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def der_base64(self) -> str:
        """Base64 of the DER certificate, one line: the RFC ``x509cert`` logon parameter.

        The same form (PEM without its BEGIN/END lines and line breaks) suits an
        ``SSL_CLIENT_CERT`` header; check what the backend's front end expects there.
        """
        return base64.b64encode(self.der()).decode("ascii")

    def pem(self) -> str:
        """The certificate alone, PEM-encoded."""
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def chain_pem(self) -> str:
        """The certificate followed by the CA chain, PEM-encoded (what a TLS client sends)."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in (self.certificate, *self.chain)
        )

    def load_into(self, context: ssl.SSLContext, *, directory: Path | None = None) -> None:
        """Make ``context`` present this certificate (with its chain) as its own.

        Python's :meth:`ssl.SSLContext.load_cert_chain` reads only from a path.  On Linux
        the PEM goes into an anonymous memory file (``memfd_create``) that is read through
        ``/proc/self/fd`` and closed at once; it never has a name in any file system.
        Elsewhere, or when ``directory`` is given, it goes into a temporary file created
        there with mode 0o600 and deleted right after loading.  Either way the private key
        in that PEM is encrypted with a random one-time password that exists only in this
        call, so even a file left behind by a crash reveals nothing.

        Use one context per certificate (a context holds one client certificate); the
        context's other settings (trust, versions, ciphers) are left alone.
        """
        password = secrets.token_bytes(32)
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        data = self.chain_pem().encode("ascii") + key_pem
        if directory is None and hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            fd = os.memfd_create("backchannel-user-cert", os.MFD_CLOEXEC)
            try:
                os.write(fd, data)
                context.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
            finally:
                os.close(fd)
            return
        fd, name = tempfile.mkstemp(prefix=".user-cert-", suffix=".pem", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp creates it with mode 0o600
                handle.write(data)
            context.load_cert_chain(name, password=password)
        finally:
            os.unlink(name)


# --------------------------------------------------------------------------- the CA


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def _spki(key: object) -> bytes | None:
    if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return None


def _usable_key(key: object, source: str) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise UnusableCAError(
                source, f"RSA key of {key.key_size} bits is too weak (need {_MIN_RSA_BITS})"
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    raise UnusableCAError(
        source, f"unsupported key type {type(key).__name__} (use an EC or RSA key)"
    )


def _check_ca_certificate(
    certificate: x509.Certificate, source: str, now: datetime.datetime
) -> None:
    extensions = certificate.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise UnusableCAError(
            source, "not a CA certificate (no BasicConstraints extension)"
        ) from None
    if not constraints.ca:
        raise UnusableCAError(source, "not a CA certificate (BasicConstraints CA=false)")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if not usage.key_cert_sign:
            raise UnusableCAError(
                source, "the CA may not sign certificates (KeyUsage lacks keyCertSign)"
            )
    try:
        purposes = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        # OpenSSL also applies a CA's ExtendedKeyUsage to what it issues.
        allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if not allowed & set(purposes):
            raise UnusableCAError(
                source, "the CA's ExtendedKeyUsage does not allow clientAuth certificates"
            )
    if now < certificate.not_valid_before_utc:
        raise UnusableCAError(
            source, f"not valid before {_timestamp(certificate.not_valid_before_utc)}"
        )
    if now >= certificate.not_valid_after_utc:
        raise UnusableCAError(source, f"expired on {_timestamp(certificate.not_valid_after_utc)}")


def _load_private_key(data: bytes, source: str, passphrase: Secret | None) -> PrivateKey:
    password = passphrase.reveal().encode() if passphrase is not None else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if passphrase is None:
            problem = "the private key is encrypted; give its passphrase"
        else:
            problem = "a passphrase was given but the private key is not encrypted"
        raise UnusableCAError(source, problem) from None
    except ValueError:
        if passphrase is not None and b"ENCRYPTED" in data:
            problem = "cannot decrypt the private key (wrong passphrase?)"
        else:
            problem = "not a PEM private key"
        raise UnusableCAError(source, problem) from None
    return _usable_key(key, source)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UnusableCAError(str(path), f"cannot read: {exc.strerror or exc}") from None


class UserCertificateAuthority:
    """The CA that issues user certificates; checked to be usable on construction.

    ``chain`` holds the CA's own issuers (if it is a subordinate CA), sent along with each
    user certificate.  Raises :class:`UnusableCAError` when the certificate is not a CA
    certificate, may not sign certificates, is expired or not yet valid, or the key is of
    an unsupported type or does not belong to the certificate.
    """

    __slots__ = ("certificate", "chain", "private_key", "source")

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: PrivateKey,
        *,
        chain: Sequence[x509.Certificate] = (),
        now: datetime.datetime | None = None,
        source: str = "CA certificate",
        key_source: str | None = None,
    ) -> None:
        key_source = key_source or source
        key = _usable_key(private_key, key_source)
        _check_ca_certificate(certificate, source, now or _utc_now())
        if _spki(certificate.public_key()) != _spki(key.public_key()):
            raise UnusableCAError(
                key_source, f"the private key does not belong to the certificate in {source}"
            )
        self.certificate = certificate
        self.private_key: PrivateKey = key
        self.chain = tuple(chain)
        #: Where the CA came from, for error messages.
        self.source = source

    def __repr__(self) -> str:
        return f"UserCertificateAuthority({self.certificate.subject.rfc4514_string()!r})"

    @classmethod
    def create(
        cls, common_name: str = "backchannel principal propagation CA", *, valid_days: int = 3650
    ) -> UserCertificateAuthority:
        """A new self-signed CA with an EC P-256 key (it signs end-entity certificates only)."""
        ca = CertificateAuthority.create(common_name, valid_days=valid_days)
        return cls(ca.certificate, ca.private_key, source=f"new CA {common_name!r}")

    @classmethod
    def load(
        cls,
        cert_path: Path,
        key_path: Path,
        *,
        passphrase: Secret | None = None,
        now: datetime.datetime | None = None,
    ) -> UserCertificateAuthority:
        """Load the CA from PEM files.

        ``cert_path`` holds the CA certificate, optionally followed by its own issuers;
        ``key_path`` its private key (PKCS#8, PKCS#1 or SEC1 PEM), encrypted with
        ``passphrase`` if given.
        """
        cert_source, key_source = str(cert_path), str(key_path)
        try:
            certificates = x509.load_pem_x509_certificates(_read(cert_path))
        except ValueError:
            raise UnusableCAError(cert_source, "not a PEM certificate") from None
        key = _load_private_key(_read(key_path), key_source, passphrase)
        return cls(
            certificates[0],
            key,
            chain=certificates[1:],
            now=now,
            source=cert_source,
            key_source=key_source,
        )

    @classmethod
    def from_pkcs12(
        cls,
        data: bytes,
        password: bytes | None,
        *,
        source: str = "PKCS#12 data",
        now: datetime.datetime | None = None,
    ) -> UserCertificateAuthority:
        """Import the CA's key and certificate (and any issuers above it) from PKCS#12."""
        try:
            key, certificate, others = pkcs12.load_key_and_certificates(data, password)
        except ValueError:
            raise UnusableCAError(
                source, "cannot read the PKCS#12 file (wrong password, or not PKCS#12)"
            ) from None
        if certificate is None or key is None:
            raise UnusableCAError(source, "the PKCS#12 file lacks the certificate or the key")
        chain = [c for c in others if c != certificate]
        return cls(certificate, _usable_key(key, source), chain=chain, now=now, source=source)

    def save(self, directory: Path, *, passphrase: Secret | None = None) -> tuple[Path, Path]:
        """Write ``ca.pem`` (certificate and chain) and ``ca.key`` (mode 0o600).

        With ``passphrase`` the key is encrypted.  The directory is created (mode 0o700) if
        missing; existing files are never replaced (:class:`FileExistsError`).
        """
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
        if passphrase is not None:
            if not passphrase.reveal():
                raise ValueError("the key passphrase must not be empty")
            encryption = serialization.BestAvailableEncryption(passphrase.reveal().encode())
        certificates = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.chain)
        )
        key = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        return _save_pair(directory, "ca.pem", certificates, "ca.key", key)

    def issue(
        self,
        subject: x509.Name,
        *,
        now: datetime.datetime,
        validity: datetime.timedelta,
        key_type: KeyType = KeyType.EC_P256,
    ) -> UserCertificate:
        """Issue a clientAuth certificate for ``subject`` with a freshly generated key.

        Valid from ``now`` minus five minutes (clock skew between us and the backend) to
        ``now + validity``, but never beyond the CA's own end of validity.  Raises
        :class:`UnusableCAError` if the CA is not valid at ``now``.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if validity <= datetime.timedelta(0):
            raise ValueError(f"validity must be positive, got {validity}")
        if len(subject) == 0:
            raise ValueError("the subject DN must not be empty")
        ca = self.certificate
        if not ca.not_valid_before_utc <= now < ca.not_valid_after_utc:
            raise UnusableCAError(
                self.source,
                f"the CA is valid from {_timestamp(ca.not_valid_before_utc)} "
                f"to {_timestamp(ca.not_valid_after_utc)}, not at {_timestamp(now)}",
            )
        key: PrivateKey
        if key_type is KeyType.RSA_2048:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())  # 159 random bits
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + validity, ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                end_entity_key_usage(key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._authority_key_identifier(), critical=False)
            .sign(self.private_key, _signature_hash(self.private_key))
        )
        return UserCertificate(certificate=certificate, private_key=key, chain=(ca, *self.chain))

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def describe_key(certificate: x509.Certificate) -> str:
    """``EC secp256r1`` or ``RSA 2048``: the kind of key a certificate holds."""
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


# --------------------------------------------------------------------------- the cache


def default_renew_before(validity: datetime.timedelta) -> datetime.timedelta:
    """A fifth of ``validity``, but at least a minute (or half of it, if that is shorter)."""
    minute = datetime.timedelta(minutes=1)
    return max(validity / 5, min(minute, validity / 2))


class UserCertificateCache:
    """One certificate per subject, reused until less than ``renew_before`` of it is left.

    Bounded to ``max_entries`` subjects, least recently used first out.  ``clock`` returns
    the current time (timezone-aware); tests inject their own.  The cache is meant for one
    trio thread: no method awaits, so calls never interleave, but it takes no lock either.
    Keys stay in this process's memory; nothing is written to disk.
    """

    def __init__(
        self,
        authority: UserCertificateAuthority,
        *,
        validity: datetime.timedelta,
        renew_before: datetime.timedelta | None = None,
        max_entries: int = 10_000,
        key_type: KeyType = KeyType.EC_P256,
        clock: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:
        if validity <= datetime.timedelta(0):
            raise ValueError(f"validity must be positive, got {validity}")
        if renew_before is None:
            renew_before = default_renew_before(validity)
        if not datetime.timedelta(0) <= renew_before < validity:
            raise ValueError(
                f"renew_before must be at least 0 and less than validity ({validity}), "
                f"got {renew_before}"
            )
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.authority = authority
        self.validity = validity
        self.renew_before = renew_before
        self.max_entries = max_entries
        self.key_type = key_type
        self._clock = clock
        # Keyed by the DER of the subject: exact, whatever string types the DN uses.
        self._entries: OrderedDict[bytes, UserCertificate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, subject: x509.Name) -> UserCertificate:
        """The cached certificate for ``subject``, or a newly issued one."""
        now = self._clock()
        key = subject.public_bytes()
        cached = self._entries.get(key)
        if (
            cached is not None
            and cached.certificate.not_valid_before_utc <= now
            and cached.remaining(now) > self.renew_before
        ):
            self._entries.move_to_end(key)
            return cached
        issued = self.authority.issue(
            subject, now=now, validity=self.validity, key_type=self.key_type
        )
        self._entries[key] = issued
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return issued

    def discard(self, subject: x509.Name) -> None:
        """Forget ``subject``'s certificate (the next :meth:`get` issues a new one)."""
        self._entries.pop(subject.public_bytes(), None)

    def clear(self) -> None:
        """Forget every certificate."""
        self._entries.clear()
