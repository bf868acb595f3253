"""Regression tests for the fresh-eyes review of connector registration: revocation must stick
through renewals, a broken revocation list must not stop the gateway, reloads must not crash
it or hide what they do not apply, refusals of the upgrade are TunnelErrors, an expired CA
spends no token, and unauthenticated input stays small in the audit trail."""

from __future__ import annotations

import datetime
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio_websocket

from backchannel import ConnectorConfig, open_connector, open_gateway
from backchannel._connector import TunnelStatus
from backchannel._connector_certificate import CredentialError, load_credential, register
from backchannel._connector_identity import ConnectorIdentity, serial_text
from backchannel._exceptions import TunnelError
from backchannel._pki import CertificateAuthority
from backchannel._proto._errors import ResetCode
from backchannel._registration import ConnectorAuthority, RegistrationConfig
from backchannel._registration_token import RegistrationError
from backchannel._transport import GatewayAddress, client_ssl_context
from tests.harness import audit_lines, connector_document, gateway_document, tls_material
from tests.procs import write_toml
from tests.registration_harness import (
    connector_for,
    connector_on,
    register_connector,
    registration_gateway,
)
from tests.test_trust_reload import _idp, _write_gateway

ACME = ConnectorIdentity("acme", "")


async def test_a_revoked_connector_cannot_renew_over_its_live_tunnel(tmp_path: Path) -> None:
    # A slow watcher: the renewal attempt comes long before the watcher cuts the tunnel.
    async with registration_gateway(tmp_path, check_interval=3600) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        first = load_credential(path, ACME).certificate
        async with connector_on(config, setup.clock, check_interval=0.05) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            serials = [record.serial for record in setup.authority.state.issued()]
            setup.authority.state.revoke(serials, reason="laptop stolen", now=setup.clock())
            setup.clock.days(25)  # renewal is due: the connector asks at its next check
            with trio.fail_after(10):
                status = await connector.wait_status(_renewal_failed_with("was revoked"))
            assert status.certificate is not None
            assert status.certificate.renewals == 0
        assert load_credential(path, ACME).certificate.serial_number == first.serial_number
        assert [record.reason for record in setup.authority.state.issued()] == ["registration"]


def _renewal_failed_with(text: str) -> Callable[[TunnelStatus], bool]:
    def check(status: TunnelStatus) -> bool:
        return status.certificate is not None and text in status.certificate.renewal_error

    return check


@pytest.mark.parametrize("revoke_newest", [True, False])
async def test_revoking_either_end_of_a_renewal_chain_cuts_the_tunnel(
    tmp_path: Path, revoke_newest: bool
) -> None:
    async with registration_gateway(tmp_path, check_interval=0.05) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        old = load_credential(path, ACME).certificate
        async with connector_on(config, setup.clock, check_interval=0.05) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            setup.clock.days(25)
            with trio.fail_after(10):
                await connector.wait_status(
                    lambda s: s.certificate is not None and s.certificate.renewals >= 1
                )
            new = load_credential(path, ACME).certificate
            # The tunnel now stands for the new certificate: the old one's expiry (day 30)
            # is no reason to cut it...
            setup.clock.days(31)
            (entry,) = setup.gateway.connected()
            assert entry.certificate is not None
            assert entry.certificate.serial_number == new.serial_number
            assert setup.authority.refusal(entry.certificate) is None
            # ...but revoking either serial is.
            target = new if revoke_newest else old
            setup.authority.state.revoke([serial_text(target)], reason="stolen", now=setup.clock())
            problem = setup.authority.refusal(new)
            assert problem is not None
            assert "was revoked" in problem
            if not revoke_newest:
                assert f"it renewed serial {serial_text(old)}" in problem
            with trio.fail_after(10):
                status = await connector.wait_status(lambda s: "was revoked" in s.last_error)
            assert not status.connected


async def test_renewal_too_early_is_refused(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        path = config.subaccounts["acme"].certificate_file
        assert path is not None
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            status = connector.status["acme"]
            assert status.certificate is not None
            assert status.tunnel is not None
            with pytest.raises(CredentialError, match="renewed only in the last 60%"):
                await status.certificate._renew(status.tunnel, load_credential(path, ACME))
            assert status.connected


async def test_a_broken_revocation_list_does_not_stop_the_gateway(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path, check_interval=0.05) as setup:
        config = connector_for(setup, tmp_path)
        await register_connector(setup.authority, config)
        revoked = tmp_path / "registration-state" / "revoked.json"
        # Never a good list: certificate authentication fails closed, the gateway serves on.
        revoked.write_text('{"abc": ')
        async with open_connector(config) as connector:
            with trio.fail_after(10):
                status = await connector.wait_status(lambda s: "cannot be checked" in s.last_error)
            assert "is not a valid revocation list" in status.last_error
            # A good list, then a hand-edit that breaks it: the last good list stays.
            revoked.write_text("{}")
            with trio.fail_after(10):
                await connector.wait_connected()
            revoked.write_text("[1, 2")
            # What the watcher asks each round: the last good (empty) list stays in force.
            path = config.subaccounts["acme"].certificate_file
            assert path is not None
            certificate = load_credential(path, ACME).certificate
            assert setup.authority.refusal(certificate) is None
            assert "is not a valid revocation list" in setup.authority.state.revocation_error
            assert connector.status["acme"].connected
        assert setup.gateway.tunnel_address is not None


async def test_reload_skips_a_closing_tunnel_and_names_what_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    corp, partner = _idp(tmp_path, "corp"), _idp(tmp_path, "partner")
    gateway_toml = _write_gateway(tmp_path, [corp])
    async with open_gateway(gateway_toml) as gateway:
        assert gateway.tunnel_address is not None
        document = connector_document(
            tls_material(tmp_path / "tls"), gateway.tunnel_address.port, tmp_path / "a.jsonl", []
        )
        async with open_connector(ConnectorConfig.from_mapping(document)) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            (entry,) = gateway.connected()
            assert entry.tunnel is not None
            entry.tunnel._mux._terminate(ResetCode.PROTOCOL_ERROR, "simulated protocol failure")
            _write_gateway(tmp_path, [corp, partner])  # a new IdP, and a rotated token
            text = gateway_toml.read_text()
            gateway_toml.write_text(
                text.replace("connector-token-for-tests", "rotated-connector-token")
            )
            assert gateway.reload_identity_providers() == ["acme"]
    assert "take effect only at the next restart: subaccounts.acme.connector_token" in caplog.text


async def test_a_refused_upgrade_is_a_tunnel_error(tmp_path: Path) -> None:
    tls = tls_material(tmp_path / "tls")
    toml = write_toml(tmp_path / "gateway.toml", gateway_document(tls, tmp_path / "a.jsonl"))
    async with open_gateway(toml) as gateway:  # no [registration]: /tunnel/register is a 404
        assert gateway.tunnel_address is not None
        address = GatewayAddress("127.0.0.1", gateway.tunnel_address.port, "/tunnel")
        with pytest.raises(TunnelError, match="refused the WebSocket upgrade"):
            await register(
                address,
                ACME,
                "bcreg1.x.y",
                ssl_context=client_ssl_context(tls.ca_file),
                proxy=None,
                answer_within=5,
            )


def test_an_expired_connector_ca_spends_no_token(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("short-lived connector CA", valid_days=1)
    cert, key = ca.save(tmp_path / "ca")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    now = [datetime.datetime.now(datetime.UTC)]
    authority = ConnectorAuthority(
        RegistrationConfig(cert, key, tmp_path / "state"), clock=lambda: now[0]
    )
    token = authority.mint_token(ACME, datetime.timedelta(days=3))
    now[0] = later
    from backchannel._connector_certificate import new_key_and_request

    _, request = new_key_and_request(ACME)
    for _attempt in range(2):  # the same message twice: the token was not spent
        with pytest.raises(RegistrationError, match="connector CA expired"):
            authority.register(token, request)
    with pytest.raises(RegistrationError, match="connector CA expired"):
        authority.mint_token(ACME, datetime.timedelta(minutes=5))


async def test_unauthenticated_registrations_stay_small_in_the_audit_trail(tmp_path: Path) -> None:
    async with registration_gateway(tmp_path) as setup:
        context = ssl.create_default_context(cafile=str(tls_material(tmp_path / "tls").ca_file))
        audit = tmp_path / "gateway-audit.jsonl"
        before = audit.stat().st_size if audit.exists() else 0
        async with trio_websocket.open_websocket(
            "127.0.0.1", setup.address.port, "/tunnel/register", use_ssl=context
        ) as ws:
            await ws.send_message(
                json.dumps(
                    {"token": "x", "csr": "", "subaccount": "A" * 30000, "location": "B" * 700}
                )
            )
            answer = json.loads(await ws.get_message())
        assert "error" in answer
        assert audit.stat().st_size - before < 2000
    denied = [line for line in audit_lines(audit) if line["event"] == "connector_register"]
    assert len(denied[-1]["subaccount"]) == 80


def test_identity_names_are_matched_whole() -> None:
    with pytest.raises(ValueError, match="invalid subaccount"):
        ConnectorIdentity("acme\n", "")
    with pytest.raises(ValueError, match="invalid location"):
        ConnectorIdentity("acme", "plant\n")
