"""Test helpers for the RFC plugin: a stub ABAP system, a gateway with the RFC front door and a
connector with an ``rfc`` mapping to the stub, all on 127.0.0.1 with real sockets and TLS."""

from __future__ import annotations

import base64
import datetime
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backchannel import (
    Connector,
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
#: The demo system's clock (``demo_system()``): certificates for it must be valid then.
DEMO_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5)
_DAY = datetime.timedelta(days=1)


def _name(common_name: str, organization: str = "Example") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class LogonCA:
    """A CA for certificate logons to the stub system, valid a year around ``at``."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "test user CA", *, at: datetime.datetime) -> LogonCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name, "Test CAs")
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(at) - 365 * _DAY)
            .not_valid_after(_utc(at) + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def issue(
        self,
        common_name: str,
        *,
        at: datetime.datetime,
        valid_from: datetime.timedelta = -_DAY,
        valid_to: datetime.timedelta = _DAY,
        usage: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> str:
        """A user certificate ``CN=<common_name>,O=Example`` as base64 DER (``x509cert``),
        valid from ``at + valid_from`` to ``at + valid_to``; ``usage`` None leaves out the
        extended key usage; ``signer`` signs instead of the CA's key (a forgery)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(at) + valid_from)
            .not_valid_after(_utc(at) + valid_to)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        certificate = builder.sign(signer or self.key, hashes.SHA256())
        return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


def _utc(moment: datetime.datetime) -> datetime.datetime:
    """As the stub system reads its clock: a naive time is local time."""
    return moment.astimezone(datetime.UTC)


@dataclass
class RfcSetup:
    """A running stub system, gateway and connector."""

    gateway: Gateway
    connector: Connector
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
    gateway_subaccount: dict[str, Any] | None = None,
    connector_subaccount: dict[str, Any] | None = None,
    connector_root: dict[str, Any] | None = None,
) -> AsyncIterator[RfcSetup]:
    """Stub system (unless ``stub_port`` names a dead one), gateway, connector; tunnel up.

    ``gateway_subaccount`` and ``connector_subaccount`` add keys to subaccount ``acme`` of
    either side (``identity_providers``, ``untrusted_identity_providers``); ``connector_root``
    adds top-level tables to the connector's configuration (``principal_propagation``).
    """
    system = system or demo_system()
    tls = tls_material(tmp_path / "tls")
    gateway_audit = tmp_path / "gateway-audit.jsonl"
    connector_audit = tmp_path / "connector-audit.jsonl"
    async with trio.open_nursery() as nursery:
        if stub_port is None:
            stub_port = await nursery.start(serve_stub, system, "127.0.0.1", 0)
        document = gateway_document(tls, gateway_audit, socks=False)
        document["subaccounts"]["acme"].update(gateway_subaccount or {})
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
                tls,
                gateway.tunnel_address.port,
                connector_audit,
                [mapping],
                extra=connector_subaccount,
            )
            connector.update(connector_root or {})
            connector["plugins"] = {"rfc": {"backend": "stub", **(connector_plugin or {})}}
            config = ConnectorConfig.from_mapping(connector, source="connector.toml")
            async with open_connector(config) as running:
                with trio.fail_after(10):
                    await running.wait_connected()
                yield RfcSetup(
                    gateway,
                    running,
                    stub_port,
                    system,
                    tmp_path,
                    gateway_audit,
                    connector_audit,
                )
        nursery.cancel_scope.cancel()
