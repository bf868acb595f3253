"""Trust lists follow the gateway's configuration without a restart: a reload (SIGHUP for
``backchannel gateway``) sends changed identity providers to connected connectors, withdrawn
ones included; a broken file changes nothing."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backchannel import Connector, ConnectorConfig, open_connector, open_gateway
from backchannel._exceptions import ConfigError
from backchannel._user_ca import UserCertificateAuthority
from tests.harness import connector_document, gateway_document, tls_material
from tests.procs import BACKCHANNEL, running, write_toml


def _public_key_file(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _idp(tmp_path: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "issuer": f"https://{name}.test",
        "audiences": ["backchannel"],
        "public_key_file": str(_public_key_file(tmp_path / f"{name}.pem")),
    }


def _write_gateway(tmp_path: Path, idps: list[dict[str, Any]]) -> Path:
    document = gateway_document(tls_material(tmp_path / "tls"), tmp_path / "gateway-audit.jsonl")
    document["subaccounts"]["acme"]["identity_providers"] = idps
    return write_toml(tmp_path / "gateway.toml", document)


async def _wait_for(connector: Connector, condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds; re-checked whenever the connector takes a CONTROL document."""
    with trio.fail_after(10):
        await connector.wait_status(lambda _: condition())


async def test_reload_sends_changed_identity_providers(tmp_path: Path) -> None:
    corp, partner = _idp(tmp_path, "corp"), _idp(tmp_path, "partner")
    gateway_toml = _write_gateway(tmp_path, [corp])
    ca_cert, ca_key = UserCertificateAuthority.create().save(tmp_path / "user-ca")
    async with open_gateway(gateway_toml) as gateway:
        assert gateway.tunnel_address is not None
        document = connector_document(
            tls_material(tmp_path / "tls"),
            gateway.tunnel_address.port,
            tmp_path / "connector-audit.jsonl",
            [],
        )
        document["principal_propagation"] = {
            "ca_cert": str(ca_cert),
            "ca_key": str(ca_key),
            "subject_rules": [{"pattern": "CN=${name}"}],
        }
        async with open_connector(ConnectorConfig.from_mapping(document)) as connector:
            resolver = connector.principal_resolver
            assert resolver is not None

            def names() -> set[str]:
                return {idp.name for idp in resolver.trust_for("acme")}

            await _wait_for(connector, lambda: names() == {"corp"})

            _write_gateway(tmp_path, [corp, partner])
            assert gateway.reload_identity_providers() == ["acme"]
            await _wait_for(connector, lambda: names() == {"corp", "partner"})

            # Nothing changed: nothing is sent, nothing is reported.
            assert gateway.reload_identity_providers() == []

            _write_gateway(tmp_path, [])
            assert gateway.reload_identity_providers() == ["acme"]
            await _wait_for(connector, lambda: names() == set())

            gateway_toml.write_text("[gateway\nbroken")
            with pytest.raises(ConfigError, match="not valid TOML"):
                gateway.reload_identity_providers()
            assert len(gateway.config.subaccounts["acme"].identity_providers) == 0


def test_sighup_reloads_the_gateways_identity_providers(tmp_path: Path) -> None:
    gateway_toml = _write_gateway(tmp_path, [])
    with running([*BACKCHANNEL, "gateway", "-c", gateway_toml, "--log-json"]) as gateway:
        gateway.wait_for_message(r"^backchannel gateway \S+ running")
        _write_gateway(tmp_path, [_idp(tmp_path, "corp")])
        gateway.popen.send_signal(signal.SIGHUP)
        gateway.wait_for_message(r"^reload: identity providers changed for acme$")
        gateway_toml.write_text("not toml at all [")
        gateway.popen.send_signal(signal.SIGHUP)
        gateway.wait_for_message(r"^reload failed, the previous identity providers stay: .*TOML")
        assert gateway.popen.poll() is None
