"""Test helpers for the RFC plugin: a stub ABAP system, a gateway with the RFC front door and a
connector with an ``rfc`` mapping to the stub, all on 127.0.0.1 with real sockets and TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from backchannel import (
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    open_connector,
    open_gateway,
)
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._stub_server import serve_stub
from backchannel_rfc._system import AbapSystem
from tests.harness import APP_SECRET, connector_document, gateway_document, tls_material

T = TypeVar("T")

VIRTUAL_HOST = "erp.virtual"
#: The rules of the standard test mapping: everything the conformance suite calls, and
#: RFC_PING_AND_WAIT for timeouts; BAPI_USER_GET_DETAIL stays denied.
DEFAULT_FUNCTIONS: tuple[dict[str, Any], ...] = (
    {"name": "RFC_PING"},
    {"name": "STFC_", "match": "prefix"},
    {"name": "RFC_READ_TABLE"},
    {"name": "RFC_PING_AND_WAIT"},
)
LOGON = {"client": "100", "user": "DEMO", "passwd": "welcome"}


@dataclass
class RfcSetup:
    """A running stub system, gateway and connector."""

    gateway: Gateway
    stub_port: int
    system: AbapSystem
    tmp_path: Path
    gateway_audit: Path
    connector_audit: Path
    route: dict[str, str] = field(default_factory=dict)

    @property
    def front_door(self) -> HostPort:
        """The RFC front door (pyrfc-compatible clients)."""
        return self.gateway.front_door_addresses["rfc.pyrfc"][0]

    @property
    def json_endpoint(self) -> HostPort:
        """The RFC JSON endpoint."""
        return self.gateway.front_door_addresses["rfc.json"][0]

    def params(self, **overrides: str) -> dict[str, str]:
        """Connection parameters through the gateway (virtual ashost, sysnr 00)."""
        params: dict[str, str] = {
            "gateway": str(self.front_door),
            "app": "acme/crm",
            "app_secret": APP_SECRET,
            "ashost": VIRTUAL_HOST,
            "sysnr": "00",
            **LOGON,
        }
        params.update(overrides)
        return {k: v for k, v in params.items() if v != ""}

    def connect(self, **overrides: str) -> Connection:
        return Connection(None, **self.params(**overrides))


async def in_thread(function: Callable[[], T]) -> T:
    """Run a blocking client call without blocking trio (the client is pyrfc's blocking API)."""
    return await trio.to_thread.run_sync(function)


@asynccontextmanager
async def rfc_setup(
    tmp_path: Path,
    *,
    functions: Sequence[dict[str, Any]] = DEFAULT_FUNCTIONS,
    mapping_extra: dict[str, Any] | None = None,
    connector_plugin: dict[str, Any] | None = None,
    gateway_plugin: dict[str, Any] | None = None,
    destinations: Sequence[dict[str, Any]] = (),
    system: AbapSystem | None = None,
    stub_port: int | None = None,
) -> AsyncIterator[RfcSetup]:
    """Stub system (unless ``stub_port`` names a dead one), gateway, connector; tunnel up."""
    system = system or demo_system()
    tls = tls_material(tmp_path / "tls")
    gateway_audit = tmp_path / "gateway-audit.jsonl"
    connector_audit = tmp_path / "connector-audit.jsonl"
    async with trio.open_nursery() as nursery:
        if stub_port is None:
            stub_port = await nursery.start(serve_stub, system, "127.0.0.1", 0)
        document = gateway_document(tls, gateway_audit, socks=False)
        document["plugins"]["rfc"] = {
            "listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "destinations": list(destinations),
            **(gateway_plugin or {}),
        }
        async with open_gateway(
            GatewayConfig.from_mapping(document, source="gateway.toml")
        ) as gateway:
            assert gateway.tunnel_address is not None
            mapping = {
                "protocol": "rfc",
                "virtual": f"{VIRTUAL_HOST}:3300",
                "internal": f"127.0.0.1:{stub_port}",
                "functions": list(functions),
                **(mapping_extra or {}),
            }
            connector = connector_document(
                tls, gateway.tunnel_address.port, connector_audit, [mapping]
            )
            connector["plugins"] = {"rfc": {"backend": "stub", **(connector_plugin or {})}}
            config = ConnectorConfig.from_mapping(connector, source="connector.toml")
            async with open_connector(config) as running:
                with trio.fail_after(10):
                    await running.wait_connected()
                yield RfcSetup(gateway, stub_port, system, tmp_path, gateway_audit, connector_audit)
        nursery.cancel_scope.cancel()
