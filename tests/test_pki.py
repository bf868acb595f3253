"""Tests for backchannel._pki: certificate contents, file handling and real TLS handshakes.

Handshakes run over in-memory ``ssl.MemoryBIO`` pairs; no network is used.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backchannel._pki import (
    CertificateAuthority,
    IssuedCertificate,
    TlsMaterial,
    write_throwaway_tls_material,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test CA")


@pytest.fixture
def material(tmp_path: Path) -> TlsMaterial:
    return write_throwaway_tls_material(tmp_path / "tls")


def _server_context(
    cert_file: Path, key_file: Path, *, trust: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if trust is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=trust)
    return ctx


def _client_context(
    trust: Path, *, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=trust)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a complete TLS handshake in memory and exchange one message each way."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)

    def pump() -> None:
        s_in.write(c_out.read())
        c_in.write(s_out.read())

    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        pump()
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        pump()
        if client_done and server_done:
            break
    else:
        pytest.fail("TLS handshake did not complete")

    # Application data proves both sides really agree (and, under TLS 1.3, that the server
    # accepted the client's certificate).
    client.write(b"ping")
    pump()
    assert server.read(4) == b"ping"
    server.write(b"pong")
    pump()
    assert client.read(4) == b"pong"
    return client, server


def _eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage:
    return cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


# --------------------------------------------------------------------------- TLS handshakes


def test_server_certificate_handshake_succeeds(material: TlsMaterial) -> None:
    server_ctx = _server_context(material.cert_file, material.key_file)
    client, _ = _handshake(_client_context(material.ca_file), server_ctx, "localhost")
    peer = client.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", "localhost"),),)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_handshake_by_ip_address(material: TlsMaterial, address: str) -> None:
    server_ctx = _server_context(material.cert_file, material.key_file)
    _handshake(_client_context(material.ca_file), server_ctx, address)


def test_wrong_hostname_fails(material: TlsMaterial) -> None:
    server_ctx = _server_context(material.cert_file, material.key_file)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"other\.example"):
        _handshake(_client_context(material.ca_file), server_ctx, "other.example")


def test_different_ca_fails(material: TlsMaterial, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other_ca_file, _ = CertificateAuthority.create("other CA").save(other)
    server_ctx = _server_context(material.cert_file, material.key_file)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(_client_context(other_ca_file), server_ctx, "localhost")


def test_mutual_tls(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca_file, _ = ca.save(tmp_path)
    server_cert, server_key = ca.issue_server_certificate(["localhost"]).save(tmp_path, "server")
    client_cert, client_key = ca.issue_client_certificate("connector-1").save(tmp_path, "client")

    server_ctx = _server_context(server_cert, server_key, trust=ca_file)
    client_ctx = _client_context(ca_file, cert_file=client_cert, key_file=client_key)
    _, server = _handshake(client_ctx, server_ctx, "localhost")
    peer = server.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", "connector-1"),),)


def test_mutual_tls_rejects_client_without_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ca_file, _ = ca.save(tmp_path)
    server_cert, server_key = ca.issue_server_certificate(["localhost"]).save(tmp_path, "server")
    server_ctx = _server_context(server_cert, server_key, trust=ca_file)
    with pytest.raises(ssl.SSLError):
        _handshake(_client_context(ca_file), server_ctx, "localhost")


def test_mutual_tls_rejects_client_from_other_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca_file, _ = ca.save(tmp_path)
    server_cert, server_key = ca.issue_server_certificate(["localhost"]).save(tmp_path, "server")
    foreign = CertificateAuthority.create("foreign CA").issue_client_certificate("intruder")
    client_cert, client_key = foreign.save(tmp_path, "client")
    server_ctx = _server_context(server_cert, server_key, trust=ca_file)
    client_ctx = _client_context(ca_file, cert_file=client_cert, key_file=client_key)
    with pytest.raises(ssl.SSLError):
        _handshake(client_ctx, server_ctx, "localhost")


# --------------------------------------------------------------------------- certificate contents


def test_ca_certificate_contents(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(ca.private_key.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(cert)


def test_validity_window_is_utc_and_backdated(ca: CertificateAuthority) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_server_certificate(["localhost"]).certificate
    for cert, days in ((ca.certificate, 3650), (leaf, 825)):
        before = cert.not_valid_before_utc
        after = cert.not_valid_after_utc
        assert before.tzinfo is not None
        skew = now - before
        assert datetime.timedelta(minutes=4) < skew < datetime.timedelta(minutes=6)
        assert abs(after - (now + datetime.timedelta(days=days))) < datetime.timedelta(minutes=1)


def test_leaf_validity_is_clamped_to_ca() -> None:
    short = CertificateAuthority.create(valid_days=10)
    leaf = short.issue_server_certificate(["localhost"]).certificate
    assert leaf.not_valid_after_utc == short.certificate.not_valid_after_utc


def test_server_certificate_contents(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_certificate(["gw.example.com", "127.0.0.1", "::1", "localhost"])
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw.example.com"
    assert cert.issuer == ca.certificate.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.com", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_eku(cert)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(issued.private_key.curve, ec.SECP256R1)
    assert issued.private_key.public_key() != ca.private_key.public_key()
    assert issued.chain == (ca.certificate,)
    cert.verify_directly_issued_by(ca.certificate)


def test_ip_san_for_loopback(material: TlsMaterial) -> None:
    cert = x509.load_pem_x509_certificate(material.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "127.0.0.1" not in san.get_values_for_type(x509.DNSName)


def test_client_certificate_has_client_auth(ca: CertificateAuthority) -> None:
    cert = ca.issue_client_certificate("connector-1").certificate
    assert list(_eku(cert)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "connector-1"
    cert.verify_directly_issued_by(ca.certificate)


def test_serial_numbers_are_random(ca: CertificateAuthority) -> None:
    serials = {ca.issue_client_certificate("c").certificate.serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


@pytest.mark.parametrize("hostnames", [[], [""]])
def test_server_certificate_needs_a_hostname(
    ca: CertificateAuthority, hostnames: list[str]
) -> None:
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_server_certificate(hostnames)


def test_server_certificate_rejects_bare_string(ca: CertificateAuthority) -> None:
    with pytest.raises(TypeError, match="not a single string"):
        ca.issue_server_certificate("localhost")


def test_valid_days_must_be_positive(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="valid_days"):
        ca.issue_client_certificate("c", valid_days=0)
    with pytest.raises(ValueError, match="valid_days"):
        CertificateAuthority.create(valid_days=-1)


# --------------------------------------------------------------------------- files


@posix_only
def test_key_files_are_private(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, ca_key = ca.save(tmp_path)
        _, leaf_key = ca.issue_client_certificate("c").save(tmp_path, "client")
        material = write_throwaway_tls_material(tmp_path / "throwaway")
    finally:
        os.umask(old)
    for key in (ca_key, leaf_key, material.key_file):
        assert key.stat().st_mode & 0o777 == 0o600, key


def test_throwaway_material_files(material: TlsMaterial) -> None:
    directory = material.ca_file.parent
    assert material.ca_file == directory / "ca.pem"
    assert material.cert_file == directory / "server.pem"
    assert material.key_file == directory / "server.key"
    assert sorted(p.name for p in directory.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert b"PRIVATE KEY" not in material.ca_file.read_bytes()
    certs = x509.load_pem_x509_certificates(material.cert_file.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(material.ca_file.read_bytes())
    assert certs[1:] == [ca_cert]
    assert material.key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_throwaway_material_refuses_overwrite(material: TlsMaterial) -> None:
    before = material.key_file.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_throwaway_tls_material(material.ca_file.parent)
    assert material.key_file.read_bytes() == before


def test_ca_save_refuses_overwrite(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, key_path = ca.save(tmp_path)
    cert_before, key_before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(FileExistsError, match=r"refusing to overwrite .*ca\.pem"):
        CertificateAuthority.create().save(tmp_path)
    assert cert_path.read_bytes() == cert_before
    assert key_path.read_bytes() == key_before


def test_save_refuses_when_only_key_exists(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "server.key").write_bytes(b"precious")
    issued = ca.issue_server_certificate(["localhost"])
    with pytest.raises(FileExistsError, match=r"server\.key"):
        issued.save(tmp_path, "server")
    assert (tmp_path / "server.key").read_bytes() == b"precious"
    assert not (tmp_path / "server.pem").exists()


def test_issued_pem_round_trip(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_certificate(["localhost"])
    certs = x509.load_pem_x509_certificates(issued.certificate_pem())
    assert certs == [issued.certificate, ca.certificate]
    assert issued.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_invalid_name_rejected(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid file name"):
        ca.save(tmp_path, name="../escape")


def test_load_round_trip(ca: CertificateAuthority, tmp_path: Path) -> None:
    loaded = CertificateAuthority.load(*ca.save(tmp_path, name="myca"))
    assert loaded.certificate == ca.certificate
    assert loaded.private_key.private_numbers() == ca.private_key.private_numbers()
    # The loaded CA can still issue certificates that chain to the original.
    loaded.issue_client_certificate("c").certificate.verify_directly_issued_by(ca.certificate)


def test_load_rejects_mismatched_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, _ = ca.save(tmp_path / "a")
    _, other_key = CertificateAuthority.create().save(tmp_path / "b")
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.load(cert_path, other_key)


def test_load_rejects_non_ca_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, key_path = ca.issue_server_certificate(["localhost"]).save(tmp_path, "server")
    with pytest.raises(ValueError, match="not a CA certificate"):
        CertificateAuthority.load(cert_path, key_path)


def test_load_rejects_garbage(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, key_path = ca.save(tmp_path)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not pem")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        CertificateAuthority.load(junk, key_path)
    with pytest.raises(ValueError, match="not a PEM private key"):
        CertificateAuthority.load(cert_path, junk)


# --------------------------------------------------------------------------- hygiene


def test_dataclasses_are_frozen(ca: CertificateAuthority) -> None:
    issued: IssuedCertificate = ca.issue_client_certificate("c")
    with pytest.raises(AttributeError):
        issued.chain = ()  # type: ignore[misc]
