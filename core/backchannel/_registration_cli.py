"""Commands for registered connectors.

Gateway operator: ``backchannel registration token | list | revoke --config gateway.toml``.
Connector operator: ``backchannel register --config connector.toml`` (the token comes from a
file, an environment variable or standard input, never from the command line) and
``backchannel status --config connector.toml`` (certificate expiry, read from the files).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import sys
from pathlib import Path

import trio

from ._config import ConnectorConfig, ConnectorSubaccount, GatewayConfig
from ._connector import _proxy_for
from ._connector_certificate import (
    CredentialError,
    expiry_problem,
    load_credential,
    register,
    store_credential,
)
from ._connector_identity import ConnectorIdentity, when
from ._exceptions import ConfigError, TunnelError
from ._pki import _write_new_file
from ._registration import ConnectorAuthority, utc_now
from ._registration_token import RegistrationError
from ._transport import client_ssl_context

__all__ = ["add_registration_commands", "run_registration_command"]

EXIT_FAILED = 1
#: How long ``backchannel register`` waits for the gateway.
REGISTER_TIMEOUT = 30.0


def add_registration_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``registration``, ``register`` and ``status`` to the top-level ``commands``."""
    registration = commands.add_parser(
        "registration", help="gateway: registration tokens and connector certificates"
    )
    sub = registration.add_subparsers(
        dest="registration_command", required=True, metavar="SUBCOMMAND"
    )
    token = sub.add_parser("token", help="a one-time registration token for a connector")
    token.add_argument("-c", "--config", type=Path, required=True, help="the gateway.toml")
    token.add_argument("--subaccount", required=True)
    token.add_argument("--location", default="", help="location id (default: the default one)")
    token.add_argument(
        "--valid-minutes", type=float, default=60.0, help="how long it may be used (default 60)"
    )
    token.add_argument(
        "--output", type=Path, help="write the token into this new file (0600) instead of stdout"
    )
    listing = sub.add_parser("list", help="connector certificates signed, with their state")
    listing.add_argument("-c", "--config", type=Path, required=True, help="the gateway.toml")
    revoke = sub.add_parser("revoke", help="revoke connector certificates (tunnels are cut)")
    revoke.add_argument("-c", "--config", type=Path, required=True, help="the gateway.toml")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", action="append", help="serial (hex) as `list` shows it")
    which.add_argument("--subaccount", help="every certificate of this subaccount's connector")
    revoke.add_argument("--location", default=None, help="with --subaccount: only this location")
    revoke.add_argument("--reason", required=True, help="recorded and shown to the connector")

    register_command = commands.add_parser(
        "register", help="connector: register with the gateway using a registration token"
    )
    register_command.add_argument(
        "-c", "--config", type=Path, required=True, help="the connector.toml"
    )
    register_command.add_argument(
        "--subaccount", help="which [subaccounts.<name>] (default: the only one)"
    )
    source = register_command.add_mutually_exclusive_group()
    source.add_argument("--token-file", type=Path, help="read the registration token from a file")
    source.add_argument(
        "--token-env", metavar="VARIABLE", help="read the token from an environment variable"
    )
    register_command.add_argument(
        "--force", action="store_true", help="replace a certificate that is still valid"
    )

    status = commands.add_parser(
        "status", help="connector: how each subaccount authenticates, certificate expiry"
    )
    status.add_argument("-c", "--config", type=Path, required=True, help="the connector.toml")


def run_registration_command(args: argparse.Namespace) -> int:
    """Run one of the commands added by :func:`add_registration_commands`."""
    try:
        if args.command == "register":
            return _register(args)
        if args.command == "status":
            return _status(args)
        authority = _authority(args.config)
        if args.registration_command == "token":
            return _token(authority, args)
        if args.registration_command == "list":
            return _list(authority)
        return _revoke(authority, args)
    except (CredentialError, RegistrationError, TunnelError, ValueError, OSError) as exc:
        print(f"backchannel {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


# ----------------------------------------------------------------------------- gateway side


def _authority(path: Path) -> ConnectorAuthority:
    config = GatewayConfig.from_file(path)
    if config.registration is None:
        raise ConfigError(
            str(path), "registration", "is not configured: add a [registration] table"
        )
    return ConnectorAuthority(config.registration, source=config.source)


def _token(authority: ConnectorAuthority, args: argparse.Namespace) -> int:
    identity = ConnectorIdentity(args.subaccount, args.location)
    lifetime = datetime.timedelta(minutes=args.valid_minutes)
    token = authority.mint_token(identity, lifetime)
    until = when(authority.now() + lifetime)
    if args.output is not None:
        _write_new_file(args.output, (token + "\n").encode(), 0o600)
        print(f"wrote a registration token for {identity} to {args.output} (valid until {until})")
    else:
        print(token)
        print(f"(one-time registration token for {identity}, valid until {until})", file=sys.stderr)
    return 0


def _list(authority: ConnectorAuthority) -> int:
    revoked = authority.state.revoked()
    now = authority.now()
    records = authority.state.issued()
    if not records:
        print("no connector certificates signed yet")
        return 0
    print(f"{'serial':<40} {'connector':<30} {'valid until':<24} {'reason':<12} state")
    for record in records:
        if record.serial in revoked:
            state = f"revoked {when(revoked[record.serial].revoked_at)}"
        elif record.not_after < now:
            state = "expired"
        else:
            state = "valid"
        print(
            f"{record.serial:<40} {record.identity!s:<30} {when(record.not_after):<24} "
            f"{record.reason:<12} {state}"
        )
    return 0


def _revoke(authority: ConnectorAuthority, args: argparse.Namespace) -> int:
    records = authority.state.issued()
    if args.serial:
        known = {record.serial for record in records}
        serials = [serial.lower().removeprefix("0x") for serial in args.serial]
        unknown = [serial for serial in serials if serial not in known]
        if unknown:
            raise ValueError(f"no certificate with serial {', '.join(unknown)} was signed here")
    else:
        serials = [
            record.serial
            for record in records
            if record.identity.subaccount == args.subaccount
            and (args.location is None or record.identity.location == args.location)
        ]
        if not serials:
            raise ValueError(f"no certificate was signed for subaccount {args.subaccount!r}")
    added = authority.state.revoke(serials, reason=args.reason, now=authority.now())
    for serial in serials:
        print(f"{serial}: {'revoked' if serial in added else 'was already revoked'}")
    print("a running gateway cuts their tunnels at its next revocation check")
    return 0


# ----------------------------------------------------------------------------- connector side


def _subaccount(config: ConnectorConfig, name: str | None) -> ConnectorSubaccount:
    if name is None:
        if len(config.subaccounts) != 1:
            raise ValueError(
                f"{config.source} has several subaccounts: choose one with --subaccount"
            )
        return next(iter(config.subaccounts.values()))
    sub = config.subaccounts.get(name)
    if sub is None:
        raise ValueError(f"{config.source} has no [subaccounts.{name}]")
    return sub


def _read_token(args: argparse.Namespace) -> str:
    token: str
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    elif args.token_env is not None:
        if args.token_env not in os.environ:
            raise ValueError(f"environment variable {args.token_env} is not set")
        token = os.environ[args.token_env].strip()
    elif sys.stdin.isatty():
        token = getpass.getpass("registration token: ").strip()
    else:
        token = sys.stdin.readline().strip()
    if not token:
        raise ValueError("the registration token is empty")
    return token


def _register(args: argparse.Namespace) -> int:
    config = ConnectorConfig.from_file(args.config)
    sub = _subaccount(config, args.subaccount)
    if sub.certificate_file is None:
        raise ValueError(
            f"[subaccounts.{sub.name}] has no certificate_file: set it (and remove token_file) "
            "to say where the connector certificate goes"
        )
    identity = ConnectorIdentity(sub.name, sub.location)
    if sub.certificate_file.exists() and not args.force:
        try:
            credential = load_credential(sub.certificate_file, identity)
        except CredentialError:
            pass  # unusable: replace it
        else:
            if expiry_problem(credential, utc_now()) is None:
                raise ValueError(
                    f"{sub.certificate_file} already holds a valid certificate "
                    f"({credential.describe()}); use --force to replace it"
                )
    token = _read_token(args)
    key, certificate = trio.run(
        lambda: register(
            sub.gateway,
            identity,
            token,
            ssl_context=client_ssl_context(sub.ca_file),
            proxy=_proxy_for(sub),
            answer_within=REGISTER_TIMEOUT,
        )
    )
    store_credential(sub.certificate_file, key, certificate)
    print(
        f"registered connector {identity} with {sub.gateway}: certificate serial "
        f"{certificate.serial_number:x}, valid until {when(certificate.not_valid_after_utc)}, "
        f"written to {sub.certificate_file}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    config = ConnectorConfig.from_file(args.config)
    now = utc_now()
    healthy = True
    for sub in config.subaccounts.values():
        identity = ConnectorIdentity(sub.name, sub.location)
        head = f"{identity} -> {sub.gateway}:"
        if sub.certificate_file is None:
            print(f"{head} shared token (register the connector to use a certificate)")
            continue
        try:
            credential = load_credential(sub.certificate_file, identity)
        except CredentialError as exc:
            healthy = False
            print(f"{head} NO CERTIFICATE: {exc}")
            continue
        problem = expiry_problem(credential, now)
        if problem is not None:
            healthy = False
            print(f"{head} EXPIRED: {problem}")
            continue
        not_after = credential.certificate.not_valid_after_utc
        due = credential.renewal_due(sub.renew_before)
        days = (not_after - now).total_seconds() / 86400
        state = "renewal due" if now >= due else f"renews from {when(due)}"
        print(
            f"{head} certificate serial {credential.certificate.serial_number:x}, valid until "
            f"{when(not_after)} ({days:.1f} days left; {state})"
        )
    return 0 if healthy else EXIT_FAILED
