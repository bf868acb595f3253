"""``backchannel ca``: the CA that issues user certificates for principal propagation.

``ca init`` creates one, ``ca import`` takes an existing one from PKCS#12, ``ca sample-cert``
shows backend administrators what the user certificates will look like.  Passwords come
from an environment variable or a file, never from the command line (where ``ps`` and shell
history would see them).  Every error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ._configutil import Secret
from ._exceptions import ConfigError
from ._pki import _write_new_file
from ._user_ca import KeyType, UserCertificateAuthority, describe_key

__all__ = ["add_ca_commands", "run_ca_command"]

EXIT_USAGE = 2
_CERT_MODE = 0o644


class _Problem(Exception):
    """A mistake in the arguments, reported as one line."""


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _add_key_passphrase(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--key-passphrase-env",
        metavar="VARIABLE",
        help=f"{what} ca.key with the passphrase in this environment variable",
    )
    group.add_argument(
        "--key-passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"{what} ca.key with the passphrase in this file",
    )


def add_ca_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ca`` and its subcommands to the top-level ``commands``."""
    ca = commands.add_parser(
        "ca", help="the CA that issues user certificates (principal propagation)"
    )
    ca_commands = ca.add_subparsers(
        dest="ca_command", required=True, metavar="SUBCOMMAND", parser_class=_OneLineErrorParser
    )

    init = ca_commands.add_parser("init", help="create ca.pem and ca.key (mode 0600) in a folder")
    init.add_argument("--dir", type=Path, required=True, help="folder for ca.pem and ca.key")
    init.add_argument(
        "--name",
        default="backchannel principal propagation CA",
        help="the CA's common name",
    )
    init.add_argument(
        "--days", type=_positive_int, default=3650, help="validity in days (default 3650)"
    )
    _add_key_passphrase(init, "encrypt")

    imp = ca_commands.add_parser(
        "import", help="write ca.pem and ca.key from an existing CA's PKCS#12 file"
    )
    imp.add_argument("--pkcs12", type=Path, required=True, metavar="FILE", help="the .p12/.pfx")
    imp.add_argument("--dir", type=Path, required=True, help="folder for ca.pem and ca.key")
    password = imp.add_mutually_exclusive_group()
    password.add_argument(
        "--password-env", metavar="VARIABLE", help="the PKCS#12 password is in this variable"
    )
    password.add_argument(
        "--password-file", type=Path, metavar="FILE", help="the PKCS#12 password is in this file"
    )
    _add_key_passphrase(imp, "encrypt")

    sample = ca_commands.add_parser(
        "sample-cert", help="issue one user certificate and print it (for mapping rules)"
    )
    sample.add_argument("--dir", type=Path, required=True, help="folder with ca.pem and ca.key")
    sample.add_argument(
        "--subject", required=True, help="the user's DN, RFC 4514: 'CN=alice,O=Example'"
    )
    sample.add_argument(
        "--out", type=Path, metavar="FILE", help="also write the certificate (PEM) here"
    )
    sample.add_argument(
        "--minutes", type=_positive_int, default=60, help="validity in minutes (default 60)"
    )
    sample.add_argument(
        "--key-type",
        choices=[k.value for k in KeyType],
        default=KeyType.EC_P256.value,
        help="the user certificate's key (default ec-p256)",
    )
    _add_key_passphrase(sample, "decrypt")


def run_ca_command(args: argparse.Namespace) -> int:
    """Run ``backchannel ca SUBCOMMAND``; returns the exit code."""
    command = args.ca_command
    try:
        if command == "init":
            return _init(args)
        if command == "import":
            return _import(args)
        return _sample_cert(args)
    except (_Problem, ConfigError, ValueError) as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    print(f"backchannel ca {command}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def _secret_from(variable: str | None, file: Path | None, option: str) -> Secret | None:
    """The secret named by ``--OPTION-env`` or ``--OPTION-file``; None if neither is given."""
    if variable is not None:
        value = os.environ.get(variable)
        if value is None:
            raise _Problem(f"environment variable {variable} (named by --{option}-env) is not set")
        return Secret(value, f"environment variable {variable}")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _Problem(f"{file}: not UTF-8 text") from None
        # One trailing line end belongs to the file, not to the secret.
        return Secret(text.removesuffix("\n").removesuffix("\r"), f"file {file}")
    return None


def _key_passphrase(args: argparse.Namespace) -> Secret | None:
    return _secret_from(args.key_passphrase_env, args.key_passphrase_file, "key-passphrase")


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _wrote(cert: Path, key: Path, authority: UserCertificateAuthority) -> None:
    certificate = authority.certificate
    print(
        f"wrote {cert} and {key}: {certificate.subject.rfc4514_string()}, "
        f"valid until {_when(certificate.not_valid_after_utc)}"
    )
    print(
        "keep ca.key private; backends trust ca.pem and map the user certificates' subjects "
        "to their users"
    )


def _init(args: argparse.Namespace) -> int:
    passphrase = _key_passphrase(args)
    if not args.name.strip():
        raise _Problem("--name must not be empty")
    authority = UserCertificateAuthority.create(args.name, valid_days=args.days)
    cert, key = authority.save(args.dir, passphrase=passphrase)
    _wrote(cert, key, authority)
    return 0


def _import(args: argparse.Namespace) -> int:
    password = _secret_from(args.password_env, args.password_file, "password")
    passphrase = _key_passphrase(args)
    authority = UserCertificateAuthority.from_pkcs12(
        args.pkcs12.read_bytes(),
        password.reveal().encode() if password is not None else None,
        source=str(args.pkcs12),
    )
    cert, key = authority.save(args.dir, passphrase=passphrase)
    _wrote(cert, key, authority)
    return 0


def _sample_cert(args: argparse.Namespace) -> int:
    try:
        subject = x509.Name.from_rfc4514_string(args.subject)
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise _Problem(
            f"--subject {args.subject!r} is not an RFC 4514 DN like 'CN=alice,O=Example'{detail}"
        ) from None
    if len(subject) == 0:
        raise _Problem("--subject must not be empty")
    authority = UserCertificateAuthority.load(
        args.dir / "ca.pem", args.dir / "ca.key", passphrase=_key_passphrase(args)
    )
    issued = authority.issue(
        subject,
        now=datetime.datetime.now(datetime.UTC),
        validity=datetime.timedelta(minutes=args.minutes),
        key_type=KeyType(args.key_type),
    )
    if args.out is not None:
        _write_new_file(args.out, issued.pem().encode("ascii"), _CERT_MODE)
    certificate = issued.certificate
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    print(f"subject:    {certificate.subject.rfc4514_string()}")
    print(f"issuer:     {certificate.issuer.rfc4514_string()}")
    print(f"serial:     {certificate.serial_number:#x}")
    print(f"not before: {_when(certificate.not_valid_before_utc)}")
    print(f"not after:  {_when(certificate.not_valid_after_utc)}")
    print(f"key:        {describe_key(certificate)} (the private key was not kept)")
    print(f"sha256:     {fingerprint}")
    if args.out is not None:
        print(f"wrote:      {args.out}")
    print(issued.pem(), end="")
    return 0
