"""``backchannel ca init | import | sample-cert`` as real processes: files and their modes,
what is printed (and what never is), and one-line errors with exit code 2."""

from __future__ import annotations

import datetime
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from backchannel import Secret
from backchannel._user_ca import UserCertificateAuthority
from tests.procs import child_environment, run_cli

P12_PASSWORD = "p12-password-for-cli-tests-41c9"
KEY_PASSPHRASE = "key-passphrase-for-cli-tests-b07a"
SECRETS = (P12_PASSWORD, KEY_PASSPHRASE)


def ca(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``backchannel ca ARGS`` with extra environment variables; check nothing leaks."""
    result = run_cli("ca", *args, env=child_environment(**env))
    for text in (result.stdout, result.stderr):
        for secret in SECRETS:
            assert secret not in text, f"secret leaked: {text!r}"
        assert "PRIVATE KEY" not in text
        assert "Traceback" not in text
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """Exit code 2, nothing on stdout, exactly one line on stderr naming the command."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"backchannel ca {command}: "), lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_sample_cert_issues_under_it(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = ca("init", "--dir", ca_dir, "--name", "Example PP CA", "--days", "30")
    assert (result.returncode, result.stderr) == (0, "")
    assert f"wrote {ca_dir / 'ca.pem'} and {ca_dir / 'ca.key'}" in result.stdout
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir) == 0o700
    authority = UserCertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca.key")
    certificate = authority.certificate
    assert certificate.subject.rfc4514_string() == "CN=Example PP CA"
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30, minutes=5)

    out = tmp_path / "alice.pem"
    result = ca("sample-cert", "--dir", ca_dir, "--subject", "CN=alice,O=Example", "--out", out)
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == "subject:    CN=alice,O=Example"
    assert lines[1] == "issuer:     CN=Example PP CA"
    assert lines[3].startswith("not before: ")
    assert lines[4].startswith("not after:  ")
    assert "EC secp256r1" in lines[5]
    printed = x509.load_pem_x509_certificate(result.stdout.encode())
    assert printed == x509.load_pem_x509_certificate(out.read_bytes())
    assert printed.issuer == certificate.subject
    printed.verify_directly_issued_by(certificate)
    purposes = printed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    when = "%Y-%m-%d %H:%M:%S UTC"
    assert lines[3] == f"not before: {printed.not_valid_before_utc.strftime(when)}"
    assert printed.not_valid_after_utc - printed.not_valid_before_utc == datetime.timedelta(
        minutes=65
    )
    assert set(tmp_path.iterdir()) == {ca_dir, out}  # the key was not written anywhere

    # --out never replaces a file.
    result = ca("sample-cert", "--dir", ca_dir, "--subject", "CN=alice", "--out", out)
    assert "refusing to overwrite" in assert_one_line_error(result, "sample-cert")


def test_rsa_sample_and_minutes(tmp_path: Path) -> None:
    assert ca("init", "--dir", tmp_path).returncode == 0
    result = ca(
        "sample-cert", "--dir", tmp_path, "--subject", "CN=bob", "--key-type", "rsa-2048",
        "--minutes", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "key:        RSA 2048" in result.stdout
    printed = x509.load_pem_x509_certificate(result.stdout.encode())
    assert printed.not_valid_after_utc - printed.not_valid_before_utc == datetime.timedelta(
        minutes=10
    )


def test_an_encrypted_ca_key(tmp_path: Path) -> None:
    env = {"CA_KEY_PASSPHRASE": KEY_PASSPHRASE}
    result = ca("init", "--dir", tmp_path, "--key-passphrase-env", "CA_KEY_PASSPHRASE", **env)
    assert result.returncode == 0, result.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "ca.key").read_bytes()
    assert mode(tmp_path / "ca.key") == 0o600

    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(KEY_PASSPHRASE + "\n")
    for option, value in [
        ("--key-passphrase-env", "CA_KEY_PASSPHRASE"),
        ("--key-passphrase-file", str(passphrase_file)),
    ]:
        result = ca("sample-cert", "--dir", tmp_path, "--subject", "CN=a", option, value, **env)
        assert result.returncode == 0, result.stderr

    result = ca("sample-cert", "--dir", tmp_path, "--subject", "CN=a")
    line = assert_one_line_error(result, "sample-cert")
    assert line.endswith("ca.key: the private key is encrypted; give its passphrase")
    result = ca(
        "sample-cert", "--dir", tmp_path, "--subject", "CN=a",
        "--key-passphrase-env", "CA_KEY_PASSPHRASE", CA_KEY_PASSPHRASE="wrong",
    )  # fmt: skip
    assert "wrong passphrase" in assert_one_line_error(result, "sample-cert")


@pytest.fixture
def p12_file(tmp_path: Path) -> tuple[Path, UserCertificateAuthority]:
    authority = UserCertificateAuthority.create("Imported CA", valid_days=10)
    data = pkcs12.serialize_key_and_certificates(
        b"ca",
        authority.private_key,
        authority.certificate,
        None,
        serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
    )
    path = tmp_path / "ca.p12"
    path.write_bytes(data)
    return path, authority


@pytest.mark.parametrize("source", ["env", "file"])
def test_import_from_pkcs12(
    tmp_path: Path, p12_file: tuple[Path, UserCertificateAuthority], source: str
) -> None:
    p12, original = p12_file
    password_file = tmp_path / "p12.password"
    password_file.write_text(P12_PASSWORD + "\r\n")
    option = (
        ["--password-env", "P12_PASSWORD"]
        if source == "env"
        else ["--password-file", str(password_file)]
    )
    ca_dir = tmp_path / "imported"
    result = ca("import", "--pkcs12", p12, "--dir", ca_dir, *option, P12_PASSWORD=P12_PASSWORD)
    assert (result.returncode, result.stderr) == (0, "")
    assert "CN=Imported CA" in result.stdout
    assert mode(ca_dir / "ca.key") == 0o600
    imported = UserCertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca.key")
    assert imported.certificate == original.certificate
    assert isinstance(imported.private_key, ec.EllipticCurvePrivateKey)
    assert imported.private_key.private_numbers() == original.private_key.private_numbers()


def test_import_can_encrypt_the_key(
    tmp_path: Path, p12_file: tuple[Path, UserCertificateAuthority]
) -> None:
    p12, _ = p12_file
    result = ca(
        "import", "--pkcs12", p12, "--dir", tmp_path / "ca", "--password-env", "P12",
        "--key-passphrase-env", "KEY", P12=P12_PASSWORD, KEY=KEY_PASSPHRASE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    UserCertificateAuthority.load(
        tmp_path / "ca" / "ca.pem",
        tmp_path / "ca" / "ca.key",
        passphrase=Secret(KEY_PASSPHRASE, ""),
    )


def test_import_problems(tmp_path: Path, p12_file: tuple[Path, UserCertificateAuthority]) -> None:
    p12, _ = p12_file
    ca_dir = tmp_path / "out"
    result = ca("import", "--pkcs12", p12, "--dir", ca_dir, "--password-env", "P12", P12="nope")
    assert assert_one_line_error(result, "import") == (
        f"backchannel ca import: {p12}: cannot read the PKCS#12 file "
        "(wrong password, or not PKCS#12)"
    )
    result = ca("import", "--pkcs12", p12, "--dir", ca_dir, "--password-env", "UNSET_VARIABLE_X")
    assert "UNSET_VARIABLE_X (named by --password-env) is not set" in assert_one_line_error(
        result, "import"
    )
    result = ca("import", "--pkcs12", tmp_path / "missing.p12", "--dir", ca_dir)
    assert "missing.p12: No such file or directory" in assert_one_line_error(result, "import")
    # There is no way to put a password on the command line.
    result = ca("import", "--pkcs12", p12, "--dir", ca_dir, "--password", P12_PASSWORD)
    assert_one_line_error(result, "import")
    assert not ca_dir.exists()


def _not_a_ca(directory: Path) -> None:
    """A directory whose ca.pem/ca.key are a leaf certificate and its key."""
    authority = UserCertificateAuthority.create("real CA", valid_days=1)
    issued = authority.issue(
        x509.Name.from_rfc4514_string("CN=leaf"),
        now=datetime.datetime.now(datetime.UTC),
        validity=datetime.timedelta(hours=1),
    )
    directory.mkdir()
    (directory / "ca.pem").write_text(issued.pem())
    (directory / "ca.key").write_bytes(
        issued.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    ("args", "command", "problem"),
    [
        (("init", "--dir", "{tmp}/ca", "--days", "0"), "init", "argument --days: expected a"),
        (("init", "--dir", "{tmp}/ca", "--days", "many"), "init", "argument --days"),
        (("init", "--dir", "{tmp}/ca", "--name", " "), "init", "--name must not be empty"),
        (("init",), "init", "the following arguments are required: --dir"),
        (("sample-cert", "--dir", "{tmp}"), "sample-cert", "required: --subject"),
        (
            ("sample-cert", "--dir", "{tmp}/nothing", "--subject", "CN=a"),
            "sample-cert",
            "nothing/ca.pem: cannot read: No such file or directory",
        ),
        (
            ("sample-cert", "--dir", "{tmp}/leaf", "--subject", "CN=a"),
            "sample-cert",
            "leaf/ca.pem: not a CA certificate (BasicConstraints CA=false)",
        ),
        (
            ("sample-cert", "--dir", "{tmp}/leaf", "--subject", "no DN"),
            "sample-cert",
            "--subject 'no DN' is not an RFC 4514 DN",
        ),
        (
            ("sample-cert", "--dir", "{tmp}/leaf", "--subject", "CN=a", "--key-type", "dsa"),
            "sample-cert",
            "argument --key-type: invalid choice",
        ),
        (
            (
                "sample-cert",
                "--dir",
                "{tmp}",
                "--subject",
                "CN=a",
                "--key-passphrase-file",
                "{tmp}/missing",
            ),
            "sample-cert",
            "missing: No such file or directory",
        ),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(
    tmp_path: Path, args: tuple[str, ...], command: str, problem: str
) -> None:
    _not_a_ca(tmp_path / "leaf")
    result = ca(*(arg.format(tmp=tmp_path) for arg in args))
    line = assert_one_line_error(result, command)
    assert problem in line, line


def test_init_never_replaces_a_ca(tmp_path: Path) -> None:
    assert ca("init", "--dir", tmp_path).returncode == 0
    before = (tmp_path / "ca.key").read_bytes()
    result = ca("init", "--dir", tmp_path)
    assert "refusing to overwrite existing file" in assert_one_line_error(result, "init")
    assert (tmp_path / "ca.key").read_bytes() == before
