"""Test helpers: a gateway and a connector on 127.0.0.1 with throwaway TLS, and small backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from python_socks import ProxyType
from python_socks.async_.trio import Proxy

from backchannel import (
    Connector,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    HostPort,
    open_connector,
    open_gateway,
)
from backchannel._pki import TlsMaterial, write_throwaway_tls_material

APP_SECRET = "app-secret-for-tests-0123456789"
CONNECTOR_TOKEN = "connector-token-for-tests-0123456789"


def tls_material(directory: Path) -> TlsMaterial:
    """Throwaway CA and gateway certificate for 127.0.0.1/localhost (made once per folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.pem").exists():
        return TlsMaterial(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    return write_throwaway_tls_material(directory)


def gateway_document(
    tls: TlsMaterial,
    audit_file: Path,
    *,
    forwards: Sequence[dict[str, Any]] = (),
    tunnel: dict[str, Any] | None = None,
    socks: bool = True,
) -> dict[str, Any]:
    """A gateway.toml as a dict: subaccount ``acme`` with app ``crm``, SOCKS5 on port 0."""
    tcp: dict[str, Any] = {"forwards": list(forwards)}
    if socks:
        tcp["socks5_listen"] = "127.0.0.1:0"
    return {
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls_cert": str(tls.cert_file),
            "tls_key": str(tls.key_file),
        },
        "tunnel": tunnel or {},
        "audit": {"file": str(audit_file)},
        "subaccounts": {
            "acme": {"connector_token": CONNECTOR_TOKEN, "apps": {"crm": {"secret": APP_SECRET}}},
            "globex": {
                "connector_token": CONNECTOR_TOKEN + "-globex",
                "apps": {"erp": {"secret": APP_SECRET}},
            },
        },
        "plugins": {"tcp": tcp},
    }


def connector_document(
    tls: TlsMaterial,
    gateway_port: int,
    audit_file: Path,
    mappings: Sequence[dict[str, Any]],
    *,
    location: str = "",
    token: str = CONNECTOR_TOKEN,
    subaccount: str = "acme",
    tunnel: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A connector.toml as a dict for one subaccount."""
    sub: dict[str, Any] = {
        "gateway": f"wss://127.0.0.1:{gateway_port}/tunnel",
        "location": location,
        "token": token,
        "ca_file": str(tls.ca_file),
        "use_environment_proxy": False,
        "mappings": list(mappings),
    }
    sub.update(extra or {})
    return {
        "tunnel": tunnel or {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.2},
        "audit": {"file": str(audit_file)},
        "subaccounts": {subaccount: sub},
    }


@dataclass
class Pair:
    """A running gateway and connector."""

    gateway: Gateway
    connector: Connector
    gateway_audit: Path
    connector_audit: Path

    @property
    def socks(self) -> HostPort:
        """The SOCKS5 front door's address."""
        return self.gateway.front_door_addresses["tcp.socks5"][0]

    def forward(self, index: int = 0) -> HostPort:
        """The address of the index-th port forward."""
        doors = [
            v for k, v in self.gateway.front_door_addresses.items() if k.startswith("tcp.forward")
        ]
        return doors[index][0]


@asynccontextmanager
async def running_pair(
    tmp_path: Path,
    mappings: Sequence[dict[str, Any]],
    *,
    forwards: Sequence[dict[str, Any]] = (),
    gateway_tunnel: dict[str, Any] | None = None,
    connector_tunnel: dict[str, Any] | None = None,
    location: str = "",
) -> AsyncIterator[Pair]:
    """Gateway + connector (subaccount acme), tunnel up."""
    tls = tls_material(tmp_path / "tls")
    gateway_audit, connector_audit = (
        tmp_path / "gateway-audit.jsonl",
        tmp_path / "connector-audit.jsonl",
    )
    gateway_config = GatewayConfig.from_mapping(
        gateway_document(tls, gateway_audit, forwards=forwards, tunnel=gateway_tunnel),
        source="gateway.toml",
    )
    async with open_gateway(gateway_config) as gateway:
        assert gateway.tunnel_address is not None
        connector_config = ConnectorConfig.from_mapping(
            connector_document(
                tls,
                gateway.tunnel_address.port,
                connector_audit,
                mappings,
                tunnel=connector_tunnel,
                location=location,
            ),
            source="connector.toml",
        )
        async with open_connector(connector_config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            yield Pair(gateway, connector, gateway_audit, connector_audit)


async def socks_connect(
    socks: HostPort, host: str, port: int, *, user: str = "acme/crm", password: str = APP_SECRET
) -> trio.SocketStream:
    """Connect through the SOCKS5 front door with python-socks (remote DNS)."""
    proxy = Proxy(
        ProxyType.SOCKS5, socks.host, socks.port, username=user, password=password, rdns=True
    )
    sock = await proxy.connect(dest_host=host, dest_port=port)
    return trio.SocketStream(sock)


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """Parsed audit lines of a file (empty list if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    """Read exactly ``count`` bytes (fails on early EOF)."""
    buffer = bytearray()
    while len(buffer) < count:
        data = await stream.receive_some(count - len(buffer))
        assert data, f"EOF after {len(buffer)} of {count} bytes"
        buffer += data
    return bytes(buffer)
