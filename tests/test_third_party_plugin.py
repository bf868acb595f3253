"""A third-party plugin, installed as its own distribution, found through its entry point.

The fixture ``tests/fixtures/upper_plugin`` (distribution ``backchannel-upper-example``) is laid
out in a temporary site folder with real ``*.dist-info`` metadata (see
``tests/fixtures/distributions.py`` for why it is not built with pip). Subprocesses see it through
``PYTHONPATH``; in-process tests put it on ``sys.path`` for one test only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from backchannel import (
    AppIdentity,
    AuditLog,
    ConfigError,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Gateway,
    GatewayConfig,
    HostPort,
    ResetCode,
    Role,
    Session,
    StreamError,
    SystemMapping,
    TunnelStream,
    open_connector,
    open_gateway,
)
from tests.fixtures.distributions import install_without_building
from tests.harness import (
    audit_lines,
    connector_document,
    gateway_document,
    receive_exactly,
    tls_material,
)

FIXTURE = Path(__file__).parent / "fixtures" / "upper_plugin"
DISTRIBUTION = "backchannel-upper-example"

#: The connector's mappings: one for the plugin's protocol, one for tcp.
MAPPINGS: list[dict[str, Any]] = [
    {"virtual": "shout.virtual:4000", "internal": "localhost:4000", "protocol": "upper"},
    {"virtual": "echo.virtual:7", "internal": "127.0.0.1:7", "protocol": "tcp"},
]


@pytest.fixture(scope="session")
def upper_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding the installed fixture distribution."""
    site = tmp_path_factory.mktemp("upper-site")
    install_without_building(FIXTURE, site)
    return site


@pytest.fixture
def upper_installed(upper_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fixture distribution visible to this process for one test (entry points included)."""
    monkeypatch.syspath_prepend(str(upper_site))  # also invalidates importlib's caches
    yield upper_site
    for module in [m for m in sys.modules if m.split(".")[0] == "backchannel_upper"]:
        del sys.modules[module]
    importlib.invalidate_caches()


# ----------------------------------------------------------------------- the command line


def run_plugins_command(site: Path, *args: str) -> dict[str, list[str]]:
    """``backchannel plugins ARGS`` with ``site`` on PYTHONPATH; rows keyed by plugin name."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    command = Path(sys.executable).with_name("backchannel")
    result = subprocess.run(
        [str(command), "plugins", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["plugin", "version", "state", "roles", "mappings", "distribution"]
    return {line.split()[0]: line.split() for line in lines}


def test_plugins_command_lists_the_third_party_plugin(upper_site: Path) -> None:
    rows = run_plugins_command(upper_site)
    assert rows["upper"] == [
        "upper",
        "0.3.0",
        "enabled",
        "connector,gateway",
        "upper",
        DISTRIBUTION,
    ]
    assert rows["tcp"][2:] == ["enabled", "connector,gateway", "tcp,tcps", "backchannel"]


def test_plugins_command_disables_the_third_party_plugin(upper_site: Path) -> None:
    rows = run_plugins_command(upper_site, "--disable-plugin", "upper")
    # Disabled: never imported, so its own description is unknown; the metadata still is.
    assert rows["upper"] == ["upper", "0.3.0", "disabled", "-", "-", DISTRIBUTION]
    assert rows["tcp"][2] == "enabled"


def test_plugins_command_enables_only_the_third_party_plugin(upper_site: Path) -> None:
    rows = run_plugins_command(upper_site, "--plugins", "upper")
    assert rows["upper"][2] == "enabled"
    assert rows["tcp"][2] == "disabled"


def test_without_the_distribution_the_plugin_is_not_listed(upper_site: Path) -> None:
    rows = run_plugins_command(upper_site.parent / "nothing-here")
    assert "upper" not in rows
    assert "tcp" in rows


def test_fixture_metadata_matches_its_pyproject(upper_installed: Path) -> None:
    import backchannel_upper

    with (FIXTURE / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    assert importlib.metadata.version(DISTRIBUTION) == project["version"]
    assert backchannel_upper.__version__ == project["version"]
    (entry_point,) = importlib.metadata.entry_points(group="backchannel.plugins", name="upper")
    assert entry_point.value == "backchannel_upper.plugin"
    assert entry_point.dist is not None
    assert entry_point.dist.name == DISTRIBUTION


# ------------------------------------------------------------------ through a real tunnel


@dataclass
class UpperPair:
    gateway: Gateway
    connector: Connector
    front_door: HostPort
    gateway_audit: Path
    connector_audit: Path


@asynccontextmanager
async def upper_pair(
    tmp_path: Path,
    *,
    target: str = "shout.virtual:4000",
    connector_table: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] = MAPPINGS,
) -> AsyncIterator[UpperPair]:
    """Gateway with the plugin's front door to ``target``; connector with ``mappings``."""
    tls = tls_material(tmp_path / "tls")
    gateway_audit = tmp_path / "gateway-audit.jsonl"
    connector_audit = tmp_path / "connector-audit.jsonl"
    gateway_doc = gateway_document(tls, gateway_audit, socks=False)
    gateway_doc["plugins"]["upper"] = {
        "listen": "127.0.0.1:0",
        "subaccount": "acme",
        "target": target,
    }
    # Plugins come from entry points only: nothing is passed in-process.
    async with open_gateway(GatewayConfig.from_mapping(gateway_doc)) as gateway:
        assert gateway.tunnel_address is not None
        connector_doc = connector_document(
            tls, gateway.tunnel_address.port, connector_audit, mappings
        )
        connector_doc["plugins"] = {"upper": connector_table or {}}
        async with open_connector(ConnectorConfig.from_mapping(connector_doc)) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            front_door = gateway.front_door_addresses["upper"][0]
            yield UpperPair(gateway, connector, front_door, gateway_audit, connector_audit)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(4096):
        data += chunk
    return bytes(data)


async def test_stream_end_to_end_through_the_plugin(tmp_path: Path, upper_installed: Path) -> None:
    async with upper_pair(tmp_path) as pair:
        plugin_module = sys.modules["backchannel_upper.plugin"]
        assert plugin_module.__file__ is not None
        assert Path(plugin_module.__file__).is_relative_to(upper_installed)
        with trio.fail_after(10):
            client = await trio.open_tcp_stream(pair.front_door.host, pair.front_door.port)
            async with client:
                await client.send_all(b"hello")
                assert await receive_exactly(client, 5) == b"HELLO"
                await client.send_all(b", tunnel")
                assert await receive_exactly(client, 8) == b", TUNNEL"
                await client.send_eof()
                assert await read_to_eof(client) == b""


async def test_mapping_options_reach_the_handler(tmp_path: Path, upper_installed: Path) -> None:
    mappings = [{**MAPPINGS[0], "greeting": "hi!\n"}]
    async with upper_pair(tmp_path, mappings=mappings) as pair:
        with trio.fail_after(10):
            client = await trio.open_tcp_stream(pair.front_door.host, pair.front_door.port)
            async with client:
                await client.send_all(b"abc")
                await client.send_eof()
                assert await read_to_eof(client) == b"hi!\nABC"


async def test_access_control_applies_to_the_plugin(tmp_path: Path, upper_installed: Path) -> None:
    async with upper_pair(tmp_path, target="quiet.virtual:4000") as pair:
        with trio.fail_after(10):
            client = await trio.open_tcp_stream(pair.front_door.host, pair.front_door.port)
            async with client:
                answer = await read_to_eof(client)
        assert (
            answer == b"-ERR ACCESS_DENIED no system mapping for virtual host quiet.virtual:4000\n"
        )
        denial = [line for line in audit_lines(pair.connector_audit) if line["decision"] == "deny"]
        assert denial[-1]["protocol"] == "upper"
        assert denial[-1]["target"] == "quiet.virtual:4000"

        # A virtual host mapped for another protocol is no way in either, in both directions.
        app = AppIdentity("acme", "crm")
        with trio.fail_after(10), pytest.raises(StreamError) as info:
            await pair.gateway.open_stream(
                app, protocol="upper", target=HostPort("echo.virtual", 7)
            )
        assert info.value.code == ResetCode.ACCESS_DENIED
        assert "mapped for tcp, not for upper" in info.value.reason
        with trio.fail_after(10), pytest.raises(StreamError) as info:
            await pair.gateway.open_stream(
                app, protocol="tcp", target=HostPort("shout.virtual", 4000)
            )
        assert info.value.code == ResetCode.ACCESS_DENIED
        assert "mapped for upper, not for tcp" in info.value.reason


async def test_handler_refusal_reaches_the_front_door(
    tmp_path: Path, upper_installed: Path
) -> None:
    async with upper_pair(tmp_path, connector_table={"max_sessions": 1}) as pair:
        door = pair.front_door
        with trio.fail_after(10):
            first = await trio.open_tcp_stream(door.host, door.port)
            async with first:
                await first.send_all(b"a")
                assert await receive_exactly(first, 1) == b"A"  # one session is open
                second = await trio.open_tcp_stream(door.host, door.port)
                async with second:
                    assert await read_to_eof(second) == (
                        b"-ERR REFUSED 1 upper sessions are already open\n"
                    )
                # The handler has returned once its EOF reaches us: the slot is free again.
                await first.send_eof()
                assert await read_to_eof(first) == b""
            third = await trio.open_tcp_stream(door.host, door.port)
            async with third:
                await third.send_all(b"b")
                await third.send_eof()
                assert await read_to_eof(third) == b"B"
        refusals = [x for x in audit_lines(pair.gateway_audit) if x["decision"] == "deny"]
        assert refusals[-1]["protocol"] == "upper"
        assert refusals[-1]["reason"].startswith("REFUSED:")


# ------------------------------------------------------------------------ configuration


def connector_config(
    tmp_path: Path, mappings: list[dict[str, Any]], **extra: Any
) -> ConnectorConfig:
    tls = tls_material(tmp_path / "tls")
    document = connector_document(tls, 1, tmp_path / "audit.jsonl", mappings)
    document.update(extra)
    return ConnectorConfig.from_mapping(document, source="connector.toml")


def test_unknown_mapping_key_is_a_config_error(tmp_path: Path, upper_installed: Path) -> None:
    config = connector_config(tmp_path, [{**MAPPINGS[0], "greting": "typo"}])
    with pytest.raises(ConfigError) as info:
        Connector(config)
    assert info.value.key == "subaccounts.acme.mappings[0].greting"


def test_bad_plugin_table_is_a_config_error(tmp_path: Path, upper_installed: Path) -> None:
    config = connector_config(tmp_path, MAPPINGS, plugins={"upper": {"max_sessions": 0}})
    with pytest.raises(ConfigError) as info:
        Connector(config)
    assert info.value.key == "plugins.upper.max_sessions"

    tls = tls_material(tmp_path / "tls")
    document = gateway_document(tls, tmp_path / "gateway-audit.jsonl", socks=False)
    # Without an audit file: Gateway() opens it before asking the plugins and, when they raise,
    # leaves it open (reported as a core bug).
    del document["audit"]
    document["plugins"]["upper"] = {"listen": "127.0.0.1:0", "subaccount": "nobody"}
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.from_mapping(document))
    assert info.value.key == "plugins.upper.subaccount"
    assert "not configured" in info.value.problem


def test_disabled_plugin_serves_no_mappings(tmp_path: Path, upper_installed: Path) -> None:
    config = connector_config(tmp_path, MAPPINGS, plugins={"disable": ["upper"]})
    with pytest.raises(ConfigError) as info:
        Connector(config)
    assert info.value.key == "subaccounts.acme.mappings[0].protocol"
    assert "'upper' is not served by an enabled plugin" in info.value.problem


def test_config_for_an_unknown_plugin_name_says_what_to_check() -> None:
    with pytest.raises(LookupError, match="entry-point name"):
        ConnectorContext({}).config_for("uper")


# ------------------------------------------------------- the handler over memory streams


class MemoryTunnelStream(trio.abc.HalfCloseableStream):
    """What a handler uses of a TunnelStream, over one end of a memory stream pair."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self._stream = stream
        self.accepted = False
        self.reset_code: ResetCode | None = None

    async def accept(self, attributes: dict[str, Any] | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.accepted = True

    async def reset(self, code: ResetCode, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()
        self.reset_nowait(code, reason)

    def reset_nowait(self, code: ResetCode, reason: str = "") -> None:
        self.reset_code = code

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self._stream.aclose()


def session_for(options: object) -> Session:
    mapping = SystemMapping(
        "acme", "upper", "shout.virtual", range(4000, 4001), "localhost", 4000, options=options
    )
    return Session(
        protocol="upper",
        subaccount="acme",
        location="",
        app="crm",
        virtual=HostPort("shout.virtual", 4000),
        internal=HostPort("localhost", 4000),
        mapping=mapping,
        audit=AuditLog(Role.CONNECTOR),
    )


async def test_handler_over_memory_streams(upper_installed: Path) -> None:
    from backchannel_upper.plugin import UpperHandler, UpperOptions

    handler = UpperHandler(max_sessions=1)
    gateway_end, connector_end = trio.testing.memory_stream_pair()
    stream = MemoryTunnelStream(connector_end)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                handler.handle, session_for(UpperOptions(b"hi\n")), cast(TunnelStream, stream)
            )
            await gateway_end.send_all(b"quiet")
            await gateway_end.send_eof()
            assert await read_to_eof(gateway_end) == b"hi\nQUIET"
    assert stream.accepted
    assert handler.active == 0


async def test_handler_refuses_beyond_max_sessions(upper_installed: Path) -> None:
    from backchannel_upper.plugin import UpperHandler

    handler = UpperHandler(max_sessions=1)
    handler.active = 1
    _, connector_end = trio.testing.memory_stream_pair()
    stream = MemoryTunnelStream(connector_end)
    with pytest.raises(StreamError) as info:
        await handler.handle(session_for(None), cast(TunnelStream, stream))
    assert info.value.code == ResetCode.REFUSED
    assert not stream.accepted
