"""The HTTP plugin with real processes: ``backchannel gateway`` and ``backchannel connector``
started from TOML files in a test folder, nginx behind the connector, curl in front of the
gateway's HTTP proxy and destinations endpoint."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import APP_SECRET, CONNECTOR_TOKEN, audit_lines, tls_material
from tests.nginx import PUBLIC_BODY, SECRET_BODY, Nginx, make_pki, nginx_server
from tests.procs import (
    BACKCHANNEL,
    TIMEOUT,
    Process,
    require_tool,
    running,
    wait_until,
    write_secret,
    write_toml,
)

pytestmark = pytest.mark.integration

DESTINATION_PASSWORD = "rfc-password-for-processes"
SECRETS = (APP_SECRET, CONNECTOR_TOKEN, DESTINATION_PASSWORD)


@dataclass
class HttpSystem:
    """Gateway and connector processes with the gateway's HTTP ports, and nginx."""

    gateway: Process
    connector: Process
    proxy_port: int
    destinations_port: int
    nginx: Nginx
    folder: Path

    def assert_no_secret_leaked(self) -> None:
        texts = [self.gateway.output, self.connector.output]
        texts += [p.read_text() for p in self.folder.glob("*-audit.jsonl")]
        for text in texts:
            for secret in SECRETS:
                assert secret not in text


def _gateway_toml(folder: Path) -> Path:
    tls = tls_material(folder / "tls")
    write_secret(folder / "connector.token", CONNECTOR_TOKEN)
    write_secret(folder / "app.secret", APP_SECRET)
    write_secret(folder / "erp.password", DESTINATION_PASSWORD)
    document = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls_cert": str(tls.cert_file),
            "tls_key": str(tls.key_file),
        },
        "audit": {"file": "gateway-audit.jsonl"},
        "subaccounts": {
            "acme": {
                "connector_token_file": "connector.token",
                "apps": {"crm": {"secret_file": "app.secret"}},
            }
        },
        "plugins": {
            "http": {
                "proxy_listen": "127.0.0.1:0",
                "destinations_listen": "127.0.0.1:0",
                "destinations": [
                    {
                        "name": "erp",
                        "subaccount": "acme",
                        "url": "http://web.virtual:8080/api",
                        "authentication": "BasicAuthentication",
                        "user": "RFC_USER",
                        "password_file": "erp.password",
                    }
                ],
            }
        },
    }
    return write_toml(folder / "gateway.toml", document)


def _connector_toml(folder: Path, tunnel_port: int, nginx: Nginx, pki_folder: Path) -> Path:
    document = {
        "tunnel": {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.5},
        "audit": {"file": "connector-audit.jsonl"},
        "subaccounts": {
            "acme": {
                "gateway": f"wss://127.0.0.1:{tunnel_port}/tunnel",
                "token_file": "connector.token",
                "ca_file": "tls/ca.pem",
                "use_environment_proxy": False,
                "mappings": [
                    {
                        "protocol": "http",
                        "virtual": "web.virtual:8080",
                        "internal": f"127.0.0.1:{nginx.http_port}",
                        "resources": [{"path": "/public"}, {"path": "/api"}],
                    },
                    {
                        "protocol": "https",
                        "virtual": "secure.virtual:443",
                        "internal": f"127.0.0.1:{nginx.mtls_port}",
                        # relative to the config file's folder
                        "ca_file": str(pki_folder.relative_to(folder) / "backend-ca.pem"),
                        "client_cert": str(pki_folder.relative_to(folder) / "connector.pem"),
                        "client_key": str(pki_folder.relative_to(folder) / "connector.key"),
                        "resources": [{"path": "/", "match": "prefix"}],
                    },
                ],
            }
        },
    }
    return write_toml(folder / "connector.toml", document)


@contextmanager
def running_http_system(folder: Path) -> Iterator[HttpSystem]:
    """nginx, then the gateway, then the connector; everything killed on exit."""
    with ExitStack() as stack:
        pki = make_pki(folder / "pki")
        nginx = stack.enter_context(nginx_server(folder / "nginx", pki))
        gateway = stack.enter_context(
            running([*BACKCHANNEL, "gateway", "-c", _gateway_toml(folder), "--log-json"])
        )
        gateway.wait_for_message(r"^backchannel gateway \S+ running")
        tunnel = gateway.wait_for_message(r"^tunnel endpoint on wss://127\.0\.0\.1:(\d+)/")
        proxy = gateway.wait_for_message(r"^front door http\.proxy on 127\.0\.0\.1:(\d+)$")
        destinations = gateway.wait_for_message(
            r"^front door http\.destinations on 127\.0\.0\.1:(\d+)$"
        )
        connector_config = _connector_toml(folder, int(tunnel[1]), nginx, folder / "pki")
        connector = stack.enter_context(
            running([*BACKCHANNEL, "connector", "-c", connector_config, "--log-json"])
        )
        connector.wait_for_message(r"^tunnel acme/- → wss://127\.0\.0\.1:\d+/tunnel up$")
        gateway.wait_for_message(r"^connector acme/-@127\.0\.0\.1:\d+ connected")
        yield HttpSystem(gateway, connector, int(proxy[1]), int(destinations[1]), nginx, folder)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpSystem]:
    require_tool("nginx")
    require_tool("curl")
    with running_http_system(tmp_path_factory.mktemp("http-processes")) as started:
        yield started
        started.assert_no_secret_leaked()


def _curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl -i; (status, headers, body) of the final response."""
    result = subprocess.run(
        [require_tool("curl"), "-sSi", "--max-time", str(TIMEOUT), *args],
        capture_output=True,
        timeout=TIMEOUT + 5,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def _proxy(system: HttpSystem) -> list[str]:
    return [
        "--proxy",
        f"http://127.0.0.1:{system.proxy_port}",
        "--proxy-user",
        f"acme/crm:{APP_SECRET}",
    ]


def test_curl_through_the_proxy_process_reaches_nginx(system: HttpSystem) -> None:
    status, headers, body = _curl(*_proxy(system), "http://web.virtual:8080/public/hello.txt")
    assert (status, body, headers["x-served-by"]) == (200, PUBLIC_BODY, "nginx")

    status, headers, body = _curl(*_proxy(system), "http://web.virtual:8080/admin/secret.txt")
    assert status == 403
    assert "x-served-by" not in headers
    assert body.startswith(b"Access denied to resource http://web.virtual:8080/admin/secret.txt")
    assert SECRET_BODY not in body

    def denial() -> bool:
        return any(
            line["event"] == "http_request"
            and line["decision"] == "deny"
            and line["path"] == "/admin/secret.txt"
            for line in audit_lines(system.folder / "connector-audit.jsonl")
        )

    wait_until(denial, "the connector's audit line for /admin/secret.txt")
    # A last allowed request: once nginx logged it, everything before it has been logged too.
    status, _, body = _curl(*_proxy(system), "http://web.virtual:8080/api/sentinel")
    assert status == 200
    assert b"host=web.virtual:8080\n" in body
    system.nginx.wait_for_entry(lambda e: e["uri"] == "/api/sentinel", "the sentinel")
    assert [e["uri"] for e in system.nginx.log_entries() if "admin" in e["uri"]] == []


def test_https_backend_and_destination_through_processes(system: HttpSystem) -> None:
    status, headers, body = _curl(*_proxy(system), "http://secure.virtual:443/")
    assert (status, headers["x-client-dn"]) == (200, "CN=connector")
    assert body == b"mutual TLS ok: SUCCESS\n"

    status, _, body = _curl(
        "--user",
        f"acme/crm:{APP_SECRET}",
        f"http://127.0.0.1:{system.destinations_port}/destinations/erp/orders?top=5",
    )
    assert status == 200
    expected = base64.b64encode(f"RFC_USER:{DESTINATION_PASSWORD}".encode()).decode()
    assert f"authorization=Basic {expected}\n".encode() in body
    assert b"uri=/api/orders?top=5\n" in body
