"""The ``backchannel`` command: help, plugins, config check, demo, pki and app-token.

Most configuration cases call ``main()`` in-process (fast, same code path as the console
script); a few run the real command to pin down exit codes and stream separation.
"""

from __future__ import annotations

import argparse
import base64
import copy
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography import x509

from backchannel import ConnectorConfig, GatewayConfig, HostPort, open_connector, open_gateway
from backchannel._cli import build_parser, main
from tests.harness import (
    APP_SECRET,
    CONNECTOR_TOKEN,
    connector_document,
    echo_server,
    receive_exactly,
    tls_material,
)
from tests.procs import BACKCHANNEL, run_cli, write_secret, write_toml

PROXY_PASSWORD = "proxy-password-for-cli-tests-5f1c"
INLINE_SECRET = "inline-secret-for-cli-tests-93ab"
SECRETS = (APP_SECRET, CONNECTOR_TOKEN, PROXY_PASSWORD, INLINE_SECRET)
UNSET_VARIABLE = "BACKCHANNEL_TEST_VARIABLE_THAT_IS_NOT_SET"


def assert_no_secret(*texts: str) -> None:
    """None of the test secrets appears in any of ``texts``."""
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret leaked into output: {text!r}"


@dataclass(frozen=True)
class Result:
    """What one in-process CLI run returned and printed."""

    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """Run ``backchannel ARGS`` in this process (argparse's exits become exit codes)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert_no_secret(captured.out, captured.err)
    return Result(code, captured.out, captured.err)


# ------------------------------------------------------------------------------- help


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


COMMANDS = sorted(_command_paths(build_parser()))


def test_every_command_is_listed() -> None:
    expected = {
        ("gateway",),
        ("connector",),
        ("demo",),
        ("plugins",),
        ("config",),
        ("config", "check"),
        ("pki",),
        ("pki", "init-ca"),
        ("pki", "server-cert"),
        ("app-token",),
    }
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_subcommand_help_exits_0(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    result = cli(capsys, *command, "--help")
    assert result.code == 0
    assert result.out.startswith(f"usage: backchannel {' '.join(command)}")
    assert result.err == ""


def test_help_and_version_of_the_installed_command() -> None:
    script = Path(sys.executable).with_name("backchannel")  # the console script, if installed
    command = [str(script)] if script.exists() else BACKCHANNEL
    runs = [([*BACKCHANNEL, "--version"], "backchannel "), ([*command, "--help"], "usage: ")]
    for argv, start in runs:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(start)


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys)
    assert result.code == 2
    assert "usage: backchannel" in result.err


# ------------------------------------------------------------------------------- plugins


def _plugin_rows(output: str) -> dict[str, list[str]]:
    lines = output.strip().splitlines()
    assert lines[0].split()[:5] == ["plugin", "version", "state", "roles", "mappings"]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_plugins_lists_tcp_with_roles() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    name, _version, state, roles, mappings, distribution = _plugin_rows(result.stdout)["tcp"]
    assert (name, state, roles, mappings, distribution) == (
        "tcp",
        "enabled",
        "connector,gateway",
        "tcp,tcps",
        "backchannel",
    )


def test_plugins_shows_a_disabled_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "plugins", "--disable-plugin", "tcp")
    assert result.code == 0
    assert _plugin_rows(result.out)["tcp"][2] == "disabled"


# ------------------------------------------------------------------------------- config check


@dataclass(frozen=True)
class Files:
    """A folder with TLS material and secret files, and the two good documents."""

    directory: Path

    def gateway(self) -> dict[str, Any]:
        return {
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls_cert": "tls/server.pem",
                "tls_key": "tls/server.key",
            },
            "audit": {"file": "audit/gateway.jsonl"},
            "subaccounts": {
                "acme": {
                    "connector_token_file": "connector.token",
                    "apps": {"crm": {"secret_file": "app.secret"}},
                }
            },
            "plugins": {
                "tcp": {
                    "socks5_listen": "127.0.0.1:0",
                    "forwards": [
                        {"listen": "127.0.0.1:0", "subaccount": "acme", "target": "db.virtual:5432"}
                    ],
                }
            },
        }

    def connector(self) -> dict[str, Any]:
        return {
            "audit": {"file": "audit/connector.jsonl"},
            "subaccounts": {
                "acme": {
                    "gateway": "wss://gateway.example:8443/tunnel",
                    "token_file": "connector.token",
                    "ca_file": "tls/ca.pem",
                    "https_proxy": f"http://proxyuser:{PROXY_PASSWORD}@proxy.example:3128",
                    "use_environment_proxy": False,
                    "mappings": [
                        {
                            "virtual": "db.virtual:5432",
                            "internal": "db.corp:5432",
                            "protocol": "tcp",
                        },
                        {
                            "virtual": "web.virtual:8000-8010",
                            "internal": "web.corp:9000-9010",
                            "protocol": "tcp",
                        },
                    ],
                }
            },
        }


@pytest.fixture
def files(tmp_path: Path) -> Files:
    tls_material(tmp_path / "tls")
    write_secret(tmp_path / "connector.token", CONNECTOR_TOKEN)
    write_secret(tmp_path / "app.secret", APP_SECRET)
    return Files(tmp_path)


def test_config_check_accepts_good_files(capsys: pytest.CaptureFixture[str], files: Files) -> None:
    gateway = write_toml(files.directory / "gateway.toml", files.gateway())
    connector = write_toml(files.directory / "connector.toml", files.connector())
    result = cli(capsys, "config", "check", "-c", gateway)
    assert result.code == 0, result.err
    assert result.out.startswith(f"{gateway}: valid gateway configuration (1 subaccounts;")
    assert "tcp.socks5" in result.out
    result = cli(capsys, "config", "check", "-c", connector)
    assert result.code == 0, result.err
    assert result.out == (
        f"{connector}: valid connector configuration (1 subaccounts, 2 system mappings)\n"
    )
    # --role overrides the guess: a connector file is not a valid gateway file.
    result = cli(capsys, "config", "check", "--role", "gateway", "-c", connector)
    assert result.code == 2
    assert f"{connector}: gateway.listen: is required" in result.err


def test_config_check_exit_codes_of_the_real_command(files: Files) -> None:
    good = write_toml(files.directory / "connector.toml", files.connector())
    result = run_cli("config", "check", "-c", good)
    assert (result.returncode, result.stderr) == (0, "")
    assert "valid connector configuration" in result.stdout
    document = files.connector()
    document["subaccounts"]["acme"]["gateway"] = 8443
    bad = write_toml(files.directory / "bad.toml", document)
    result = run_cli("config", "check", "-c", bad)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"backchannel: configuration error: {bad}: subaccounts.acme.gateway: "
        "must be a string, not int\n"
    )
    assert_no_secret(result.stdout, result.stderr)


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """Set a dotted ``path`` (``[n]`` indexes a list) in the document."""

    def mutate(document: dict[str, Any]) -> None:
        keys = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        target: Any = document
        for key in keys[:-1]:
            target = target[int(key[1:-1])] if key.startswith("[") else target[key]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        elif last.startswith("["):
            target[int(last[1:-1])] = value
        else:
            target[last] = value

    return mutate


_DELETE = object()


def _both(*mutations: Mutation) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(document)

    return mutate


def _add_mapping(mapping: dict[str, str]) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        document["subaccounts"]["acme"]["mappings"].append(mapping)

    return mutate


@dataclass(frozen=True)
class BadCase:
    """A broken file (or command line) and what the error must say."""

    id: str
    role: str
    mutate: Mutation | None
    key: str
    problem: str
    args: tuple[str, ...] = ()
    raw: str | None = None


BAD_CASES = [
    BadCase(
        "missing-required-key",
        "gateway",
        _set("gateway.tls_cert", _DELETE),
        "gateway.tls_cert",
        "is required",
    ),
    BadCase(
        "missing-gateway-url",
        "connector",
        _set("subaccounts.acme.gateway", _DELETE),
        "subaccounts.acme.gateway",
        "is required",
    ),
    BadCase(
        "wrong-type",
        "gateway",
        _set("gateway.listen", 8443),
        "gateway.listen",
        "must be a string, not int",
    ),
    BadCase(
        "wrong-type-number",
        "connector",
        _set("tunnel", {"heartbeat_interval": "5s"}),
        "tunnel.heartbeat_interval",
        "must be a number, not str",
    ),
    BadCase(
        "wrong-type-boolean",
        "connector",
        _set("subaccounts.acme.use_environment_proxy", "no"),
        "subaccounts.acme.use_environment_proxy",
        "must be true or false, not str",
    ),
    BadCase(
        "unknown-key-typo",
        "connector",
        _set("subaccounts.acme.use_enviroment_proxy", True),
        "subaccounts.acme.use_enviroment_proxy",
        "unknown key (check the spelling",
    ),
    BadCase(
        "unknown-key-in-plugin-table",
        "gateway",
        _set("plugins.tcp.sock5_listen", "127.0.0.1:1080"),
        "plugins.tcp.sock5_listen",
        "unknown key",
    ),
    BadCase(
        "bad-host-port",
        "gateway",
        _set("gateway.listen", "127.0.0.1"),
        "gateway.listen",
        "'127.0.0.1' is not host:port",
    ),
    BadCase(
        "bad-port-number",
        "gateway",
        _set("plugins.tcp.socks5_listen", "127.0.0.1:70000"),
        "plugins.tcp.socks5_listen",
        "port 70000 out of range",
    ),
    BadCase(
        "bad-ipv6-without-brackets",
        "gateway",
        _set("gateway.listen", "::1:8443"),
        "gateway.listen",
        "write IPv6 addresses in brackets",
    ),
    BadCase(
        "mapping-without-port",
        "connector",
        _set("subaccounts.acme.mappings[0].virtual", "db.virtual"),
        "subaccounts.acme.mappings[0].virtual",
        "must be host:port",
    ),
    BadCase(
        "secret-env-not-set",
        "gateway",
        _both(
            _set("subaccounts.acme.connector_token_file", _DELETE),
            _set("subaccounts.acme.connector_token_env", UNSET_VARIABLE),
        ),
        "subaccounts.acme.connector_token_env",
        f"environment variable {UNSET_VARIABLE} is not set",
    ),
    BadCase(
        "secret-given-twice",
        "gateway",
        _set("subaccounts.acme.apps.crm.secret", INLINE_SECRET),
        "subaccounts.acme.apps.crm.secret",
        "set only one of secret, secret_file",
    ),
    BadCase(
        "secret-file-missing",
        "connector",
        _set("subaccounts.acme.token_file", "missing.token"),
        "subaccounts.acme.token_file",
        "cannot read",
    ),
    BadCase(
        "secret-missing",
        "connector",
        _set("subaccounts.acme.token_file", _DELETE),
        "subaccounts.acme.token",
        "is required: set certificate_file (recommended: a registered connector",
    ),
    BadCase(
        "overlapping-mappings",
        "connector",
        _add_mapping({"virtual": "WEB.virtual:8005", "internal": "other:1", "protocol": "tcp"}),
        "subaccounts.acme.mappings[2].virtual",
        "WEB.virtual:8005 overlaps web.virtual:8000-8010",
    ),
    BadCase(
        "protocol-not-served",
        "connector",
        _set("subaccounts.acme.mappings[0].protocol", "ldap"),
        "subaccounts.acme.mappings[0].protocol",
        "'ldap' is not served by an enabled plugin (served: http, https, rfc, tcp, tcps)",
    ),
    BadCase(
        "protocol-of-a-disabled-plugin",
        "connector",
        None,
        "subaccounts.acme.mappings[0].protocol",
        "'tcp' is not served by an enabled plugin (served: http, https, rfc)",
        args=("--disable-plugin", "tcp"),
    ),
    BadCase(
        "unknown-plugin-on-command-line",
        "connector",
        None,
        "--plugins",
        "no plugin named 'nosuch' is installed (found: http, rfc, tcp",
        args=("--plugins", "tcp,nosuch"),
    ),
    BadCase(
        "unknown-plugin-in-file",
        "gateway",
        _set("plugins.enable", ["tcp", "nosuch"]),
        "plugins.enable",
        "no plugin named 'nosuch' is installed",
    ),
    BadCase(
        "table-of-an-unknown-plugin",
        "connector",
        _set("plugins", {"nosuch": {"x": 1}}),
        "plugins.nosuch",
        "no such plugin is enabled",
    ),
    BadCase(
        "forward-to-unknown-subaccount",
        "gateway",
        _set("plugins.tcp.forwards[0].subaccount", "globex"),
        "plugins.tcp.forwards[0].subaccount",
        "subaccount 'globex' is not configured",
    ),
    BadCase(
        "proxy-url-with-password",
        "connector",
        _set("subaccounts.acme.https_proxy", f"http://u:{PROXY_PASSWORD}@proxy.example:99999"),
        "subaccounts.acme.https_proxy",
        "invalid proxy port",
    ),
    BadCase(
        "no-subaccounts",
        "gateway",
        _set("subaccounts", {}),
        "subaccounts",
        "at least one [subaccounts.<name>] table is required",
    ),
    BadCase(
        "invalid-toml",
        "gateway",
        None,
        "",
        "not valid TOML: ",
        raw='[gateway]\nlisten = "127.0.0.1:8443"\ntls_cert = \n',
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.id)
def test_config_check_reports_file_key_and_problem(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    files: Files,
    case: BadCase,
) -> None:
    monkeypatch.delenv(UNSET_VARIABLE, raising=False)
    path = files.directory / f"{case.role}.toml"
    if case.raw is not None:
        path.write_text(case.raw)
    else:
        document = copy.deepcopy(files.gateway() if case.role == "gateway" else files.connector())
        if case.mutate is not None:
            case.mutate(document)
        write_toml(path, document)
    result = cli(capsys, "config", "check", "-c", path, *case.args)
    assert result.code == 2
    assert result.out == ""
    prefix = "backchannel: configuration error: "
    source = "command line" if case.key.startswith("--") else str(path)
    where = f"{source}: {case.key}: " if case.key else f"{source}: "
    assert result.err.startswith(prefix + where), result.err
    assert case.problem in result.err
    assert result.err.count("\n") == 1  # one line, no traceback


def test_invalid_toml_names_the_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nlisten = "127.0.0.1:8443"\ntls_cert = \n')
    result = cli(capsys, "config", "check", "-c", path)
    assert result.code == 2
    assert "line 3" in result.err


def test_config_check_of_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = cli(capsys, "config", "check", "-c", tmp_path / "nowhere.toml")
    assert result.code == 2
    assert result.err == (
        f"backchannel: configuration error: {tmp_path / 'nowhere.toml'}: file not found\n"
    )


def test_gateway_command_fails_on_a_bad_file_before_listening(files: Files) -> None:
    document = files.gateway()
    document["gateway"]["listen"] = "127.0.0.1"
    path = write_toml(files.directory / "gateway.toml", document)
    result = run_cli("gateway", "-c", path)
    assert result.returncode == 2
    assert f"{path}: gateway.listen: " in result.stderr
    assert "tunnel endpoint" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_config_check_leaves_the_audit_file_alone(
    capsys: pytest.CaptureFixture[str], files: Files
) -> None:
    for name, document in (("gateway", files.gateway()), ("connector", files.connector())):
        path = write_toml(files.directory / f"{name}.toml", document)
        assert cli(capsys, "config", "check", "-c", path).code == 0
    assert not (files.directory / "audit").exists()


def test_gateway_command_reports_a_busy_port_in_one_line(files: Files) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        document = files.gateway()
        document["plugins"]["tcp"]["socks5_listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
        path = write_toml(files.directory / "gateway.toml", document)
        result = run_cli("gateway", "-c", path)
    assert result.returncode == 1
    port = document["plugins"]["tcp"]["socks5_listen"]
    assert f"cannot start the gateway: [Errno 98] cannot listen on {port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_connector_command_reports_an_unusable_audit_file(files: Files) -> None:
    document = files.connector()
    document["audit"]["file"] = "connector.token/audit.jsonl"  # below a regular file
    path = write_toml(files.directory / "connector.toml", document)
    result = run_cli("connector", "-c", path, timeout=20)
    assert result.returncode == 1
    assert "cannot start the connector: [Errno 17] File exists: " in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


# ------------------------------------------------------------------------------- demo


def test_demo_once_passes_every_step() -> None:
    result = run_cli("demo", "--once", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in (
        "tunnel",
        "tcp via SOCKS5",
        "tcp via port forward",
        "http over tcp via SOCKS5",
        "access control",
        "rfc via the pyrfc-compatible client",
    ):
        assert re.search(rf"^  \[ok  \] {re.escape(step)}: ", result.stdout, re.MULTILINE), step
    assert "FAIL" not in result.stdout
    assert re.search(r"demo OK: \d+ steps passed$", result.stdout.rstrip())


def test_demo_prints_its_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "demo", "--print-config")
    assert result.code == 0
    assert "[gateway]" in result.out
    assert "[[subaccounts.demo.mappings]]" in result.out


# ------------------------------------------------------------------------------- pki


async def _run(*args: str | Path) -> tuple[int, str, str]:
    process = await trio.run_process(
        [*BACKCHANNEL, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False
    )
    out, err = process.stdout.decode(), process.stderr.decode()
    assert_no_secret(out, err)
    return process.returncode, out, err


@asynccontextmanager
async def _gateway_and_connector(
    gateway_toml: Path, connector_doc: Callable[[int], dict[str, Any]]
) -> AsyncIterator[tuple[HostPort, Any]]:
    """Run the gateway from ``gateway_toml`` and a connector; yields (SOCKS5 address, connector)."""
    async with open_gateway(GatewayConfig.from_file(gateway_toml)) as gateway:
        assert gateway.tunnel_address is not None
        config = ConnectorConfig.from_mapping(
            connector_doc(gateway.tunnel_address.port), source="connector.toml"
        )
        async with open_connector(config) as connector:
            socks = gateway.front_door_addresses.get("tcp.socks5", [HostPort("", 0)])[0]
            yield socks, connector


async def test_pki_files_serve_a_gateway(tmp_path: Path) -> None:
    ca_dir, server_dir = tmp_path / "ca", tmp_path / "server"
    code, out, err = await _run("pki", "init-ca", "--dir", ca_dir, "--name", "Test CA")
    assert (code, err) == (0, "")
    assert str(ca_dir / "ca.pem") in out
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    code, out, err = await _run(
        "pki", "server-cert", "--ca-dir", ca_dir, "--host", "127.0.0.1", "--host", "localhost",
        "--out", server_dir,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert (server_dir / "server.key").stat().st_mode & 0o777 == 0o600
    # Nothing is ever overwritten: a second init-ca fails and leaves the CA alone.
    before = (ca_dir / "ca.key").read_bytes()
    code, out, err = await _run("pki", "init-ca", "--dir", ca_dir)
    assert code == 1
    assert "refusing to overwrite" in err
    assert (ca_dir / "ca.key").read_bytes() == before

    write_secret(tmp_path / "connector.token", CONNECTOR_TOKEN)
    write_secret(tmp_path / "app.secret", APP_SECRET)
    gateway_toml = write_toml(
        tmp_path / "gateway.toml",
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls_cert": "server/server.pem",
                "tls_key": "server/server.key",
            },
            "subaccounts": {
                "acme": {
                    "connector_token_file": "connector.token",
                    "apps": {"crm": {"secret_file": "app.secret"}},
                }
            },
            "plugins": {"tcp": {"socks5_listen": "127.0.0.1:0"}},
        },
    )

    def connector_doc(port: int) -> dict[str, Any]:
        document = connector_document(
            tls_material(tmp_path / "other"), port, tmp_path / "audit.jsonl", []
        )
        document["subaccounts"]["acme"]["ca_file"] = str(ca_dir / "ca.pem")
        return document

    async with _gateway_and_connector(gateway_toml, connector_doc) as (_, connector):
        with trio.fail_after(10):
            await connector.wait_connected()
    # The connector checked the chain for real: the handshake needs the CA written above.
    certificate = x509.load_pem_x509_certificate((server_dir / "server.pem").read_bytes())
    issuer = certificate.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [attribute.value for attribute in issuer] == ["Test CA"]
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


async def test_connector_refuses_a_gateway_signed_by_another_ca(tmp_path: Path) -> None:
    gateway_tls = tls_material(tmp_path / "gateway-tls")
    other_ca = tls_material(tmp_path / "other").ca_file
    write_secret(tmp_path / "connector.token", CONNECTOR_TOKEN)
    gateway_toml = write_toml(
        tmp_path / "gateway.toml",
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls_cert": str(gateway_tls.cert_file),
                "tls_key": str(gateway_tls.key_file),
            },
            "subaccounts": {"acme": {"connector_token_file": "connector.token"}},
        },
    )

    def connector_doc(port: int) -> dict[str, Any]:
        document = connector_document(gateway_tls, port, tmp_path / "audit.jsonl", [])
        document["subaccounts"]["acme"]["ca_file"] = str(other_ca)
        return document

    async with _gateway_and_connector(gateway_toml, connector_doc) as (_, connector):
        status = connector.status["acme"]
        with trio.fail_after(10):  # it keeps trying (with back-off) and says why it fails
            await connector.wait_status(lambda s: s.attempts >= 3 and bool(s.last_error))
        assert "not trusted" in status.last_error
        assert not status.connected


# ------------------------------------------------------------------------------- app-token


async def sap_socks5_connect(
    socks: HostPort, token: str, location: str, host: str, port: int
) -> tuple[int, trio.SocketStream]:
    """SOCKS5 with SAP's method 0x80; returns (reply code, stream)."""
    stream = await trio.open_tcp_stream(socks.host, socks.port)
    await stream.send_all(b"\x05\x01\x80")
    assert await receive_exactly(stream, 2) == b"\x05\x80"
    raw_token = token.encode("ascii")
    raw_location = base64.b64encode(location.encode())
    await stream.send_all(
        b"\x01"
        + struct.pack(">I", len(raw_token))
        + raw_token
        + bytes([len(raw_location)])
        + raw_location
    )
    assert await receive_exactly(stream, 2) == b"\x01\x00"
    raw_host = host.encode()
    await stream.send_all(
        b"\x05\x01\x00\x03" + bytes([len(raw_host)]) + raw_host + struct.pack(">H", port)
    )
    head = await receive_exactly(stream, 4)
    assert head[0] == 5
    address_length = {1: 4, 4: 16}.get(head[3])
    if address_length is None:
        address_length = (await receive_exactly(stream, 1))[0]
    await receive_exactly(stream, address_length + 2)
    return head[1], stream


async def test_app_token_is_accepted_by_socks5_method_0x80(
    tmp_path: Path, files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    gateway_toml = write_toml(files.directory / "gateway.toml", files.gateway())
    code, out, err = await _run("app-token", "-c", gateway_toml, "--app", "acme/crm", "--ttl", "60")
    assert (code, err) == (0, "")
    token = out.strip()
    assert out == token + "\n"
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "acme/crm"
    assert claims["exp"] - claims["iat"] == 60
    code, out, err = await _run("app-token", "-c", gateway_toml, "--app", "acme/nosuch")
    assert code == 2
    assert f"{gateway_toml}: subaccounts.acme.apps.nosuch: no such app" in err

    async with echo_server() as echo_port:

        def connector_doc(port: int) -> dict[str, Any]:
            mapping = {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{echo_port}"}
            return connector_document(
                tls_material(files.directory / "tls"),
                port,
                tmp_path / "connector-audit.jsonl",
                [{**mapping, "protocol": "tcp"}],
                location="berlin",
            )

        async with _gateway_and_connector(gateway_toml, connector_doc) as (socks, connector):
            with trio.fail_after(10):
                await connector.wait_connected()
                reply, stream = await sap_socks5_connect(socks, token, "berlin", "echo.virtual", 7)
                async with stream:
                    assert reply == 0
                    await stream.send_all(b"token accepted")
                    assert await receive_exactly(stream, 14) == b"token accepted"
                # The location id in the 0x80 message picks the tunnel: none at the default one.
                reply, stream = await sap_socks5_connect(socks, token, "", "echo.virtual", 7)
                await stream.aclose()
                assert reply == 0x03
                # A forged token (signature changed) is refused with SAP's 0x05.
                head, _, signature = token.rpartition(".")
                forged = head + "." + ("A" if signature[0] != "A" else "B") + signature[1:]
                reply, stream = await sap_socks5_connect(socks, forged, "berlin", "echo.virtual", 7)
                await stream.aclose()
                assert reply == 0x05
    assert_no_secret(caplog.text, token)
