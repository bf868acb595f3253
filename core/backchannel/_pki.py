"""A tiny private PKI: a CA, gateway server certificates, client certificates.

For people without their own PKI, for ``backchannel demo`` (throwaway certificates) and for
tests.  Keys are EC P-256, signatures ECDSA with SHA-256.  Private keys are written as
unencrypted PKCS#8 PEM into files created with mode ``0o600``; nothing is ever overwritten.

This module does not import trio (or do any I/O other than reading and writing files).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "TlsMaterial",
    "write_throwaway_tls_material",
]

#: How far ``not_valid_before`` is back-dated, to tolerate clock skew between peers.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


# --------------------------------------------------------------------------- helpers


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _check_valid_days(valid_days: int) -> None:
    if valid_days <= 0:
        raise ValueError(f"valid_days must be positive, got {valid_days}")


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _public_der(key: object) -> bytes | None:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def end_entity_key_usage(*, key_encipherment: bool = False) -> x509.KeyUsage:
    """KeyUsage of a TLS end-entity certificate: digital signatures (and key encipherment,
    for RSA keys used in RSA key exchange)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permission ``mode``, replacing it atomically.

    A reader sees the old content or the new, never a mix; the new file has its final mode
    from the start. The temporary file beside it is created exclusively (no symlink followed)
    and synced before the rename.
    """
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits from ``mode``
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with permission ``mode`` and write ``data`` to it.

    The file is created with its final permissions in one step (no window in which it is
    readable by others) and an existing file is never replaced.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(
            f"refusing to overwrite existing file {path}; remove it or choose another name"
        ) from None
    try:
        if hasattr(os, "fchmod"):  # the umask may have removed bits from ``mode``
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    except BaseException:
        if fd != -1:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _save_pair(
    directory: Path, cert_name: str, cert_data: bytes, key_name: str, key_data: bytes
) -> tuple[Path, Path]:
    """Write a certificate and its key into ``directory``; all or nothing, no overwriting."""
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    cert_path = directory / cert_name
    key_path = directory / key_name
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(
                f"refusing to overwrite existing file {path}; remove it or choose another name"
            )
    _write_new_file(key_path, key_data, _KEY_MODE)
    try:
        _write_new_file(cert_path, cert_data, _CERT_MODE)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return cert_path, key_path


def _validate_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or os.sep in name:
        raise ValueError(f"invalid file name stem {name!r}")


# --------------------------------------------------------------------------- issued certs


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """An end-entity certificate, its private key and the chain up to (and including) the CA."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]

    def certificate_pem(self) -> bytes:
        """The leaf certificate followed by the chain, PEM-encoded."""
        return b"".join(_cert_pem(c) for c in (self.certificate, *self.chain))

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return _key_pem(self.private_key)

    def save(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.pem`` (leaf + chain) and ``<name>.key`` (mode 0o600) into ``directory``.

        The directory is created (mode 0o700) if missing.  Raises :class:`FileExistsError` if
        either file already exists; nothing is written in that case.

        Returns ``(certificate_path, key_path)``.
        """
        _validate_name(name)
        return _save_pair(
            directory, f"{name}.pem", self.certificate_pem(), f"{name}.key", self.private_key_pem()
        )


# --------------------------------------------------------------------------- the CA


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A self-signed certificate authority that can issue server and client certificates."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls, common_name: str = "backchannel CA", *, valid_days: int = 3650
    ) -> CertificateAuthority:
        """Create a new CA with a fresh P-256 key and a self-signed certificate.

        The certificate may sign end-entity certificates only (``path_length=0``).
        """
        _check_valid_days(valid_days)
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate=certificate, private_key=key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA from a PEM certificate and an unencrypted PEM EC private key.

        Raises :class:`ValueError` if either file cannot be parsed, the key is not an EC key,
        the key does not belong to the certificate, or the certificate is not a CA certificate.
        """
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{cert_path}: not a PEM certificate ({exc})") from exc
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except TypeError as exc:
            raise ValueError(f"{key_path}: encrypted private keys are not supported") from exc
        except ValueError as exc:
            raise ValueError(f"{key_path}: not a PEM private key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
        if _public_der(certificate.public_key()) != _public_der(key.public_key()):
            raise ValueError(f"private key {key_path} does not match the certificate {cert_path}")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            raise ValueError(
                f"{cert_path} is not a CA certificate (no BasicConstraints extension)"
            ) from None
        if not constraints.value.ca:
            raise ValueError(f"{cert_path} is not a CA certificate (BasicConstraints ca=False)")
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        except x509.ExtensionNotFound:
            pass
        else:
            if not usage.value.key_cert_sign:
                raise ValueError(
                    f"{cert_path} is not a CA certificate (KeyUsage lacks keyCertSign)"
                )
        return cls(certificate=certificate, private_key=key)

    def save(self, directory: Path, *, name: str = "ca") -> tuple[Path, Path]:
        """Write ``<name>.pem`` (certificate) and ``<name>.key`` (mode 0o600) into ``directory``.

        The directory is created (mode 0o700) if missing.  Raises :class:`FileExistsError` if
        either file already exists; nothing is written in that case.

        Returns ``(certificate_path, key_path)``.
        """
        _validate_name(name)
        return _save_pair(
            directory,
            f"{name}.pem",
            _cert_pem(self.certificate),
            f"{name}.key",
            _key_pem(self.private_key),
        )

    def issue_server_certificate(
        self, hostnames: Sequence[str], *, valid_days: int = 825
    ) -> IssuedCertificate:
        """Issue a TLS server certificate for ``hostnames`` (DNS names and/or IP addresses).

        Entries that parse as IP addresses become IPAddress SANs, all others DNSName SANs.
        The subject CN is the first hostname.
        """
        if isinstance(hostnames, str):
            raise TypeError("hostnames must be a sequence of names, not a single string")
        names = list(dict.fromkeys(h.strip() for h in hostnames))
        if not names or any(not n for n in names):
            raise ValueError("hostnames must contain at least one non-empty name")
        sans: list[x509.GeneralName] = []
        for host in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(
            names[0],
            ExtendedKeyUsageOID.SERVER_AUTH,
            valid_days,
            x509.SubjectAlternativeName(sans),
        )

    def issue_client_certificate(
        self, common_name: str, *, valid_days: int = 365
    ) -> IssuedCertificate:
        """Issue a TLS client certificate (clientAuth) with subject CN ``common_name``."""
        if not common_name:
            raise ValueError("common_name must not be empty")
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, valid_days, None)

    def _issue(
        self,
        common_name: str,
        purpose: x509.ObjectIdentifier,
        valid_days: int,
        san: x509.SubjectAlternativeName | None,
    ) -> IssuedCertificate:
        _check_valid_days(valid_days)
        key = _new_key()
        now = _now()
        # A certificate outliving its issuer is useless; clamp to the CA's lifetime.
        not_after = min(
            now + datetime.timedelta(days=valid_days), self.certificate.not_valid_after_utc
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(end_entity_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        certificate = builder.sign(self.private_key, hashes.SHA256())
        return IssuedCertificate(
            certificate=certificate, private_key=key, chain=(self.certificate,)
        )

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


# --------------------------------------------------------------------------- throwaway set


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """Paths of a CA certificate and a server certificate/key pair signed by it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def write_throwaway_tls_material(
    directory: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1")
) -> TlsMaterial:
    """Create a throwaway CA and a server certificate for ``hostnames`` in ``directory``.

    Writes ``ca.pem``, ``server.pem`` (leaf + CA) and ``server.key`` (mode 0o600).  The CA's
    private key is discarded, so nothing else can ever be issued under it.  Raises
    :class:`FileExistsError` if any of the files already exists.
    """
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    for path in (ca_file, directory / "server.pem", directory / "server.key"):
        if path.exists():
            raise FileExistsError(
                f"refusing to overwrite existing file {path}; remove it or choose another name"
            )
    ca = CertificateAuthority.create("backchannel throwaway CA", valid_days=30)
    server = ca.issue_server_certificate(hostnames, valid_days=30)
    _write_new_file(ca_file, _cert_pem(ca.certificate), _CERT_MODE)
    try:
        cert_file, key_file = server.save(directory, "server")
    except BaseException:
        ca_file.unlink(missing_ok=True)
        raise
    return TlsMaterial(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
