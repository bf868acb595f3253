"""Test helpers for registered connectors: a gateway with ``[registration]`` and a clock
that tests can move, a connector configured with a certificate file."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from backchannel import Connector, ConnectorConfig, Gateway, GatewayConfig, open_gateway
from backchannel._connector_certificate import register, store_credential
from backchannel._connector_identity import ConnectorIdentity
from backchannel._pki import CertificateAuthority
from backchannel._registration import ConnectorAuthority, utc_now
from backchannel._transport import GatewayAddress, client_ssl_context
from tests.harness import connector_document, gateway_document, tls_material


@dataclass
class MovableClock:
    """UTC now plus an offset the test sets."""

    offset: datetime.timedelta = field(default_factory=datetime.timedelta)

    def __call__(self) -> datetime.datetime:
        return utc_now() + self.offset

    def days(self, days: float) -> None:
        """Move to ``days`` after the real now."""
        self.offset = datetime.timedelta(days=days)


def connector_ca(directory: Path) -> tuple[Path, Path]:
    """A connector CA (made once per folder): certificate and key paths."""
    cert, key = directory / "connector-ca.pem", directory / "connector-ca.key"
    if not cert.exists():
        CertificateAuthority.create("backchannel connector CA").save(directory, name="connector-ca")
    return cert, key


def registration_gateway_document(
    tmp_path: Path, *, shared_token: bool = False, check_interval: float = 0.05
) -> dict[str, Any]:
    """gateway.toml as a dict: subaccount ``acme`` takes registered connectors only (unless
    ``shared_token``), ``globex`` keeps its shared token."""
    tls = tls_material(tmp_path / "tls")
    document = gateway_document(tls, tmp_path / "gateway-audit.jsonl")
    document["audit"]["include_allowed"] = True
    ca_cert, ca_key = connector_ca(tmp_path / "connector-ca")
    document["registration"] = {
        "ca_cert": str(ca_cert),
        "ca_key": str(ca_key),
        "state_dir": str(tmp_path / "registration-state"),
        "certificate_days": 30,
        "revocation_check_interval": check_interval,
    }
    if not shared_token:
        del document["subaccounts"]["acme"]["connector_token"]
    return document


def registered_connector_document(
    tmp_path: Path,
    gateway_port: int,
    mappings: list[dict[str, Any]],
    *,
    location: str = "",
    renew_before_days: float | None = None,
) -> dict[str, Any]:
    """connector.toml as a dict for ``acme`` with ``certificate_file`` instead of a token."""
    tls = tls_material(tmp_path / "tls")
    document = connector_document(
        tls, gateway_port, tmp_path / "connector-audit.jsonl", mappings, location=location
    )
    document["audit"]["include_allowed"] = True
    sub = document["subaccounts"]["acme"]
    del sub["token"]
    sub["certificate_file"] = str(tmp_path / "connector-acme.pem")
    if renew_before_days is not None:
        sub["renew_before_days"] = renew_before_days
    return document


async def register_connector(
    authority: ConnectorAuthority,
    config: ConnectorConfig,
    *,
    token: str | None = None,
    subaccount: str = "acme",
) -> None:
    """Register ``config``'s subaccount over the wire and store the certificate file."""
    sub = config.subaccounts[subaccount]
    identity = ConnectorIdentity(sub.name, sub.location)
    if token is None:
        token = authority.mint_token(identity, datetime.timedelta(minutes=10))
    key, certificate = await register(
        sub.gateway,
        identity,
        token,
        ssl_context=client_ssl_context(sub.ca_file),
        proxy=None,
        answer_within=10,
    )
    assert sub.certificate_file is not None
    store_credential(sub.certificate_file, key, certificate)


@dataclass
class RegistrationSetup:
    """A running gateway with registration, and what a connector needs to join it."""

    gateway: Gateway
    authority: ConnectorAuthority
    clock: MovableClock
    address: GatewayAddress


@asynccontextmanager
async def registration_gateway(
    tmp_path: Path, *, shared_token: bool = False, check_interval: float = 0.05
) -> AsyncIterator[RegistrationSetup]:
    """A gateway with ``[registration]`` and a movable clock, serving on 127.0.0.1."""
    clock = MovableClock()
    config = GatewayConfig.from_mapping(
        registration_gateway_document(
            tmp_path, shared_token=shared_token, check_interval=check_interval
        ),
        source="gateway.toml",
    )
    async with open_gateway(config) as gateway:
        authority = gateway.authority
        assert authority is not None
        authority._clock = clock
        assert gateway.tunnel_address is not None
        address = GatewayAddress("127.0.0.1", gateway.tunnel_address.port, "/tunnel")
        yield RegistrationSetup(gateway, authority, clock, address)


@asynccontextmanager
async def connector_on(
    config: ConnectorConfig,
    clock: Callable[[], datetime.datetime],
    *,
    check_interval: float = 3600,
) -> AsyncIterator[Connector]:
    """A running connector whose wall clock is ``clock`` (a moved one: certificates are
    checked and renewed on it)."""
    connector = Connector(config, clock=clock, certificate_check_interval=check_interval)
    async with trio.open_nursery() as nursery:
        await nursery.start(connector.serve)
        yield connector
        nursery.cancel_scope.cancel()


def later_by(days: float) -> Callable[[], datetime.datetime]:
    """A clock ``days`` ahead of the real one (for the connector only)."""
    offset = datetime.timedelta(days=days)
    return lambda: utc_now() + offset


def connector_for(
    setup: RegistrationSetup,
    tmp_path: Path,
    mappings: list[dict[str, Any]] | None = None,
    **options: Any,
) -> ConnectorConfig:
    """A registered connector's config for ``setup``'s gateway."""
    return ConnectorConfig.from_mapping(
        registered_connector_document(tmp_path, setup.address.port, mappings or [], **options),
        source="connector.toml",
    )


__all__ = [
    "Connector",
    "MovableClock",
    "RegistrationSetup",
    "connector_for",
    "connector_on",
    "later_by",
    "register_connector",
    "registration_gateway",
]
