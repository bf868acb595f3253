"""Registered connectors: one-time registration tokens, certificate (mutual TLS) tunnels,
renewal before expiry with a moved clock, revocation and expiry refused with a message that
names the certificate."""

from __future__ import annotations

import datetime
import logging
import os
import stat
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from backchannel import open_connector
from backchannel._connector import TunnelStatus
from backchannel._connector_certificate import CredentialError, load_credential
from backchannel._connector_identity import ConnectorIdentity, serial_text
from backchannel._exceptions import TunnelError
from backchannel._pki import CertificateAuthority
from backchannel._registration_token import mint_token
from tests.harness import audit_lines, echo_server, socks_connect
from tests.registration_harness import (
    connector_for,
    connector_on,
    later_by,
    register_connector,
    registration_gateway,
)

ACME = ConnectorIdentity("acme", "")


def _echo_mapping(port: int) -> list[dict[str, object]]:
    return [{"protocol": "tcp", "virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}"}]


def _failed_once(status: TunnelStatus) -> bool:
    return status.attempts >= 1 and bool(status.last_error)


def _certificate(path: Path) -> x509.Certificate:
    return load_credential(path, ACME).certificate


async def test_registered_connector_tunnels_with_its_certificate(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup, echo_server() as port:
        config = connector_for(setup, tmp_path, _echo_mapping(port))
        await register_connector(setup.authority, config)
        certificate_file = config.subaccounts["acme"].certificate_file
        assert certificate_file is not None
        assert stat.S_IMODE(os.stat(certificate_file).st_mode) == 0o600
        certificate = _certificate(certificate_file)
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            (entry,) = setup.gateway.connected()
            assert entry.certificate is not None
            assert entry.certificate.serial_number == certificate.serial_number
            socks = setup.gateway.front_door_addresses["tcp.socks5"][0]
            stream = await socks_connect(socks, "echo.virtual", 7)
            async with stream:
                await stream.send_all(b"hello over mTLS")
                assert await stream.receive_some(100) == b"hello over mTLS"
    lines = audit_lines(tmp_path / "gateway-audit.jsonl")
    registered = [line for line in lines if line.get("event") == "connector_register"]
    assert registered
    assert registered[0]["serial"] == serial_text(certificate)


async def test_registration_token_is_single_use(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        token = setup.authority.mint_token(ACME, datetime.timedelta(minutes=5))
        await register_connector(setup.authority, config, token=token)
        with pytest.raises(TunnelError, match="already used"):
            await register_connector(setup.authority, config, token=token)


async def test_registration_refusals_say_why(tmp_path: Path) -> None:
    other_ca = CertificateAuthority.create("someone else's CA")
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        now = setup.clock()
        cases = {
            "for connector acme/plant-2, but the connector is configured as acme/-": (
                setup.authority.mint_token(
                    ConnectorIdentity("acme", "plant-2"), datetime.timedelta(minutes=5)
                )
            ),
            "signature does not verify": mint_token(
                other_ca.private_key, ACME, datetime.timedelta(minutes=5), now=now
            ),
            "expired at": mint_token(
                setup.authority.ca.private_key,
                ACME,
                datetime.timedelta(minutes=5),
                now=now - datetime.timedelta(hours=1),
            ),
            "malformed": "not-a-token",
        }
        for expected, token in cases.items():
            with pytest.raises(TunnelError, match=expected):
                await register_connector(setup.authority, config, token=token)
        # None of them spent anything or wrote a certificate.
        assert setup.authority.state.issued() == []
        assert not (tmp_path / "connector-acme.pem").exists()
    denied = [
        line
        for line in audit_lines(tmp_path / "gateway-audit.jsonl")
        if line.get("event") == "connector_register" and line.get("decision") == "deny"
    ]
    assert len(denied) == len(cases)


async def test_tokens_never_reach_logs_or_audit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        token = setup.authority.mint_token(ACME, datetime.timedelta(minutes=5))
        await register_connector(setup.authority, config, token=token)
        with pytest.raises(TunnelError):
            await register_connector(setup.authority, config, token=token)
    assert token not in caplog.text
    assert token not in (tmp_path / "gateway-audit.jsonl").read_text()
    for path in (tmp_path / "registration-state").iterdir():
        assert token not in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_subaccount_without_shared_token_refuses_token_connectors(tmp_path: Path) -> None:
    from backchannel import ConnectorConfig
    from tests.harness import CONNECTOR_TOKEN, connector_document, tls_material

    async with registration_gateway(tmp_path) as setup:
        document = connector_document(
            tls_material(tmp_path / "tls"),
            setup.address.port,
            tmp_path / "connector-audit.jsonl",
            [],
            token=CONNECTOR_TOKEN,
        )
        config = ConnectorConfig.from_mapping(document, source="connector.toml")
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(lambda s: s.attempts >= 2)
        assert "accepts registered connectors only" in status.last_error
        assert not status.connected


async def test_renewal_before_expiry_with_moved_clock(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        first = _certificate(path)
        # 25 of 30 days later: less than a third of the lifetime is left, renewal is due.
        setup.clock.days(25)
        async with connector_on(config, setup.clock) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: s.certificate is not None and s.certificate.renewals >= 1
                )
            renewed = _certificate(path)
            assert renewed.serial_number != first.serial_number
            assert renewed.not_valid_after_utc - first.not_valid_after_utc > datetime.timedelta(
                days=24
            )
            assert renewed.public_key() != first.public_key()
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            # The next tunnel authenticates with the new certificate.
            (entry,) = setup.gateway.connected()
            assert entry.tunnel is not None
            entry.tunnel.abort("test: drop the tunnel")
            with trio.fail_after(10):
                await connector.wait_status(lambda s: s.connects >= 2 and s.connected)
            (entry,) = setup.gateway.connected()
            assert entry.certificate is not None
            assert entry.certificate.serial_number == renewed.serial_number
            assert status.certificate is not None
            assert status.certificate.renewals == 1
    reasons = [record.reason for record in setup.authority.state.issued()]
    assert reasons == ["registration", "renewal"]
    renewals = [
        line
        for line in audit_lines(tmp_path / "connector-audit.jsonl")
        if line.get("event") == "certificate_renewal"
    ]
    assert renewals
    assert renewals[0]["serial"] == serial_text(renewed)


async def test_no_renewal_while_plenty_of_lifetime_is_left(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        first = _certificate(path)
        async with connector_on(config, later_by(5)) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: s.certificate is not None and s.certificate.checks >= 1
                )
            assert status.certificate is not None
            assert status.certificate.renewals == 0
        assert _certificate(path).serial_number == first.serial_number


@pytest.mark.parametrize(("days_later", "renewed"), [(25, False), (28.5, True)])
async def test_configured_renew_before_days(
    tmp_path: Path, days_later: float, renewed: bool
) -> None:
    # With the default (a third of 30 days) day 25 would renew; renew_before_days = 2 waits
    # until day 28.
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path, renew_before_days=2)
        await register_connector(setup.authority, config)
        setup.clock.days(days_later)
        async with connector_on(config, setup.clock) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: s.certificate is not None and s.certificate.checks >= 1
                )
        assert status.certificate is not None
        assert status.certificate.renewals == int(renewed)


async def test_revocation_cuts_the_tunnel_and_refuses_it_by_name(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        serial = serial_text(_certificate(path))
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            setup.authority.state.revoke([serial], reason="laptop stolen", now=setup.clock())
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: not s.connected and "revoked" in s.last_error and s.attempts >= 2
                )
            assert f"serial {serial}" in status.last_error
            assert "laptop stolen" in status.last_error
    denied = [
        line
        for line in audit_lines(tmp_path / "gateway-audit.jsonl")
        if line.get("decision") == "deny" and "revoked" in str(line.get("reason"))
    ]
    assert {line["event"] for line in denied} >= {"connector_tunnel", "connector_register"}


async def test_gateway_refuses_an_expired_certificate_by_name(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        serial = serial_text(_certificate(path))
        setup.clock.days(31)  # the gateway's clock only: the connector still thinks it is fine
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(lambda s: "expired at" in s.last_error)
        assert f"serial {serial}" in status.last_error
        assert "register the connector again" in status.last_error


async def test_connector_does_not_dial_with_an_expired_certificate(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        async with connector_on(config, later_by(31)) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(lambda s: "expired at" in s.last_error)
        assert "backchannel register" in status.last_error
        assert setup.gateway.connected() == []
    # The gateway never saw it (no refusal recorded).
    assert not [
        line
        for line in audit_lines(tmp_path / "gateway-audit.jsonl")
        if line.get("event") == "connector_register" and line.get("decision") == "deny"
    ]


async def test_missing_certificate_file_says_how_to_register(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: s.attempts >= 1 and bool(s.last_error)
                )
        assert "does not exist" in status.last_error
        assert "backchannel register" in status.last_error


async def test_certificate_from_another_ca_is_refused_at_tls(tmp_path: Path) -> None:
    from backchannel._connector_certificate import new_key_and_request, store_credential
    from backchannel._registration import ConnectorAuthority, RegistrationConfig
    from tests.registration_harness import connector_ca

    other_cert, other_key = connector_ca(tmp_path / "other-ca")
    other = ConnectorAuthority(RegistrationConfig(other_cert, other_key, tmp_path / "other-state"))
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        key, request = new_key_and_request(ACME)
        token = other.mint_token(ACME, datetime.timedelta(minutes=5))
        forged = other.register(token, request)  # right identity, wrong CA
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        store_credential(path, key, forged)
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(
                    lambda s: s.attempts >= 1 and bool(s.last_error)
                )
            assert not status.connected
        assert "connector CA" in status.last_error
        assert setup.gateway.connected() == []


async def test_certificate_of_one_connector_cannot_claim_another_place(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        der = _certificate(path).public_bytes(serialization.Encoding.DER)
        for hello in (
            {"subaccount": "globex", "location": ""},
            {"subaccount": "acme", "location": "plant-2"},
        ):
            with pytest.raises(TunnelError, match="is for acme/-"):
                setup.gateway._authenticate_connector(hello, "127.0.0.1:1", der)
        # And a connector configured for another place will not even use the file.
        with pytest.raises(CredentialError, match="configured as acme/plant-2"):
            load_credential(path, ConnectorIdentity("acme", "plant-2"))


def test_connector_config_takes_either_token_or_certificate(tmp_path: Path) -> None:
    from backchannel import ConnectorConfig
    from backchannel._exceptions import ConfigError
    from tests.registration_harness import registered_connector_document

    document = registered_connector_document(tmp_path, 1, [])
    sub = document["subaccounts"]["acme"]
    sub["token"] = "also-a-token-0123456789"
    with pytest.raises(ConfigError, match="not both"):
        ConnectorConfig.from_mapping(document)
    del sub["token"], sub["certificate_file"]
    with pytest.raises(ConfigError, match="is required: set certificate_file"):
        ConnectorConfig.from_mapping(document)
    sub["token"] = "a-token-0123456789"
    sub["renew_before_days"] = 3
    with pytest.raises(ConfigError, match="renew_before_days: needs certificate_file"):
        ConnectorConfig.from_mapping(document)


def test_gateway_config_needs_a_token_without_registration(tmp_path: Path) -> None:
    from backchannel import GatewayConfig
    from backchannel._exceptions import ConfigError
    from tests.registration_harness import registration_gateway_document

    document = registration_gateway_document(tmp_path)
    assert GatewayConfig.from_mapping(document).subaccounts["acme"].connector_token is None
    del document["registration"]
    with pytest.raises(ConfigError, match=r"or configure \[registration\]"):
        GatewayConfig.from_mapping(document)


def test_unusable_connector_ca_is_a_config_error(tmp_path: Path) -> None:
    from backchannel import Gateway, GatewayConfig
    from backchannel._exceptions import ConfigError
    from tests.registration_harness import registration_gateway_document

    document = registration_gateway_document(tmp_path)
    (tmp_path / "not-a-key.pem").write_text("nothing here")
    document["registration"]["ca_key"] = str(tmp_path / "not-a-key.pem")
    with pytest.raises(ConfigError, match="connector CA is unusable"):
        Gateway(GatewayConfig.from_mapping(document))
