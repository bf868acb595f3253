"""The ``backchannel`` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from ._apptoken import issue_app_token
from ._ca_cli import add_ca_commands, run_ca_command
from ._config import AuditConfig, ConnectorConfig, GatewayConfig
from ._connector import Connector
from ._exceptions import ConfigError
from ._gateway import Gateway
from ._logging import configure_logging
from ._pki import CertificateAuthority
from ._plugin_api import AppIdentity
from ._plugins import (
    PluginSelection,
    describe_plugins,
    get_plugin_manager,
    installed_plugin_names,
)
from ._registration_cli import add_registration_commands, run_registration_command
from ._version import __version__

log = logging.getLogger("backchannel.cli")

EXIT_CONFIG = 2


def _selection(args: argparse.Namespace) -> PluginSelection:
    """The command line's plugin choice; unknown names are reported as the options' fault."""
    only = None
    if args.plugins:
        only = tuple(name for name in (p.strip() for p in args.plugins.split(",")) if name)
    disabled = tuple(args.disable_plugin or ())
    installed = installed_plugin_names()
    for option, names in (("--plugins", only or ()), ("--disable-plugin", disabled)):
        for name in names:
            if name not in installed:
                found = ", ".join(installed) or "none"
                raise ConfigError(
                    "command line",
                    option,
                    f"no plugin named {name!r} is installed (found: {found})",
                )
    return PluginSelection(only, disabled)


def _add_common(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        parser.add_argument(
            "-c", "--config", type=Path, required=True, help="the TOML configuration file"
        )
    parser.add_argument(
        "--plugins", help="comma-separated plugins to enable (default: all installed)"
    )
    parser.add_argument(
        "--disable-plugin", action="append", metavar="NAME", help="disable a plugin (repeatable)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let open streams finish this long (default 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every command has --help)."""
    parser = argparse.ArgumentParser(
        prog="backchannel",
        description="Reverse-invoke proxy: an on-premise connector dials out to a cloud gateway.",
    )
    parser.add_argument("--version", action="version", version=f"backchannel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gateway = commands.add_parser("gateway", help="run the cloud-side gateway")
    _add_common(gateway)
    connector = commands.add_parser("connector", help="run the on-premise connector")
    _add_common(connector)

    demo = commands.add_parser("demo", help="gateway, connector and sample backends in one process")
    demo.add_argument(
        "--once", action="store_true", help="self-check every protocol, then exit (0 = all ok)"
    )
    demo.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    demo.add_argument("--log-json", action="store_true")
    demo.add_argument(
        "--print-config", action="store_true", help="print the embedded configuration and exit"
    )

    plugins = commands.add_parser("plugins", help="list installed plugins, versions and roles")
    _add_common(plugins, config=False)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    check = config_commands.add_parser("check", help="validate a gateway.toml or connector.toml")
    check.add_argument(
        "--role", choices=["gateway", "connector"], help="default: guessed from [gateway]"
    )
    _add_common(check)

    pki = commands.add_parser(
        "pki", help="create a CA and a gateway certificate (no own PKI needed)"
    )
    pki_commands = pki.add_subparsers(dest="pki_command", required=True, metavar="SUBCOMMAND")
    init_ca = pki_commands.add_parser("init-ca", help="create ca.pem and ca.key in a folder")
    init_ca.add_argument("--dir", type=Path, required=True)
    init_ca.add_argument("--name", default="backchannel CA", help="the CA's common name")
    server = pki_commands.add_parser("server-cert", help="issue the gateway's TLS certificate")
    server.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.pem and ca.key")
    server.add_argument(
        "--host", action="append", required=True, help="DNS name or IP (repeatable)"
    )
    server.add_argument(
        "--out", type=Path, required=True, help="writes server.pem and server.key here"
    )
    server.add_argument("--days", type=int, default=825)

    token = commands.add_parser("app-token", help="issue a token for an app (SOCKS5 0x80, Bearer)")
    token.add_argument("-c", "--config", type=Path, required=True, help="the gateway.toml")
    token.add_argument("--app", required=True, help="subaccount/app")
    token.add_argument("--ttl", type=int, default=3600, help="seconds of validity (default 3600)")
    add_ca_commands(commands)
    add_registration_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"backchannel: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command in ("gateway", "connector"):
        configure_logging(args.log_level, json_lines=args.log_json)
        return _run_role(command, args)
    if command == "demo":
        return _demo(args)
    if command == "plugins":
        return _plugins(args)
    if command == "config":
        return _config_check(args)
    if command == "pki":
        return _pki(args)
    if command == "app-token":
        return _app_token(args)
    if command == "ca":
        return run_ca_command(args)
    if command in ("registration", "register", "status"):
        return run_registration_command(args)
    raise AssertionError(command)


def _load(role: str, args: argparse.Namespace, *, check_only: bool = False) -> Gateway | Connector:
    """Parse and validate everything (plugins included) before anything listens.

    With ``check_only`` the audit file is left alone: checking a file must not create or
    open the audit trail it names.
    """
    if role == "gateway":
        gateway_config = GatewayConfig.from_file(args.config)
        if check_only:
            gateway_config = dataclasses.replace(gateway_config, audit=AuditConfig())
        selection = gateway_config.plugins.merged(_selection(args))
        manager = get_plugin_manager(selection, source=str(args.config))
        return Gateway(gateway_config, plugin_manager=manager)
    connector_config = ConnectorConfig.from_file(args.config)
    if check_only:
        connector_config = dataclasses.replace(connector_config, audit=AuditConfig())
    selection = connector_config.plugins.merged(_selection(args))
    manager = get_plugin_manager(selection, source=str(args.config))
    return Connector(connector_config, plugin_manager=manager)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, also when trio wrapped it in (nested) exception groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


def _run_role(role: str, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope, instance, args.shutdown_grace)
            if isinstance(instance, Gateway):
                nursery.start_soon(_reload_on_sighup, instance)
            await nursery.start(instance.serve)
            log.info("backchannel %s %s running (config %s)", role, __version__, args.config)

    try:
        instance = _load(role, args)
        trio.run(run)
    except (OSError, BaseExceptionGroup) as exc:
        # A port already in use or an unwritable audit file: one line, not a traceback.
        error = _os_error(exc)
        if error is None:
            raise
        log.error("cannot start the %s: %s", role, error)
        return 1
    log.info("backchannel %s stopped", role)
    return 0


async def _stop_on_signal(
    scope: trio.CancelScope, instance: Gateway | Connector | None = None, grace: float = 0.0
) -> None:
    """First SIGTERM/SIGINT: GO_AWAY and let open streams finish (up to ``grace`` seconds);
    a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                if instance is None or nursery.child_tasks:
                    log.info("received %s: stopping now", name)
                    scope.cancel()
                    return
                log.info(
                    "received %s: draining open streams for up to %g s (signal again to stop now)",
                    name,
                    grace,
                )
                nursery.start_soon(_drain_then_cancel, instance, grace, scope)


async def _reload_on_sighup(gateway: Gateway) -> None:
    """SIGHUP: take over changed identity providers (trust lists) without a restart."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("received SIGHUP: reloading identity providers from %s", gateway.config.source)
            try:
                gateway.reload_identity_providers()
            except ConfigError as exc:
                log.error("reload failed, the previous identity providers stay: %s", exc)
            except Exception:  # a reload must never stop the gateway
                log.exception("reload failed, the previous identity providers stay")


async def _drain_then_cancel(
    instance: Gateway | Connector, grace: float, scope: trio.CancelScope
) -> None:
    left = await instance.drain(grace)
    if left:
        log.warning("stopping with %d streams still open after %g s", left, grace)
    scope.cancel()


def _demo(args: argparse.Namespace) -> int:
    from ._demo import CONNECTOR_TOML, GATEWAY_TOML, demo_parts, run_demo

    if args.print_config:
        parts = demo_parts()
        work_dir = Path("{work_dir}")
        gateway = GATEWAY_TOML + "".join(part.gateway_toml(work_dir) for part in parts)
        connector = CONNECTOR_TOML + "".join(part.connector_toml(work_dir) for part in parts)
        print("# gateway.toml (placeholders are filled in at start)\n" + gateway)
        print("# connector.toml\n" + connector)
        return 0
    configure_logging(args.log_level, json_lines=args.log_json)

    def print_line(line: str) -> None:
        print(line, flush=True)

    async def run() -> int:
        code = 0  # stays 0 when a signal stops the demo
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            code = await run_demo(once=args.once, print_line=print_line)
            nursery.cancel_scope.cancel()
        return code

    return trio.run(run)


def _plugins(args: argparse.Namespace) -> int:
    manager = get_plugin_manager(_selection(args))
    rows = describe_plugins(manager)
    if not rows:
        print("no plugins installed")
        return 0
    print(f"{'plugin':12} {'version':10} {'state':9} {'roles':20} {'mappings':14} distribution")
    for row in rows:
        roles = ",".join(sorted(r.value for r in row.info.roles)) if row.info else "-"
        mappings = ",".join(row.info.mapping_protocols) if row.info else "-"
        state = "enabled" if row.enabled else "disabled"
        print(
            f"{row.name:12} {row.version:10} {state:9} {roles:20} {mappings:14} {row.distribution}"
        )
    return 0


def _config_check(args: argparse.Namespace) -> int:
    role = args.role
    if role is None:
        import tomllib

        try:
            with args.config.open("rb") as handle:
                role = "gateway" if "gateway" in tomllib.load(handle) else "connector"
        except (OSError, tomllib.TOMLDecodeError):
            role = "connector"  # the loader reports the real problem with file and position
    instance = _load(role, args, check_only=True)
    if isinstance(instance, Gateway):
        doors = ", ".join(door.name for door in instance._front_doors) or "none"
        subaccounts = len(instance.config.subaccounts)
        print(
            f"{args.config}: valid gateway configuration "
            f"({subaccounts} subaccounts; front doors: {doors})"
        )
    else:
        subaccounts = len(instance.config.subaccounts)
        print(
            f"{args.config}: valid connector configuration "
            f"({subaccounts} subaccounts, {len(instance.access.mappings)} system mappings)"
        )
    return 0


def _pki(args: argparse.Namespace) -> int:
    try:
        if args.pki_command == "init-ca":
            ca = CertificateAuthority.create(args.name)
            cert, key = ca.save(args.dir)
            print(
                f"wrote {cert} and {key} "
                "(keep the key private; give ca.pem to connectors as ca_file)"
            )
        else:
            ca = CertificateAuthority.load(args.ca_dir / "ca.pem", args.ca_dir / "ca.key")
            issued = ca.issue_server_certificate(args.host, valid_days=args.days)
            cert, key = issued.save(args.out, "server")
            print(f"wrote {cert} and {key} for {', '.join(args.host)} (use as tls_cert / tls_key)")
    except (OSError, ValueError) as exc:
        print(f"backchannel pki: {exc}", file=sys.stderr)
        return 1
    return 0


def _app_token(args: argparse.Namespace) -> int:
    config = GatewayConfig.from_file(args.config)
    subaccount, _, app = args.app.partition("/")
    sub = config.subaccounts.get(subaccount)
    app_config = sub.apps.get(app) if sub is not None else None
    if app_config is None:
        raise ConfigError(str(args.config), f"subaccounts.{subaccount}.apps.{app}", "no such app")
    print(issue_app_token(AppIdentity(subaccount, app), app_config.secret, ttl=args.ttl))
    return 0
