"""gateway.toml and connector.toml: the shipped examples load, and every documented error names
file, key and problem (docs/configuration.md, "Errors")."""

from __future__ import annotations

import os
import shutil
import ssl
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backchannel import (
    ConfigError,
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    Secret,
    TunnelSettings,
)
from backchannel._cli import EXIT_CONFIG, main
from backchannel._pki import CertificateAuthority, TlsMaterial, write_throwaway_tls_material

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

CONNECTOR_TOKEN = "connector-token-value-7f3a9c"
APP_SECRET = "app-secret-value-0d5e21"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tls_source(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """One throwaway CA and gateway certificate, copied into each test's folder."""
    return write_throwaway_tls_material(tmp_path_factory.mktemp("tls") / "tls")


@pytest.fixture
def base(tmp_path: Path, tls_source: TlsMaterial) -> Path:
    """A config folder with tls/{ca,server}.pem, tls/server.key and the secrets/ files."""
    folder = tmp_path / "config"
    (folder / "tls").mkdir(parents=True)
    for source in (tls_source.ca_file, tls_source.cert_file, tls_source.key_file):
        shutil.copy(source, folder / "tls" / source.name)
    (folder / "secrets").mkdir()
    (folder / "secrets" / "connector.token").write_text(CONNECTOR_TOKEN + "\n")
    (folder / "secrets" / "crm.secret").write_text(APP_SECRET + "\n")
    return folder


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load(path: Path) -> Gateway | Connector:
    """What ``backchannel config check`` does: parse, then build (plugins validate their tables)."""
    with path.open("rb") as handle:
        is_gateway = "gateway" in tomllib.load(handle)
    instance: Gateway | Connector
    if is_gateway:
        instance = Gateway(GatewayConfig.from_file(path))
    else:
        instance = Connector(ConnectorConfig.from_file(path))
    instance.audit.close()
    return instance


def expect_error(path: Path, key: str, problem: str) -> ConfigError:
    """Loading ``path`` fails with a message ``<file>: <key>: <problem...>``."""
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value
    assert error.source == str(path)
    assert error.key == key
    assert problem in error.problem
    assert str(error) == f"{path}: {key}: {error.problem}"
    return error


GATEWAY = """\
[gateway]
listen = "127.0.0.1:0"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"

[subaccounts.acme]
connector_token_file = "secrets/connector.token"

[subaccounts.acme.apps.crm]
secret_file = "secrets/crm.secret"
"""

CONNECTOR = """\
[subaccounts.acme]
gateway = "wss://gateway.example:8443/tunnel"
token_file = "secrets/connector.token"
ca_file = "tls/ca.pem"
use_environment_proxy = false
"""


def mapping(virtual: str, internal: str, protocol: str = "tcp", extra: str = "") -> str:
    return (
        f'\n[[subaccounts.acme.mappings]]\nvirtual = "{virtual}"\ninternal = "{internal}"\n'
        f'protocol = "{protocol}"\n{extra}'
    )


# --------------------------------------------------------------------------- the examples


SECRET_KEYS = ("connector_token_file", "secret_file", "token_file")


def _references(table: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(table, dict):
        for name, value in table.items():
            yield from _references(value, name)
    elif isinstance(table, list):
        for item in table:
            yield from _references(item, key)
    elif isinstance(table, str):
        yield key, table


def materialise(example: str, tmp_path: Path, tls: TlsMaterial) -> Path:
    """Copy an example file and create every certificate and secret file it refers to."""
    folder = tmp_path / "example"
    folder.mkdir(exist_ok=True)
    path = folder / example
    shutil.copy(EXAMPLES / example, path)
    pem = {
        "tls_cert": tls.cert_file,
        "client_cert": tls.cert_file,
        "tls_key": tls.key_file,
        "client_key": tls.key_file,
        "ca_file": tls.ca_file,
    }
    document = tomllib.loads(path.read_text())
    for key, value in _references(document):
        target = folder / value
        if key in pem:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pem[key], target)
        elif key in SECRET_KEYS:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(CONNECTOR_TOKEN if key != "secret_file" else APP_SECRET)
        else:
            assert not key.endswith(("_file", "_env")), f"teach this test about {key}"
    return path


def test_example_gateway_toml_is_valid(tmp_path: Path, tls_source: TlsMaterial) -> None:
    path = materialise("gateway.toml", tmp_path, tls_source)
    config = GatewayConfig.from_file(path)
    gateway = Gateway(config)  # builds the plugins' front doors; does not listen
    gateway.audit.close()
    assert config.path == "/tunnel"
    assert config.tls_cert == path.parent / "tls" / "server.pem"
    assert config.audit.file == path.parent / "audit" / "gateway-audit.jsonl"
    sub = config.subaccounts["acme"]
    assert sub.connector_token is not None
    assert sub.connector_token.reveal() == CONNECTOR_TOKEN
    assert sub.apps["crm"].secret.reveal() == APP_SECRET
    assert config.plugins.only == ("tcp",)
    assert "socks5_listen" in config.plugin_tables["tcp"]
    names = sorted(door.name for door in gateway._front_doors)
    assert names == ["tcp.forward[127.0.0.1:16379→redis.virtual:6379]", "tcp.socks5"]


def test_example_connector_toml_is_valid(tmp_path: Path, tls_source: TlsMaterial) -> None:
    path = materialise("connector.toml", tmp_path, tls_source)
    config = ConnectorConfig.from_file(path)
    connector = Connector(config)  # checks the mappings against the plugins; does not dial
    connector.audit.close()
    sub = config.subaccounts["acme"]
    assert sub.token is not None
    assert sub.token.reveal() == CONNECTOR_TOKEN
    assert sub.ca_file == path.parent / "tls" / "ca.pem"
    assert sub.location == ""
    assert sub.use_environment_proxy is False
    assert (config.reconnect_min_delay, config.reconnect_max_delay) == (0.1, 30.0)
    mapped = {m.virtual_text: m for m in connector.access.mappings}
    assert set(mapped) == {
        "redis.virtual:6379",
        "web.virtual:80",
        "cluster.virtual:7000-7002",
        "ldap.virtual:389",
    }
    assert mapped["cluster.virtual:7000-7002"].internal_for(7001) == HostPort("10.0.0.7", 17001)
    assert mapped["ldap.virtual:389"].protocol == "tcps"


def test_examples_fit_together() -> None:
    """The connector example dials the gateway example's endpoint for a subaccount it has."""
    gateway = tomllib.loads((EXAMPLES / "gateway.toml").read_text())
    connector = tomllib.loads((EXAMPLES / "connector.toml").read_text())
    assert set(connector["subaccounts"]) <= set(gateway["subaccounts"])
    port = gateway["gateway"]["listen"].rpartition(":")[2]
    for name, sub in connector["subaccounts"].items():
        assert sub["gateway"] == f"wss://localhost:{port}{gateway['gateway']['path']}"
        assert sub["token_file"] == gateway["subaccounts"][name]["connector_token_file"]
    forward = gateway["plugins"]["tcp"]["forwards"][0]
    virtual = {m["virtual"] for m in connector["subaccounts"][forward["subaccount"]]["mappings"]}
    assert forward["target"] in virtual


def test_toml_blocks_in_the_configuration_reference_parse() -> None:
    text = (DOCS / "configuration.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```toml\n")[1:]]
    assert len(blocks) >= 5
    for block in blocks:
        tomllib.loads(block)


# --------------------------------------------------------------------------- accepted values


def test_minimal_files_get_the_documented_defaults(base: Path) -> None:
    gateway = GatewayConfig.from_file(write(base, GATEWAY, "gateway.toml"))
    connector = ConnectorConfig.from_file(write(base, CONNECTOR, "connector.toml"))
    assert gateway.path == "/tunnel"
    assert gateway.tunnel == TunnelSettings() == connector.tunnel
    assert TunnelSettings().heartbeat_interval == 10
    assert TunnelSettings().heartbeat_timeout == 30
    assert TunnelSettings().handshake_timeout == 10
    assert TunnelSettings().max_message_size == 1024 * 1024
    assert TunnelSettings().output_high_water == 2 * 1024 * 1024
    mux = TunnelSettings().mux
    assert (mux.initial_window, mux.max_frame_size, mux.max_concurrent_streams) == (
        1024 * 1024,
        1024 * 1024,
        10_000,
    )
    assert gateway.audit.file is None
    assert gateway.audit.include_allowed is False
    assert gateway.plugins.only is None
    assert gateway.plugins.disabled == ()
    assert (connector.reconnect_min_delay, connector.reconnect_max_delay) == (0.1, 2.0)
    sub = connector.subaccounts["acme"]
    assert sub.location == ""
    assert sub.proxy is None
    assert (
        ConnectorConfig.from_mapping(
            {"subaccounts": {"acme": {"gateway": "wss://g/", "token": "t"}}}
        )
        .subaccounts["acme"]
        .use_environment_proxy
    )


def test_tunnel_settings_are_read_on_both_sides(base: Path) -> None:
    tunnel = """
[tunnel]
heartbeat_interval = 2
heartbeat_timeout = 7.5
handshake_timeout = 3
initial_window = 65536
max_frame_size = 32768
max_concurrent_streams = 50
max_message_size = 65536
output_high_water = 131072
"""
    gateway = GatewayConfig.from_file(write(base, GATEWAY + tunnel, "gateway.toml"))
    connector_tunnel = tunnel + "reconnect_min_delay = 0.5\nreconnect_max_delay = 60\n"
    connector = ConnectorConfig.from_file(write(base, connector_tunnel + CONNECTOR, "c.toml"))
    for settings in (gateway.tunnel, connector.tunnel):
        assert settings.heartbeat_interval == 2.0  # an integer is fine where a number is asked
        assert settings.heartbeat_timeout == 7.5
        assert settings.handshake_timeout == 3.0
        assert settings.mux.initial_window == 65536
        assert settings.mux.max_frame_size == 32768
        assert settings.mux.max_concurrent_streams == 50
        assert settings.max_message_size == 65536
        assert settings.output_high_water == 131072
    assert (connector.reconnect_min_delay, connector.reconnect_max_delay) == (0.5, 60.0)


def test_relative_paths_are_taken_from_the_config_files_folder(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(base, GATEWAY + '\n[audit]\nfile = "audit/gw.jsonl"\n', "gateway.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = GatewayConfig.from_file(Path(os.path.relpath(path, elsewhere)))
    assert config.tls_cert.resolve() == (base / "tls" / "server.pem").resolve()
    assert config.tls_key.resolve() == (base / "tls" / "server.key").resolve()
    assert config.audit.file is not None
    assert config.audit.file.resolve() == (base / "audit" / "gw.jsonl").resolve()
    assert config.subaccounts["acme"].connector_token is not None
    assert config.subaccounts["acme"].connector_token.reveal() == CONNECTOR_TOKEN


def test_absolute_paths_are_kept(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(base / "tls" / "ca.pem", other / "gateway-ca.pem")
    text = CONNECTOR.replace('"tls/ca.pem"', f'"{other / "gateway-ca.pem"}"')
    config = ConnectorConfig.from_file(write(base, text))
    assert config.subaccounts["acme"].ca_file == other / "gateway-ca.pem"


def test_secret_sources(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_file`` is read and stripped; ``_env`` is read as is; inline is the value itself."""
    (base / "secrets" / "padded").write_text("  padded-secret \n\n")
    monkeypatch.setenv("BC_TEST_APP_SECRET", " env-secret ")
    text = GATEWAY.replace('"secrets/connector.token"', '"secrets/padded"') + (
        '\n[subaccounts.acme.apps.env]\nsecret_env = "BC_TEST_APP_SECRET"\n'
        '\n[subaccounts.acme.apps.inline]\nsecret = "inline-secret"\n'
    )
    path = write(base, text)
    sub = GatewayConfig.from_file(path).subaccounts["acme"]
    assert sub.connector_token is not None
    assert sub.connector_token.reveal() == "padded-secret"
    assert sub.connector_token.origin == f"file {base / 'secrets' / 'padded'}"
    assert sub.apps["env"].secret.reveal() == " env-secret "
    assert sub.apps["env"].secret.origin == "environment variable BC_TEST_APP_SECRET"
    assert sub.apps["inline"].secret.reveal() == "inline-secret"
    assert sub.apps["inline"].secret.origin == f"{path}: subaccounts.acme.apps.inline.secret"


def test_secret_repr_never_shows_the_value(base: Path) -> None:
    secret = Secret("hunter2-value", "file /etc/backchannel/token")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert f"{secret}" == "Secret(from file /etc/backchannel/token)"
    assert "hunter2" not in f"{[secret]!r} { ({'k': secret}) }"
    config = GatewayConfig.from_file(write(base, GATEWAY))
    for text in (repr(config), str(config)):
        assert CONNECTOR_TOKEN not in text
        assert APP_SECRET not in text
        assert "Secret(from file" in text
    connector = ConnectorConfig.from_file(write(base, CONNECTOR, "c.toml"))
    assert CONNECTOR_TOKEN not in repr(connector)


def test_ipv6_addresses_in_brackets(base: Path) -> None:
    text = GATEWAY.replace('"127.0.0.1:0"', '"[::1]:8443"')
    assert GatewayConfig.from_file(write(base, text)).listen == HostPort("::1", 8443)
    text = CONNECTOR.replace("gateway.example", "[2001:db8::1]") + mapping(
        "[fd00::7]:80", "[::1]:8080"
    )
    connector = load(write(base, text, "c.toml"))
    assert isinstance(connector, Connector)
    assert connector.config.subaccounts["acme"].gateway.host == "2001:db8::1"
    (only,) = connector.access.mappings
    assert only.internal_for(80) == HostPort("::1", 8080)


def test_mapping_without_internal_port_keeps_the_virtual_ports(base: Path) -> None:
    text = CONNECTOR + mapping("db.virtual:5432-5433", "db.corp.example")
    connector = load(write(base, text))
    assert isinstance(connector, Connector)
    (only,) = connector.access.mappings
    assert only.internal_for(5433) == HostPort("db.corp.example", 5433)


def test_https_proxy_is_parsed_and_redacted(base: Path) -> None:
    text = CONNECTOR + 'https_proxy = "http://user:pa%40ss@proxy.corp:3128"\n'
    proxy = ConnectorConfig.from_file(write(base, text)).subaccounts["acme"].proxy
    assert proxy is not None
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp",
        3128,
        "user",
        "pa@ss",
    )
    assert "pa@ss" not in repr(proxy)
    assert proxy.redacted() == "http://user:***@proxy.corp:3128"


def test_plugin_selection(base: Path) -> None:
    text = GATEWAY + '\n[plugins]\nenable = ["tcp"]\ndisable = []\n'
    config = GatewayConfig.from_file(write(base, text))
    assert (config.plugins.only, config.plugins.disabled) == (("tcp",), ())
    gateway = load(write(base, GATEWAY + '\n[plugins]\ndisable = ["tcp"]\n'))
    assert isinstance(gateway, Gateway)
    assert gateway._front_doors == []


def test_config_check_exit_codes(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(base, GATEWAY + '\n[plugins.tcp]\nsocks5_listen = "127.0.0.1:0"\n', "gw.toml")
    assert main(["config", "check", "-c", str(good)]) == 0
    assert "valid gateway configuration" in capsys.readouterr().out
    bad = write(base, CONNECTOR.replace("wss://", "https://"), "bad.toml")
    assert main(["config", "check", "-c", str(bad)]) == EXIT_CONFIG == 2
    err = capsys.readouterr().err
    assert err.startswith(f"backchannel: configuration error: {bad}: subaccounts.acme.gateway: ")
    assert "must start with wss://" in err


# --------------------------------------------------------------------------- errors: gateway


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found") as info:
        GatewayConfig.from_file(path)
    assert str(info.value) == f"{path}: file not found"


def test_not_toml(base: Path) -> None:
    path = write(base, "[gateway\nlisten = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1") as info:
        GatewayConfig.from_file(path)
    assert info.value.source == str(path)


def test_missing_key(base: Path) -> None:
    expect_error(
        write(base, GATEWAY.replace('tls_key = "tls/server.key"\n', "")),
        "gateway.tls_key",
        "is required",
    )


def test_missing_table_means_missing_keys(base: Path) -> None:
    path = write(base, "[subaccounts.acme]\nconnector_token = 'x'\n[gateway]\n")
    expect_error(path, "gateway.listen", "is required")


def test_wrong_type(base: Path) -> None:
    path = write(base, GATEWAY.replace('"127.0.0.1:0"', "8443"))
    expect_error(path, "gateway.listen", "must be a string, not int")


def test_boolean_given_for_an_integer(base: Path) -> None:
    path = write(base, GATEWAY + "\n[tunnel]\nmax_concurrent_streams = true\n")
    expect_error(path, "tunnel.max_concurrent_streams", "must be an integer, not a boolean")


def test_boolean_given_for_a_number(base: Path) -> None:
    path = write(base, GATEWAY + "\n[tunnel]\nheartbeat_interval = false\n")
    expect_error(path, "tunnel.heartbeat_interval", "must be a number, not a boolean")


def test_float_given_for_an_integer(base: Path) -> None:
    path = write(base, GATEWAY + "\n[tunnel]\ninitial_window = 65536.0\n")
    expect_error(path, "tunnel.initial_window", "must be an integer, not float")


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("initial_window = 1024", "initial_window", "between 16384 and 2147483647, got 1024"),
        ("max_frame_size = 33554432", "max_frame_size", "between 16384 and 16777216"),
        ("max_concurrent_streams = 0", "max_concurrent_streams", "between 1 and 1000000, got 0"),
        ("max_message_size = 1000", "max_message_size", "between 16384 and 8388608"),
        ("output_high_water = 1", "output_high_water", "between 16384 and 268435456"),
        ("heartbeat_interval = 0.01", "heartbeat_interval", "between 0.05 and 3600, got 0.01"),
        ("heartbeat_timeout = 9000", "heartbeat_timeout", "between 0.1 and 7200, got 9000"),
        ("handshake_timeout = 0", "handshake_timeout", "between 0.1 and 600, got 0"),
    ],
)
def test_out_of_range(base: Path, line: str, key: str, problem: str) -> None:
    expect_error(write(base, GATEWAY + f"\n[tunnel]\n{line}\n"), f"tunnel.{key}", problem)


def test_heartbeat_timeout_must_exceed_the_interval(base: Path) -> None:
    text = GATEWAY + "\n[tunnel]\nheartbeat_interval = 10\nheartbeat_timeout = 10\n"
    expect_error(write(base, text), "tunnel.heartbeat_timeout", "longer than heartbeat_interval")
    # Raising only the interval above the default timeout (30 s) trips the same check.
    text = CONNECTOR + "\n[tunnel]\nheartbeat_interval = 40\n"
    expect_error(write(base, text), "tunnel.heartbeat_timeout", "longer than heartbeat_interval")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GATEWAY.replace("listen =", "lisen = 1\nlisten ="), "gateway.lisen"),
        (GATEWAY + "\n[gatway]\nlisten = 1\n", "gatway"),
        (GATEWAY + "\n[audit]\nfile = 'a.jsonl'\ninclude_allowd = true\n", "audit.include_allowd"),
        (GATEWAY + "connector_token_fil = 'x'\n", "subaccounts.acme.apps.crm.connector_token_fil"),
        (
            GATEWAY.replace("[subaccounts.acme.apps", "x = 1\n[subaccounts.acme.apps"),
            "subaccounts.acme.x",
        ),
        (GATEWAY + "\n[plugins.tcp]\nsocks_listen = '127.0.0.1:0'\n", "plugins.tcp.socks_listen"),
        (CONNECTOR + "\n[tunnel]\nreconnect_delay = 1\n", "tunnel.reconnect_delay"),
        (CONNECTOR + "tokn = 'x'\n", "subaccounts.acme.tokn"),
        (
            CONNECTOR + mapping("a.virtual:1", "a.corp:1", extra="descripton = 'x'\n"),
            "subaccounts.acme.mappings[0].descripton",
        ),
    ],
)
def test_unknown_key(base: Path, text: str, key: str) -> None:
    expect_error(write(base, text), key, "unknown key")


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("localhost", "'localhost' is not host:port"),
        (":8443", "':8443' is not host:port"),
        ("localhost:https", "port 'https' is not a number"),
        ("localhost:70000", "port 70000 out of range"),
        ("localhost:-1", "port '-1' is not a number"),
    ],
)
def test_bad_host_port(base: Path, listen: str, problem: str) -> None:
    expect_error(write(base, GATEWAY.replace("127.0.0.1:0", listen)), "gateway.listen", problem)


def test_ipv6_without_brackets(base: Path) -> None:
    path = write(base, GATEWAY.replace("127.0.0.1:0", "::1:8443"))
    expect_error(path, "gateway.listen", "write IPv6 addresses in brackets, like [::1]:8443")


def test_tunnel_path_must_start_with_a_slash(base: Path) -> None:
    text = GATEWAY.replace("tls_cert", 'path = "tunnel"\ntls_cert')
    expect_error(write(base, text), "gateway.path", "must start with '/'")


def test_certificate_file_missing(base: Path) -> None:
    (base / "tls" / "server.pem").unlink()
    error = expect_error(
        write(base, GATEWAY), "gateway.tls_cert", "does not exist or is not a file"
    )
    assert str(base / "tls" / "server.pem") in error.problem


def test_secret_missing(base: Path) -> None:
    text = GATEWAY.replace('connector_token_file = "secrets/connector.token"\n', "")
    expect_error(
        write(base, text),
        "subaccounts.acme.connector_token",
        "is required: set connector_token_file (recommended) or connector_token_env",
    )


def test_secret_given_twice(base: Path) -> None:
    text = GATEWAY.replace(
        "connector_token_file =", f'connector_token = "{CONNECTOR_TOKEN}"\nconnector_token_file ='
    )
    error = expect_error(
        write(base, text),
        "subaccounts.acme.connector_token",
        "set only one of connector_token, connector_token_file",
    )
    assert CONNECTOR_TOKEN not in str(error)


def test_secret_file_missing(base: Path) -> None:
    (base / "secrets" / "crm.secret").unlink()
    error = expect_error(
        write(base, GATEWAY), "subaccounts.acme.apps.crm.secret_file", "cannot read"
    )
    assert str(base / "secrets" / "crm.secret") in error.problem
    assert "No such file or directory" in error.problem


def test_secret_env_var_unset(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BC_TEST_UNSET_TOKEN", raising=False)
    text = CONNECTOR.replace(
        'token_file = "secrets/connector.token"', 'token_env = "BC_TEST_UNSET_TOKEN"'
    )
    expect_error(
        write(base, text),
        "subaccounts.acme.token_env",
        "environment variable BC_TEST_UNSET_TOKEN is not set",
    )


@pytest.mark.parametrize("source", ["file", "env", "inline"])
def test_empty_secret(base: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    (base / "secrets" / "blank").write_text(" \n")
    monkeypatch.setenv("BC_TEST_EMPTY", "")
    line = {
        "file": ('token_file = "secrets/blank"', "token_file", "is empty"),
        "env": ('token_env = "BC_TEST_EMPTY"', "token_env", "is empty"),
        "inline": ('token = ""', "token", "must be a non-empty string"),
    }[source]
    text = CONNECTOR.replace('token_file = "secrets/connector.token"', line[0])
    expect_error(write(base, text), f"subaccounts.acme.{line[1]}", line[2])


def test_secret_must_be_a_string(base: Path) -> None:
    text = CONNECTOR.replace('token_file = "secrets/connector.token"', "token = 12345")
    expect_error(write(base, text), "subaccounts.acme.token", "must be a non-empty string")


def test_at_least_one_subaccount(base: Path) -> None:
    text = GATEWAY.split("[subaccounts.acme]")[0]
    expect_error(write(base, text), "subaccounts", "at least one [subaccounts.<name>] table")
    expect_error(write(base, "[tunnel]\n"), "subaccounts", "at least one")


def test_bad_app_name(base: Path) -> None:
    text = GATEWAY + '\n[subaccounts.acme.apps."-crm"]\nsecret = "x"\n'
    with pytest.raises(ConfigError, match=r"app '-crm' must be 1-64 letters"):
        load(write(base, text))


def test_unknown_plugin_table(base: Path) -> None:
    text = GATEWAY + "\n[plugins.nope]\nx = 1\n"
    expect_error(write(base, text), "plugins.nope", "no such plugin is enabled")
    expect_error(write(base, CONNECTOR + text[len(GATEWAY) :]), "plugins.nope", "no such plugin")


def test_table_of_a_disabled_plugin(base: Path) -> None:
    text = (
        GATEWAY + '\n[plugins]\ndisable = ["tcp"]\n\n[plugins.tcp]\nsocks5_listen = "127.0.0.1:0"\n'
    )
    expect_error(write(base, text), "plugins.tcp", "no such plugin is enabled")


def test_plugin_that_is_not_installed(base: Path) -> None:
    text = GATEWAY + '\n[plugins]\nenable = ["tcp", "ftp"]\n'
    expect_error(write(base, text), "plugins.enable", "no plugin named 'ftp' is installed (found: ")
    text = CONNECTOR + '\n[plugins]\ndisable = ["ftp"]\n'
    expect_error(write(base, text), "plugins.disable", "no plugin named 'ftp' is installed")


def test_misspelt_selection_key_reads_as_a_plugin_table(base: Path) -> None:
    text = GATEWAY + "\n[plugins]\nenabled = ['tcp']\n"
    expect_error(write(base, text), "plugins.enabled", "must be a table, not list")


def test_plugin_list_must_hold_strings(base: Path) -> None:
    expect_error(
        write(base, GATEWAY + "\n[plugins]\nenable = [1]\n"),
        "plugins.enable[0]",
        "must be a string",
    )


# --------------------------------------------------------------------------- errors: TCP plugin


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ('socks5_listen = "0.0.0.0"', "plugins.tcp.socks5_listen", "is not host:port"),
        (
            'socks5_listen = "::1:1080"',
            "plugins.tcp.socks5_listen",
            "write IPv6 addresses in brackets",
        ),
        ("handshake_timeout = 0", "plugins.tcp.handshake_timeout", "between 0.1 and 600"),
        ("connect_timeout = 601", "plugins.tcp.connect_timeout", "between 0.1 and 600"),
        (
            '[[plugins.tcp.forwards]]\nlisten = "127.0.0.1:0"\n'
            'subaccount = "globex"\ntarget = "a:1"',
            "plugins.tcp.forwards[0].subaccount",
            "subaccount 'globex' is not configured",
        ),
        (
            '[[plugins.tcp.forwards]]\nlisten = "127.0.0.1:0"\nsubaccount = "acme"\ntarget = "a:0"',
            "plugins.tcp.forwards[0].target",
            "port 0 out of range",
        ),
        (
            '[[plugins.tcp.forwards]]\nlisten = "127.0.0.1:0"\nsubaccount = "acme"',
            "plugins.tcp.forwards[0].target",
            "is required",
        ),
        (
            '[[plugins.tcp.forwards]]\nlisten = "127.0.0.1:0"\n'
            'subaccount = "acme"\ntarget = "a:1"\nport = 1',
            "plugins.tcp.forwards[0].port",
            "unknown key",
        ),
    ],
)
def test_tcp_plugin_gateway_keys(base: Path, table: str, key: str, problem: str) -> None:
    text = GATEWAY + "\n[plugins.tcp]\n" + table + "\n"
    expect_error(write(base, text), key, problem)


def test_tcp_plugin_connector_keys(base: Path) -> None:
    expect_error(
        write(base, CONNECTOR + "\n[plugins.tcp]\nconnect_timeout = true\n"),
        "plugins.tcp.connect_timeout",
        "must be a number, not a boolean",
    )
    # A [plugins.tcp] table written for the gateway is accepted by the connector too.
    shared = '\n[plugins.tcp]\nsocks5_listen = "127.0.0.1:0"\nhandshake_timeout = 5\n'
    load(write(base, CONNECTOR + shared))


# --------------------------------------------------------------------------- errors: connector


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://gateway.example/tunnel", "tunnel URL must start with wss://"),
        ("ws://gateway.example/tunnel", "tunnel URL must start with wss://"),
        ("gateway.example:8443", "tunnel URL must start with wss://"),
        ("wss:///tunnel", "has no host"),
        ("wss://gateway.example:99999/tunnel", "has an invalid port"),
    ],
)
def test_gateway_url_must_be_wss(base: Path, url: str, problem: str) -> None:
    text = CONNECTOR.replace("wss://gateway.example:8443/tunnel", url)
    expect_error(write(base, text), "subaccounts.acme.gateway", problem)


def test_gateway_url_must_not_carry_credentials(base: Path) -> None:
    text = CONNECTOR.replace("wss://", "wss://acme:hunter2@")
    error = expect_error(
        write(base, text), "subaccounts.acme.gateway", "must not carry credentials"
    )
    assert "hunter2" not in str(error)


def test_gateway_url_is_required(base: Path) -> None:
    text = CONNECTOR.replace('gateway = "wss://gateway.example:8443/tunnel"\n', "")
    expect_error(write(base, text), "subaccounts.acme.gateway", "is required")


@pytest.mark.parametrize("location", ["plant 2", "x" * 65, "köln", "a/b"])
def test_bad_location_id(base: Path, location: str) -> None:
    text = CONNECTOR + f'location = "{location}"\n'
    expect_error(write(base, text), "subaccounts.acme.location", "must be up to 64 letters")


def test_reconnect_max_below_min(base: Path) -> None:
    text = "[tunnel]\nreconnect_min_delay = 5\nreconnect_max_delay = 1\n" + CONNECTOR
    expect_error(
        write(base, text), "tunnel.reconnect_max_delay", "must not be below reconnect_min_delay"
    )


def test_bad_https_proxy(base: Path) -> None:
    text = CONNECTOR + 'https_proxy = "socks5://user:hunter2@proxy:1080"\n'
    error = expect_error(
        write(base, text), "subaccounts.acme.https_proxy", "unsupported proxy scheme"
    )
    assert "hunter2" not in str(error)


def test_ca_file_missing(base: Path) -> None:
    (base / "tls" / "ca.pem").unlink()
    expect_error(write(base, CONNECTOR), "subaccounts.acme.ca_file", "does not exist")


def test_mappings_must_be_an_array_of_tables(base: Path) -> None:
    text = CONNECTOR + '\n[subaccounts.acme.mappings]\nvirtual = "a:1"\n'
    expect_error(
        write(base, text), "subaccounts.acme.mappings", "must be an array of tables, not dict"
    )


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("db.virtual:5432", "db.virtual:5432", "db.virtual:5432 overlaps db.virtual:5432"),
        (
            "db.virtual:7000-7010",
            "DB.Virtual.:7005",
            "DB.Virtual.:7005 overlaps db.virtual:7000-7010",
        ),
        ("db.virtual:7000-7010", "db.virtual:6990-7000", "overlaps db.virtual:7000-7010"),
    ],
)
def test_overlapping_mappings(base: Path, first: str, second: str, message: str) -> None:
    text = CONNECTOR + mapping(first, "db.corp:7000") + mapping(second, "db2.corp:7000", "tcps")
    # The ports of a range map one by one, so the internal side needs as many ports.
    text = text.replace('internal = "db.corp:7000"', f'internal = "db.corp:{first.split(":")[1]}"')
    text = text.replace(
        'internal = "db2.corp:7000"', f'internal = "db2.corp:{second.split(":")[1]}"'
    )
    error = expect_error(write(base, text), "subaccounts.acme.mappings[1].virtual", message)
    assert "a virtual port may be mapped only once" in error.problem


def test_adjacent_ranges_and_other_subaccounts_do_not_overlap(base: Path) -> None:
    text = (
        CONNECTOR
        + mapping("db.virtual:7000-7004", "db.corp")
        + mapping("db.virtual:7005-7009", "db2.corp")
    )
    other = CONNECTOR.replace("[subaccounts.acme]", "[subaccounts.globex]")
    text += "\n" + other + mapping("db.virtual:7000", "db3.corp").replace("acme", "globex")
    connector = load(write(base, text))
    assert isinstance(connector, Connector)
    assert len(connector.access.mappings) == 3


def test_internal_range_length_mismatch(base: Path) -> None:
    text = CONNECTOR + mapping("db.virtual:7000-7002", "db.corp:8000-8001")
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].internal",
        "port range has 2 ports, the virtual one 3",
    )


@pytest.mark.parametrize(
    ("virtual", "internal", "key", "problem"),
    [
        ("db.virtual", "db.corp:1", "virtual", "'db.virtual' must be host:port or host:first-last"),
        ("db.virtual:0", "db.corp:1", "virtual", "ports must be within 1-65535"),
        ("db.virtual:20-10", "db.corp", "virtual", "first <= last"),
        ("db.virtual:x", "db.corp:1", "virtual", "ports must be a number or a range"),
        ("bad host:1", "db.corp:1", "virtual", "'bad host' is not a valid host name"),
        ("db.virtual:1", "db_corp..x:1", "internal", "is not a valid host name or IP address"),
        ("db.virtual:1", "fd00::1:1", "internal", "must be host:port or host:first-last"),
    ],
)
def test_bad_mapping_target(
    base: Path, virtual: str, internal: str, key: str, problem: str
) -> None:
    text = CONNECTOR + mapping(virtual, internal)
    expect_error(write(base, text), f"subaccounts.acme.mappings[0].{key}", problem)


def test_mapping_keys_are_required(base: Path) -> None:
    text = CONNECTOR + '\n[[subaccounts.acme.mappings]]\nvirtual = "a:1"\ninternal = "b:1"\n'
    expect_error(write(base, text), "subaccounts.acme.mappings[0].protocol", "is required")


def test_mapping_protocol_not_served(base: Path) -> None:
    text = CONNECTOR + mapping("erp.virtual:3300", "erp.corp:3300", "ldap")
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].protocol",
        "'ldap' is not served by an enabled plugin (served: http, https, rfc, tcp, tcps)",
    )
    text = (
        CONNECTOR
        + mapping("db.virtual:1", "db.corp:1")
        + '\n[plugins]\ndisable = ["tcp", "http", "rfc"]\n'
    )
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].protocol",
        "'tcp' is not served by an enabled plugin (served: none (no plugin enabled))",
    )


def test_tcps_options(base: Path) -> None:
    extra = 'ca_file = "tls/ca.pem"\nserver_name = "ldap.corp.example"\n'
    extra += 'client_cert = "tls/server.pem"\nclient_key = "tls/server.key"\n'
    connector = load(
        write(base, CONNECTOR + mapping("ldap.virtual:389", "10.1.1.1:636", "tcps", extra))
    )
    assert isinstance(connector, Connector)
    (only,) = connector.access.mappings
    tcps: Any = only.options
    options = tcps.tls
    assert options.server_name == "ldap.corp.example"
    assert options.context.verify_mode == ssl.CERT_REQUIRED
    assert options.context.check_hostname


def test_tcps_client_cert_without_client_key(base: Path) -> None:
    extra = 'client_cert = "tls/server.pem"\n'
    text = CONNECTOR + mapping("ldap.virtual:389", "ldap.corp:636", "tcps", extra)
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].client_cert",
        "client_cert and client_key go together",
    )


def test_tcps_client_key_that_does_not_match(base: Path, tmp_path: Path) -> None:
    other = CertificateAuthority.create("other").issue_server_certificate(["x"])
    (base / "tls" / "other.key").write_bytes(other.private_key_pem())
    extra = 'client_cert = "tls/server.pem"\nclient_key = "tls/other.key"\n'
    text = CONNECTOR + mapping("ldap.virtual:389", "ldap.corp:636", "tcps", extra)
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].client_key",
        "cannot load the client certificate",
    )


@pytest.mark.parametrize("server_name", [".corp", "", "a..b", "x" * 64 + ".corp"])
def test_tcps_server_name_that_tls_cannot_verify(base: Path, server_name: str) -> None:
    # Accepted, ssl would refuse it at every connection; the mapping's load says so instead.
    extra = f'server_name = "{server_name}"\n'
    text = CONNECTOR + mapping("ldap.virtual:389", "ldap.corp:636", "tcps", extra)
    expect_error(
        write(base, text),
        "subaccounts.acme.mappings[0].server_name",
        "not a host name TLS can verify",
    )


def test_tls_keys_are_refused_on_plain_tcp_mappings(base: Path) -> None:
    text = CONNECTOR + mapping("db.virtual:1", "db.corp:1", "tcp", 'ca_file = "tls/ca.pem"\n')
    expect_error(write(base, text), "subaccounts.acme.mappings[0].ca_file", "unknown key")


# --------------------------------------------------------------------------- known bugs
# Each of these describes the documented behaviour; they pass once the bug is fixed (and then
# xfail_strict turns them into failures, so the marker gets removed).


def test_gateway_tunnel_table_rejects_unknown_keys(base: Path) -> None:
    expect_error(
        write(base, GATEWAY + "\n[tunnel]\nheartbeat_intervall = 5\n"),
        "tunnel.heartbeat_intervall",
        "unknown key",
    )


def test_tcps_ca_file_that_is_not_pem(base: Path) -> None:
    (base / "tls" / "junk.pem").write_text("not a certificate\n")
    extra = 'ca_file = "tls/junk.pem"\n'
    text = CONNECTOR + mapping("ldap.virtual:389", "ldap.corp:636", "tcps", extra)
    expect_error(write(base, text), "subaccounts.acme.mappings[0].ca_file", "certificate")


def test_connector_ca_file_that_is_not_pem(base: Path) -> None:
    (base / "tls" / "ca.pem").write_text("not a certificate\n")
    expect_error(write(base, CONNECTOR), "subaccounts.acme.ca_file", "certificate")


def test_non_wss_url_with_credentials_is_not_echoed(base: Path) -> None:
    text = CONNECTOR.replace("wss://", "https://acme:hunter2@")
    error = expect_error(
        write(base, text), "subaccounts.acme.gateway", "must not carry credentials"
    )
    assert "hunter2" not in str(error)


def test_gateway_url_port_zero(base: Path) -> None:
    text = CONNECTOR.replace("gateway.example:8443", "gateway.example:0")
    expect_error(write(base, text), "subaccounts.acme.gateway", "port")


def test_bracketed_mapping_host_must_be_an_ipv6_address(base: Path) -> None:
    text = CONNECTOR + mapping("[not-an-address]:80", "web.corp:80")
    expect_error(write(base, text), "subaccounts.acme.mappings[0].virtual", "brackets are for IPv6")


def test_bad_subaccount_name_key(base: Path) -> None:
    text = CONNECTOR.replace("[subaccounts.acme]", '[subaccounts."bad name"]')
    expect_error(write(base, text), "subaccounts.bad name", "must be 1-64 letters")


def test_names_and_location_ids_are_matched_whole() -> None:
    """A trailing newline used to pass (``$`` matches before it): not a valid name."""
    from backchannel import is_valid_location_id
    from backchannel._config import LOCATION_ID, check_name
    from backchannel._configutil import TableReader

    assert is_valid_location_id("plant-2")
    assert not is_valid_location_id("plant-2\n")
    assert LOCATION_ID.fullmatch("plant-2\n") is None
    reader = TableReader("gateway.toml", "subaccounts", {}, Path("."))
    assert check_name(reader, "", "acme", "subaccount") == "acme"
    with pytest.raises(ConfigError, match="must be 1-64 letters"):
        check_name(reader, "", "acme\n", "subaccount")
