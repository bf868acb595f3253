"""Registration end to end with real processes and the real command line: the gateway
operator mints a token, the connector registers, tunnels with its certificate, shows its
expiry in ``backchannel status``; revocation cuts it with a message that names the
certificate, and a new registration while the connector runs brings it back."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from python_socks import ProxyType
from python_socks.sync import Proxy

from tests.harness import APP_SECRET, tls_material
from tests.procs import (
    BACKCHANNEL,
    TIMEOUT,
    child_environment,
    run_cli,
    running,
    wait_until,
    write_secret,
    write_toml,
)
from tests.test_processes import hello_server

pytestmark = pytest.mark.integration


def _gateway_toml(directory: Path) -> Path:
    tls = tls_material(directory / "tls")
    write_secret(directory / "app.secret", APP_SECRET)
    document = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls_cert": str(tls.cert_file),
            "tls_key": str(tls.key_file),
        },
        "audit": {"file": "gateway-audit.jsonl"},
        "registration": {
            "ca_cert": "connector-ca/ca.pem",
            "ca_key": "connector-ca/ca.key",
            "state_dir": "registration",
            "revocation_check_interval": 0.2,
        },
        # No connector_token: acme takes registered connectors only.
        "subaccounts": {"acme": {"apps": {"crm": {"secret_file": "app.secret"}}}},
        "plugins": {"tcp": {"socks5_listen": "127.0.0.1:0"}},
    }
    return write_toml(directory / "gateway.toml", document)


def _connector_toml(directory: Path, tunnel_port: int, http_port: int) -> Path:
    document = {
        "tunnel": {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.3},
        "audit": {"file": "connector-audit.jsonl"},
        "subaccounts": {
            "acme": {
                "gateway": f"wss://127.0.0.1:{tunnel_port}/tunnel",
                "certificate_file": "connector.pem",
                "ca_file": "tls/ca.pem",
                "use_environment_proxy": False,
                "mappings": [
                    {
                        "virtual": "hello.virtual:80",
                        "internal": f"127.0.0.1:{http_port}",
                        "protocol": "tcp",
                    }
                ],
            }
        },
    }
    return write_toml(directory / "connector.toml", document)


def _get_through_socks(socks_port: int) -> bytes:
    proxy = Proxy(
        ProxyType.SOCKS5, "127.0.0.1", socks_port, username="acme/crm", password=APP_SECRET
    )
    sock = proxy.connect(dest_host="hello.virtual", dest_port=80, timeout=TIMEOUT)
    with sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: hello.virtual\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_register_status_revoke_and_register_again(tmp_path: Path) -> None:
    init = run_cli("pki", "init-ca", "--dir", tmp_path / "connector-ca", "--name", "connectors")
    assert init.returncode == 0, init.stderr
    gateway_toml = _gateway_toml(tmp_path)
    with (
        hello_server() as hello,
        running([*BACKCHANNEL, "gateway", "-c", gateway_toml, "--log-json"]) as gateway,
    ):
        tunnel_port = int(
            gateway.wait_for_message(r"^tunnel endpoint on wss://127\.0\.0\.1:(\d+)/")[1]
        )
        gateway.wait_for_message(
            r"^connector registration on wss://127\.0\.0\.1:\d+/tunnel/register"
        )
        socks_port = int(
            gateway.wait_for_message(r"^front door tcp\.socks5 on 127\.0\.0\.1:(\d+)$")[1]
        )
        connector_toml = _connector_toml(tmp_path, tunnel_port, hello.port)

        # Before registering, status says what is missing (and fails).
        before = run_cli("status", "-c", connector_toml)
        assert before.returncode == 1
        assert "NO CERTIFICATE" in before.stdout
        assert "backchannel register" in before.stdout

        token_file = tmp_path / "token.txt"
        minted = run_cli(
            "registration", "token", "-c", gateway_toml, "--subaccount", "acme",
            "--valid-minutes", "10", "--output", token_file,
        )  # fmt: skip
        assert minted.returncode == 0, minted.stderr
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token not in minted.stdout + minted.stderr

        registered = run_cli("register", "-c", connector_toml, "--token-file", token_file)
        assert registered.returncode == 0, registered.stderr
        assert "registered connector acme/-" in registered.stdout
        assert stat.S_IMODE((tmp_path / "connector.pem").stat().st_mode) == 0o600
        serial = registered.stdout.split("certificate serial ")[1].split(",")[0]

        again = run_cli("register", "-c", connector_toml, "--token-file", token_file)
        assert again.returncode == 1
        assert "already holds a valid certificate" in again.stderr
        reused = run_cli("register", "-c", connector_toml, "--token-file", token_file, "--force")
        assert reused.returncode == 1
        assert "already used" in reused.stderr

        status = run_cli("status", "-c", connector_toml)
        assert status.returncode == 0, status.stdout
        assert f"certificate serial {serial}" in status.stdout
        assert "days left" in status.stdout

        with running([*BACKCHANNEL, "connector", "-c", connector_toml, "--log-json"]) as connector:
            connector.wait_for_message(r"^tunnel acme/- → wss://127\.0\.0\.1:\d+/tunnel up$")
            assert _get_through_socks(socks_port).startswith(b"HTTP/1.")

            listing = run_cli("registration", "list", "-c", gateway_toml)
            assert listing.returncode == 0, listing.stderr
            assert serial in listing.stdout
            assert "valid" in listing.stdout

            revoked = run_cli(
                "registration", "revoke", "-c", gateway_toml, "--subaccount", "acme",
                "--reason", "decommissioned",
            )  # fmt: skip
            assert revoked.returncode == 0, revoked.stderr
            connector.wait_for_message(rf"serial {serial} .*was revoked at .*decommissioned")
            gateway.wait_for_message(rf"closing the tunnel of .*serial {serial}")
            listing = run_cli("registration", "list", "-c", gateway_toml)
            assert "revoked" in listing.stdout

            # A new token, given on standard input; the running connector picks the new
            # certificate up at its next attempt.
            second = run_cli("registration", "token", "-c", gateway_toml, "--subaccount", "acme")
            assert second.returncode == 0, second.stderr
            fresh = subprocess.run(
                [*BACKCHANNEL, "register", "-c", str(connector_toml), "--force"],
                input=second.stdout,
                capture_output=True,
                text=True,
                timeout=60,
                env=child_environment(),
                check=False,
            )
            assert fresh.returncode == 0, fresh.stderr
            wait_until(
                lambda: len([m for m in connector.log_messages() if m.endswith("/tunnel up")]) >= 2,
                "the connector's second tunnel",
            )
            assert _get_through_socks(socks_port).startswith(b"HTTP/1.")
    for name in os.listdir(tmp_path / "registration"):
        assert token not in (tmp_path / "registration" / name).read_text()
    assert token not in gateway.output
    assert token not in connector.output
