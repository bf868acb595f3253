"""Tests for backchannel._user_ca: issuing user certificates, refusing unusable CAs, PKCS#12
import, the per-subject cache, and a real mutual-TLS handshake on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import ssl
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backchannel import ConfigError, Secret
from backchannel._pki import write_throwaway_tls_material
from backchannel._user_ca import (
    KeyType,
    UnusableCAError,
    UserCertificate,
    UserCertificateAuthority,
    UserCertificateCache,
    default_renew_before,
)

NOW = datetime.datetime(2026, 11, 3, 12, 0, tzinfo=datetime.UTC)
ALICE = x509.Name.from_rfc4514_string("CN=alice,O=Example")
BOB = x509.Name.from_rfc4514_string("CN=bob,O=Example")
PASSPHRASE = "ca-key-passphrase-for-tests-7d2e"
MINUTE = datetime.timedelta(minutes=1)
CA_CONSTRAINTS = x509.BasicConstraints(ca=True, path_length=0)
ROOT_CONSTRAINTS = x509.BasicConstraints(ca=True, path_length=1)


# --------------------------------------------------------------------------- helpers


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca_certificate(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    name: str = "Test User CA",
    basic_constraints: x509.BasicConstraints | None = CA_CONSTRAINTS,
    key_usage: x509.KeyUsage | None = None,
    purposes: list[x509.ObjectIdentifier] | None = None,
    not_before: datetime.datetime = NOW - datetime.timedelta(days=1),
    not_after: datetime.datetime = NOW + datetime.timedelta(days=365),
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A CA-like certificate with exactly the extensions asked for (self-signed by default)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if basic_constraints is not None:
        builder = builder.add_extension(basic_constraints, critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if purposes is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def make_root_and_subordinate(
    curve: ec.EllipticCurve,
) -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A root CA and a subordinate CA (with a ``curve`` key) under it: (root, sub, sub's key)."""
    usage = _key_usage(cert_sign=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_ca_certificate(
        root_key, name="Root", basic_constraints=ROOT_CONSTRAINTS, key_usage=usage
    )
    sub_key = ec.generate_private_key(curve)
    sub = make_ca_certificate(sub_key, name="Sub", key_usage=usage, issuer=(root, root_key))
    return root, sub, sub_key


def write_pem(
    directory: Path,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    passphrase: str | None = None,
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def ca_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def authority(ca_key: ec.EllipticCurvePrivateKey) -> UserCertificateAuthority:
    return UserCertificateAuthority(
        make_ca_certificate(ca_key, key_usage=_key_usage(cert_sign=True)), ca_key, now=NOW
    )


def verify_chain(
    issued: UserCertificate, root: x509.Certificate, at: datetime.datetime = NOW
) -> list[x509.Certificate]:
    """Path validation with cryptography (a client verifier wants a SAN; ours has none)."""
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(at)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    return verifier.verify(issued.certificate, list(issued.chain)).chain


# --------------------------------------------------------------------------- issuing


def test_issued_certificate_has_the_promised_contents(
    authority: UserCertificateAuthority,
) -> None:
    issued = authority.issue(ALICE, now=NOW, validity=10 * MINUTE)
    cert = issued.certificate
    assert cert.subject == ALICE
    assert issued.subject.rfc4514_string() == "CN=alice,O=Example"
    assert cert.issuer == authority.certificate.subject
    assert cert.not_valid_before_utc == NOW - 5 * MINUTE
    assert cert.not_valid_after_utc == NOW + 10 * MINUTE == issued.not_valid_after
    assert issued.remaining(NOW + 4 * MINUTE) == 6 * MINUTE
    assert 0 < cert.serial_number < 2**159
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert isinstance(issued.private_key, ec.EllipticCurvePrivateKey)
    assert issued.private_key.public_key() == public_key

    extensions = cert.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    purposes = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.value.digest
    assert len(extensions) == 5

    assert issued.chain == (authority.certificate,)
    assert verify_chain(issued, authority.certificate) == [cert, authority.certificate]
    assert "private_key" not in repr(issued)


def test_rsa_keys_may_also_encipher(authority: UserCertificateAuthority) -> None:
    issued = authority.issue(ALICE, now=NOW, validity=MINUTE, key_type=KeyType.RSA_2048)
    assert isinstance(issued.private_key, rsa.RSAPrivateKey)
    assert issued.private_key.key_size == 2048
    usage = issued.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment
    verify_chain(issued, authority.certificate)


def test_every_certificate_gets_its_own_key_and_serial(
    authority: UserCertificateAuthority,
) -> None:
    issued = [authority.issue(ALICE, now=NOW, validity=MINUTE) for _ in range(20)]
    assert len({i.certificate.serial_number for i in issued}) == 20
    assert len({i.der() for i in issued}) == 20
    assert len({i.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) for i in issued}) == 20  # fmt: skip


def test_encodings(authority: UserCertificateAuthority) -> None:
    issued = authority.issue(ALICE, now=NOW, validity=MINUTE)
    text = issued.der_base64()
    assert "\n" not in text
    assert x509.load_der_x509_certificate(base64.b64decode(text)) == issued.certificate
    assert x509.load_pem_x509_certificate(issued.pem().encode()) == issued.certificate
    chain = x509.load_pem_x509_certificates(issued.chain_pem().encode())
    assert chain == [issued.certificate, authority.certificate]


def test_openssl_accepts_the_chain_for_client_authentication(
    authority: UserCertificateAuthority, tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    now = datetime.datetime.now(datetime.UTC)
    ca = UserCertificateAuthority.create("openssl check CA", valid_days=1)
    issued = ca.issue(ALICE, now=now, validity=10 * MINUTE)
    (tmp_path / "ca.pem").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "user.pem").write_text(issued.pem())
    argv = [openssl, "verify", "-purpose", "sslclient", "-CAfile", "ca.pem", "user.pem"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "user.pem: OK" in result.stdout
    # And a certificate from another CA is not accepted: the check above can fail.
    (tmp_path / "other.pem").write_text(authority.issue(ALICE, now=now, validity=MINUTE).pem())
    argv[-1] = "other.pem"
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode != 0


def test_validity_never_outlasts_the_ca(ca_key: ec.EllipticCurvePrivateKey) -> None:
    ends = NOW + 30 * MINUTE
    ca = UserCertificateAuthority(make_ca_certificate(ca_key, not_after=ends), ca_key, now=NOW)
    issued = ca.issue(ALICE, now=NOW, validity=datetime.timedelta(hours=8))
    assert issued.not_valid_after == ends


def test_a_ca_that_expired_since_loading_issues_nothing(
    ca_key: ec.EllipticCurvePrivateKey,
) -> None:
    ends = NOW + MINUTE
    ca = UserCertificateAuthority(
        make_ca_certificate(ca_key, not_after=ends), ca_key, now=NOW, source="ca.pem"
    )
    with pytest.raises(UnusableCAError, match=r"^ca\.pem: the CA is valid from .* not at"):
        ca.issue(ALICE, now=ends, validity=MINUTE)


@pytest.mark.parametrize(
    ("subject", "now", "validity", "problem"),
    [
        (ALICE, NOW.replace(tzinfo=None), MINUTE, "timezone-aware"),
        (ALICE, NOW, datetime.timedelta(0), "validity must be positive"),
        (x509.Name([]), NOW, MINUTE, "subject DN must not be empty"),
    ],
)
def test_issue_refuses_bad_arguments(
    authority: UserCertificateAuthority,
    subject: x509.Name,
    now: datetime.datetime,
    validity: datetime.timedelta,
    problem: str,
) -> None:
    with pytest.raises(ValueError, match=problem):
        authority.issue(subject, now=now, validity=validity)


def test_a_subordinate_ca_sends_its_issuers_along(tmp_path: Path) -> None:
    root, sub, sub_key = make_root_and_subordinate(ec.SECP384R1())
    cert_path, key_path = write_pem(tmp_path, sub, sub_key)
    with cert_path.open("ab") as handle:
        handle.write(root.public_bytes(serialization.Encoding.PEM))

    ca = UserCertificateAuthority.load(cert_path, key_path, now=NOW)
    assert ca.chain == (root,)
    issued = ca.issue(ALICE, now=NOW, validity=MINUTE)
    assert issued.chain == (sub, root)
    assert isinstance(issued.certificate.signature_hash_algorithm, hashes.SHA384)
    assert verify_chain(issued, root) == [issued.certificate, sub, root]


# --------------------------------------------------------------------------- loading


def test_load_and_save_round_trip_with_a_passphrase(
    authority: UserCertificateAuthority, tmp_path: Path
) -> None:
    secret = Secret(PASSPHRASE, "test")
    cert_path, key_path = authority.save(tmp_path / "ca", passphrase=secret)
    assert (cert_path.name, key_path.name) == ("ca.pem", "ca.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert b"ENCRYPTED PRIVATE KEY" in key_path.read_bytes()
    loaded = UserCertificateAuthority.load(cert_path, key_path, passphrase=secret, now=NOW)
    assert loaded.certificate == authority.certificate
    verify_chain(loaded.issue(ALICE, now=NOW, validity=MINUTE), authority.certificate)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        authority.save(tmp_path / "ca")


def test_a_newly_created_ca_is_usable(tmp_path: Path) -> None:
    ca = UserCertificateAuthority.create("Fresh CA", valid_days=2)
    cert_path, key_path = ca.save(tmp_path)
    loaded = UserCertificateAuthority.load(cert_path, key_path)
    assert loaded.certificate.subject.rfc4514_string() == "CN=Fresh CA"
    now = datetime.datetime.now(datetime.UTC)
    verify_chain(loaded.issue(ALICE, now=now, validity=MINUTE), ca.certificate, now)


def _files(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, **options: Any
) -> tuple[Path, Path, str | None]:
    passphrase = options.pop("passphrase", None)
    cert_path, key_path = write_pem(
        tmp_path, make_ca_certificate(key, **options), key, passphrase=passphrase
    )
    return cert_path, key_path, None


def _replace(
    files: tuple[Path, Path, str | None], index: int, data: bytes
) -> tuple[Path, Path, str | None]:
    """``files`` with the certificate (0) or key (1) file's content replaced by ``data``."""
    (files[0] if index == 0 else files[1]).write_bytes(data)
    return files


Builder = Callable[[Path, ec.EllipticCurvePrivateKey], tuple[Path, Path, str | None]]

#: (what is wrong, the file the message names, the problem it states, the files' builder)
CASES: list[tuple[str, str, str, Builder]] = [
    (
        "not a CA",
        "ca.pem",
        r"not a CA certificate \(BasicConstraints CA=false\)",
        lambda d, k: _files(
            d, k, basic_constraints=x509.BasicConstraints(ca=False, path_length=None)
        ),
    ),
    (
        "no BasicConstraints",
        "ca.pem",
        r"not a CA certificate \(no BasicConstraints extension\)",
        lambda d, k: _files(d, k, basic_constraints=None),
    ),
    (
        "no keyCertSign",
        "ca.pem",
        r"may not sign certificates \(KeyUsage lacks keyCertSign\)",
        lambda d, k: _files(d, k, key_usage=_key_usage(cert_sign=False)),
    ),
    (
        "serverAuth only",
        "ca.pem",
        "ExtendedKeyUsage does not allow clientAuth",
        lambda d, k: _files(d, k, purposes=[ExtendedKeyUsageOID.SERVER_AUTH]),
    ),
    (
        "expired",
        "ca.pem",
        "expired on 2026-11-03 11:59:00 UTC",
        lambda d, k: _files(d, k, not_after=NOW - MINUTE),
    ),
    (
        "not yet valid",
        "ca.pem",
        "not valid before 2026-11-04 12:00:00 UTC",
        lambda d, k: _files(d, k, not_before=NOW + datetime.timedelta(days=1)),
    ),
    (
        "key mismatch",
        "ca.key",
        r"the private key does not belong to the certificate in .*ca\.pem",
        lambda d, k: (
            (*write_pem(d, make_ca_certificate(ec.generate_private_key(ec.SECP256R1())), k), None)
        ),
    ),
    (
        "wrong passphrase",
        "ca.key",
        r"cannot decrypt the private key \(wrong passphrase\?\)",
        lambda d, k: (*_files(d, k, passphrase="another passphrase")[:2], PASSPHRASE),
    ),
    (
        "missing passphrase",
        "ca.key",
        "the private key is encrypted; give its passphrase",
        lambda d, k: _files(d, k, passphrase=PASSPHRASE),
    ),
    (
        "needless passphrase",
        "ca.key",
        "a passphrase was given but the private key is not encrypted",
        lambda d, k: (*_files(d, k)[:2], PASSPHRASE),
    ),
    (
        "weak RSA key",
        "ca.key",
        "RSA key of 1024 bits is too weak",
        lambda d, _: _files(d, rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    ),
    (
        "not a certificate",
        "ca.pem",
        "not a PEM certificate",
        lambda d, k: _replace(_files(d, k), 0, b"hello\n"),
    ),
    (
        "not a key",
        "ca.key",
        "not a PEM private key",
        lambda d, k: _replace(_files(d, k), 1, b"-----BEGIN PRIVATE KEY-----\nAAAA\n"),
    ),
]


@pytest.mark.parametrize(
    ("file", "problem", "build"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_unusable_cas_are_refused_naming_file_and_problem(
    tmp_path: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    file: str,
    problem: str,
    build: Builder,
) -> None:
    cert_path, key_path, passphrase = build(tmp_path, ca_key)
    secret = Secret(passphrase, "test") if passphrase is not None else None
    with pytest.raises(UnusableCAError) as caught:
        UserCertificateAuthority.load(cert_path, key_path, passphrase=secret, now=NOW)
    message = str(caught.value)
    named = cert_path if file == "ca.pem" else key_path
    assert message.startswith(f"{named}: "), message
    assert re.search(problem, message), message
    assert PASSPHRASE not in message
    assert isinstance(caught.value, ConfigError)
    assert "\n" not in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnusableCAError, match=r"ca\.pem: cannot read: No such file"):
        UserCertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca.key")


# --------------------------------------------------------------------------- PKCS#12


def _pkcs12(
    key: ec.EllipticCurvePrivateKey | None,
    certificate: x509.Certificate,
    extra: list[x509.Certificate],
    password: bytes | None,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return pkcs12.serialize_key_and_certificates(b"ca", key, certificate, extra, encryption)


def test_pkcs12_import_with_chain() -> None:
    root, sub, sub_key = make_root_and_subordinate(ec.SECP256R1())
    data = _pkcs12(sub_key, sub, [root], b"p12-password")

    ca = UserCertificateAuthority.from_pkcs12(data, b"p12-password", now=NOW)
    assert ca.certificate == sub
    assert ca.chain == (root,)
    issued = ca.issue(BOB, now=NOW, validity=MINUTE)
    assert verify_chain(issued, root) == [issued.certificate, sub, root]


def test_pkcs12_without_password(ca_key: ec.EllipticCurvePrivateKey) -> None:
    data = _pkcs12(ca_key, make_ca_certificate(ca_key), [], None)
    assert UserCertificateAuthority.from_pkcs12(data, None, now=NOW).chain == ()


@pytest.mark.parametrize(
    ("password", "with_key", "problem"),
    [
        (b"wrong", True, "cannot read the PKCS#12 file (wrong password, or not PKCS#12)"),
        (None, True, "cannot read the PKCS#12 file (wrong password, or not PKCS#12)"),
        (b"p12-password", False, "the PKCS#12 file lacks the certificate or the key"),
    ],
)
def test_pkcs12_problems_are_named(
    ca_key: ec.EllipticCurvePrivateKey, password: bytes | None, with_key: bool, problem: str
) -> None:
    data = _pkcs12(ca_key if with_key else None, make_ca_certificate(ca_key), [], b"p12-password")
    with pytest.raises(UnusableCAError) as caught:
        UserCertificateAuthority.from_pkcs12(data, password, source="ca.p12", now=NOW)
    assert str(caught.value) == f"ca.p12: {problem}"


def test_pkcs12_of_an_expired_ca_is_refused(ca_key: ec.EllipticCurvePrivateKey) -> None:
    data = _pkcs12(ca_key, make_ca_certificate(ca_key, not_after=NOW - MINUTE), [], None)
    with pytest.raises(UnusableCAError, match=r"^ca\.p12: expired on"):
        UserCertificateAuthority.from_pkcs12(data, None, source="ca.p12", now=NOW)


# --------------------------------------------------------------------------- the cache


class Clock:
    """A settable clock for the cache."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def test_default_renewal_margin() -> None:
    assert default_renew_before(datetime.timedelta(hours=1)) == 12 * MINUTE
    assert default_renew_before(10 * MINUTE) == 2 * MINUTE
    assert default_renew_before(2 * MINUTE) == MINUTE
    assert default_renew_before(MINUTE) == datetime.timedelta(seconds=30)


def test_cache_reuses_until_the_renewal_margin(authority: UserCertificateAuthority) -> None:
    clock = Clock(NOW)
    cache = UserCertificateCache(authority, validity=10 * MINUTE, clock=clock)
    assert cache.renew_before == 2 * MINUTE
    first = cache.get(ALICE)
    assert first.not_valid_after == NOW + 10 * MINUTE
    clock.now = NOW + 8 * MINUTE - datetime.timedelta(seconds=1)
    assert cache.get(x509.Name.from_rfc4514_string("CN=alice,O=Example")) is first
    other = cache.get(BOB)
    assert other is not first
    assert other.subject == BOB

    clock.now = NOW + 8 * MINUTE  # exactly renew_before left: renew
    second = cache.get(ALICE)
    assert second is not first
    assert second.certificate.serial_number != first.certificate.serial_number
    assert second.not_valid_after == clock.now + 10 * MINUTE
    assert cache.get(ALICE) is second
    assert len(cache) == 2


def test_cache_reissues_when_the_clock_went_back(authority: UserCertificateAuthority) -> None:
    clock = Clock(NOW)
    cache = UserCertificateCache(authority, validity=10 * MINUTE, clock=clock)
    first = cache.get(ALICE)
    clock.now = NOW - 6 * MINUTE  # before the back-dated notBefore
    assert cache.get(ALICE) is not first


def test_cache_is_bounded_least_recently_used_first(
    authority: UserCertificateAuthority,
) -> None:
    cache = UserCertificateCache(authority, validity=MINUTE, max_entries=3, clock=Clock(NOW))
    names = [x509.Name.from_rfc4514_string(f"CN=user{i}") for i in range(4)]
    issued = [cache.get(name) for name in names[:3]]
    assert cache.get(names[0]) is issued[0]  # user0 is now the most recently used
    cache.get(names[3])  # evicts user1
    assert len(cache) == 3
    assert cache.get(names[0]) is issued[0]
    assert cache.get(names[2]) is issued[2]
    assert cache.get(names[1]) is not issued[1]
    assert len(cache) == 3


def test_cache_discard_and_clear(authority: UserCertificateAuthority) -> None:
    cache = UserCertificateCache(authority, validity=MINUTE, clock=Clock(NOW))
    first = cache.get(ALICE)
    cache.get(BOB)
    cache.discard(ALICE)
    cache.discard(ALICE)  # twice is fine
    assert len(cache) == 1
    assert cache.get(ALICE) is not first
    cache.clear()
    assert len(cache) == 0


def test_cache_with_rsa_keys(authority: UserCertificateAuthority) -> None:
    cache = UserCertificateCache(
        authority, validity=MINUTE, key_type=KeyType.RSA_2048, clock=Clock(NOW)
    )
    assert isinstance(cache.get(ALICE).private_key, rsa.RSAPrivateKey)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"validity": datetime.timedelta(0)}, "validity must be positive"),
        ({"validity": MINUTE, "renew_before": MINUTE}, "less than validity"),
        ({"validity": MINUTE, "renew_before": -MINUTE}, "at least 0"),
        ({"validity": MINUTE, "max_entries": 0}, "max_entries must be at least 1"),
    ],
)
def test_cache_refuses_bad_settings(
    authority: UserCertificateAuthority, options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        UserCertificateCache(authority, **options)


# --------------------------------------------------------------------------- TLS


class RecordingContext(ssl.SSLContext):
    """Records what load_cert_chain was given: the file's mode and whether its key is sealed."""

    seen: list[tuple[str, int, bool, bool]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        data = Path(certfile).read_bytes()
        mode = stat.S_IMODE(os.stat(certfile).st_mode)
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        plain = b"-----BEGIN PRIVATE KEY-----" in data
        self.seen = [*getattr(self, "seen", []), (str(certfile), mode, encrypted, plain)]
        super().load_cert_chain(certfile, keyfile, password)


@pytest.mark.parametrize("use_directory", [False, True], ids=["memfd", "temporary-file"])
def test_load_into_never_hands_openssl_a_plain_key(
    authority: UserCertificateAuthority, tmp_path: Path, use_directory: bool
) -> None:
    issued = authority.issue(ALICE, now=NOW, validity=MINUTE)
    context = RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    issued.load_into(context, directory=tmp_path if use_directory else None)
    [(name, mode, encrypted, plain)] = context.seen
    assert (encrypted, plain) == (True, False)
    if use_directory:
        assert Path(name).parent == tmp_path
        assert mode == 0o600
    elif hasattr(os, "memfd_create"):
        assert name.startswith("/proc/self/fd/")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def _server_context(trusted: UserCertificateAuthority, server_dir: Path) -> ssl.SSLContext:
    material = write_throwaway_tls_material(server_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(material.cert_file, material.key_file)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(
        cadata=trusted.certificate.public_bytes(serialization.Encoding.PEM).decode()
    )
    return context


async def _handshake(
    server_context: ssl.SSLContext, ca_file: Path, issued: UserCertificate, directory: Path | None
) -> tuple[str | BaseException, bytes | BaseException]:
    """One mutual-TLS connection on 127.0.0.1; returns what the server and the client saw."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server_saw: list[str | BaseException] = []

    async def serve_one() -> None:
        raw = await listeners[0].accept()
        stream = trio.SSLStream(raw, server_context, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            server_saw.append(exc)
            await raw.aclose()
            return
        peer = stream.getpeercert()
        assert peer is not None
        subject = ",".join(
            f"{name}={value}" for rdn in reversed(peer["subject"]) for name, value in rdn
        )
        server_saw.append(subject)
        await stream.send_all(subject.encode())
        await stream.aclose()

    client_context = ssl.create_default_context(cafile=str(ca_file))
    issued.load_into(client_context, directory=directory)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=client_context
            )
            client_saw: bytes | BaseException
            try:
                await stream.do_handshake()
                client_saw = bytes(await stream.receive_some())
            except trio.BrokenResourceError as exc:
                client_saw = exc
            await stream.aclose()
    await listeners[0].aclose()
    return server_saw[0], client_saw


@pytest.mark.parametrize("use_directory", [False, True], ids=["memfd", "temporary-file"])
async def test_a_tls_server_trusting_the_ca_accepts_the_user(
    tmp_path: Path, use_directory: bool
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = UserCertificateAuthority.create("TLS test CA", valid_days=1)
    server_context = _server_context(ca, tmp_path / "server")
    issued = UserCertificateCache(ca, validity=10 * MINUTE).get(ALICE)
    assert issued.certificate.not_valid_before_utc < now
    server_saw, client_saw = await _handshake(
        server_context, tmp_path / "server" / "ca.pem", issued, tmp_path if use_directory else None
    )
    assert server_saw == "commonName=alice,organizationName=Example"
    assert client_saw == b"commonName=alice,organizationName=Example"


async def test_a_tls_server_refuses_a_user_of_another_ca(tmp_path: Path) -> None:
    trusted = UserCertificateAuthority.create("trusted CA", valid_days=1)
    other = UserCertificateAuthority.create("other CA", valid_days=1)
    server_context = _server_context(trusted, tmp_path / "server")
    issued = other.issue(ALICE, now=datetime.datetime.now(datetime.UTC), validity=MINUTE)
    server_saw, client_saw = await _handshake(
        server_context, tmp_path / "server" / "ca.pem", issued, None
    )
    assert isinstance(server_saw, trio.BrokenResourceError)
    assert isinstance(server_saw.__cause__, ssl.SSLError)
    assert "certificate verify failed" in str(server_saw.__cause__)
    assert isinstance(client_saw, trio.BrokenResourceError)
