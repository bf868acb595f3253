"""The connector reaches the gateway through an HTTP CONNECT proxy (config or environment)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from backchannel import (
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    open_connector,
    open_gateway,
)
from tests.connect_proxy import serve_connect_proxy
from tests.harness import (
    connector_document,
    echo_server,
    gateway_document,
    receive_exactly,
    socks_connect,
    tls_material,
)

PROXY_USER = "alice"
PROXY_PASSWORD = "proxy-pass-Xy9-for-tests"
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture(autouse=True)
def _clean_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without proxy variables from the machine running it."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@asynccontextmanager
async def gateway_and_connector(
    tmp_path: Path, echo_port: int, subaccount_extra: dict[str, Any]
) -> AsyncIterator[tuple[Gateway, Connector]]:
    """A gateway and a connector (not yet necessarily connected) with ``subaccount_extra``."""
    tls = tls_material(tmp_path / "tls")
    gateway_config = GatewayConfig.from_mapping(
        gateway_document(tls, tmp_path / "gateway-audit.jsonl"), source="gateway.toml"
    )
    async with open_gateway(gateway_config) as gateway:
        assert gateway.tunnel_address is not None
        mapping = {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{echo_port}"}
        document = connector_document(
            tls,
            gateway.tunnel_address.port,
            tmp_path / "connector-audit.jsonl",
            [{**mapping, "protocol": "tcp"}],
            extra=subaccount_extra,
        )
        config = ConnectorConfig.from_mapping(document, source="connector.toml")
        async with open_connector(config) as connector:
            yield gateway, connector


async def assert_round_trip(gateway: Gateway, connector: Connector) -> None:
    """The tunnel is up and carries a SOCKS5 stream to the echo backend."""
    with trio.fail_after(10):
        await connector.wait_connected()
        socks = gateway.front_door_addresses["tcp.socks5"][0]
        stream = await socks_connect(socks, "echo.virtual", 7)
        async with stream:
            await stream.send_all(b"through the corporate proxy")
            assert await receive_exactly(stream, 27) == b"through the corporate proxy"


def gateway_target(gateway: Gateway) -> str:
    """``host:port`` of the gateway's tunnel endpoint, as a CONNECT request names it."""
    assert gateway.tunnel_address is not None
    return f"127.0.0.1:{gateway.tunnel_address.port}"


async def test_connector_tunnels_through_an_authenticating_proxy(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="backchannel")
    proxy = await serve_connect_proxy(nursery, username=PROXY_USER, password=PROXY_PASSWORD)
    extra = {
        "https_proxy": proxy.url(userinfo=f"{PROXY_USER}:{PROXY_PASSWORD}@"),
        "use_environment_proxy": False,
    }
    async with (
        echo_server() as echo_port,
        gateway_and_connector(tmp_path, echo_port, extra) as (gateway, connector),
    ):
        await assert_round_trip(gateway, connector)
        assert proxy.connect_log == [gateway_target(gateway)]
        assert proxy.auth_log == [True]
        assert [r.status for r in proxy.records] == [200]
    assert f"via proxy http://{PROXY_USER}:***@127.0.0.1:{proxy.port}" in caplog.text
    assert PROXY_PASSWORD not in caplog.text


async def test_wrong_proxy_password_keeps_retrying_without_leaking_it(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="backchannel")
    proxy = await serve_connect_proxy(nursery, username=PROXY_USER, password="the-right-one")
    extra = {
        "https_proxy": proxy.url(userinfo=f"{PROXY_USER}:{PROXY_PASSWORD}@"),
        "use_environment_proxy": False,
    }
    async with (
        echo_server() as echo_port,
        gateway_and_connector(tmp_path, echo_port, extra) as (gateway, connector),
    ):
        status = connector.status["acme"]
        with trio.fail_after(10):
            await connector.wait_status(lambda s: s.attempts >= 4 and bool(s.last_error))
        assert len(proxy.records) >= 3
        assert status.attempts >= 3
        assert not status.connected
        assert "407" in status.last_error
        assert PROXY_PASSWORD not in status.last_error
        assert gateway.connected() == []
        assert {(r.method, r.auth_seen, r.status) for r in proxy.records} == {
            ("CONNECT", True, 407)
        }
    assert PROXY_PASSWORD not in caplog.text


async def test_https_proxy_environment_variable_is_the_fallback(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await serve_connect_proxy(nursery, username=PROXY_USER, password=PROXY_PASSWORD)
    monkeypatch.setenv("https_proxy", proxy.url(userinfo=f"{PROXY_USER}:{PROXY_PASSWORD}@"))
    async with echo_server() as echo_port:
        extra = {"use_environment_proxy": True}
        async with gateway_and_connector(tmp_path, echo_port, extra) as (gateway, connector):
            await assert_round_trip(gateway, connector)
            assert proxy.connect_log == [gateway_target(gateway)]
            assert proxy.auth_log == [True]


async def test_configured_proxy_wins_over_the_environment(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_environment = await serve_connect_proxy(nursery)
    from_config = await serve_connect_proxy(nursery)
    monkeypatch.setenv("HTTPS_PROXY", from_environment.url())
    async with echo_server() as echo_port:
        extra = {"https_proxy": from_config.url(), "use_environment_proxy": True}
        async with gateway_and_connector(tmp_path, echo_port, extra) as (gateway, connector):
            await assert_round_trip(gateway, connector)
            assert from_config.connect_log == [gateway_target(gateway)]
            assert from_config.auth_log == [False]
            assert from_environment.records == []


@pytest.mark.parametrize(
    ("use_environment_proxy", "no_proxy"),
    [(False, None), (True, "localhost,127.0.0.1")],
    ids=["use_environment_proxy-false", "no_proxy-matches"],
)
async def test_environment_proxy_is_not_used_when_told_not_to(
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    use_environment_proxy: bool,
    no_proxy: str | None,
) -> None:
    proxy = await serve_connect_proxy(nursery)
    monkeypatch.setenv("https_proxy", proxy.url())
    if no_proxy is not None:
        monkeypatch.setenv("no_proxy", no_proxy)
    async with echo_server() as echo_port:
        extra = {"use_environment_proxy": use_environment_proxy}
        async with gateway_and_connector(tmp_path, echo_port, extra) as (gateway, connector):
            await assert_round_trip(gateway, connector)
    assert proxy.records == []
