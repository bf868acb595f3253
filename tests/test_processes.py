"""Real processes: ``backchannel gateway`` and ``backchannel connector`` started from TOML files,
reached with curl, redis-cli and python-socks, stopped with SIGTERM."""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from python_socks import ProxyError, ProxyType
from python_socks.sync import Proxy

from tests.harness import APP_SECRET, CONNECTOR_TOKEN, audit_lines, tls_material
from tests.procs import (
    BACKCHANNEL,
    TIMEOUT,
    Process,
    TcpSocket,
    redis_server,
    require_tool,
    running,
    tcp_sockets,
    wait_until,
    write_secret,
    write_toml,
)

pytestmark = pytest.mark.integration

HELLO_BODY = b"hello from the on-premise web server\n"
SECRETS = (APP_SECRET, CONNECTOR_TOKEN)
PING = b"*1\r\n$4\r\nPING\r\n"


class _HelloHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the connection outlives the response
    clients: list[tuple[str, int]]

    def do_GET(self) -> None:
        self.clients.append(self.client_address[:2])
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(HELLO_BODY)))
        self.end_headers()
        self.wfile.write(HELLO_BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


@dataclass
class HelloServer:
    """A stdlib HTTP server in a thread; ``clients`` are the peers of the requests it served."""

    port: int
    clients: list[tuple[str, int]] = field(default_factory=list)


@contextmanager
def hello_server() -> Iterator[HelloServer]:
    """Serve GET / with HELLO_BODY on 127.0.0.1 (port chosen by the OS)."""
    clients: list[tuple[str, int]] = []
    handler = type("Handler", (_HelloHandler,), {"clients": clients})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HelloServer(server.server_address[1], clients)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@dataclass
class System:
    """A gateway and a connector process with their ports and files."""

    gateway: Process
    connector: Process
    tunnel_port: int
    socks_port: int
    forward_port: int
    gateway_audit: Path
    connector_audit: Path
    hello: HelloServer
    redis_port: int

    def assert_no_secret_leaked(self) -> None:
        """Neither process logged a secret, and no audit line holds one."""
        texts = [self.gateway.output, self.connector.output]
        texts += [p.read_text() for p in (self.gateway_audit, self.connector_audit) if p.exists()]
        for text in texts:
            for secret in SECRETS:
                assert secret not in text


def _gateway_toml(directory: Path) -> Path:
    tls = tls_material(directory / "tls")
    write_secret(directory / "connector.token", CONNECTOR_TOKEN)
    write_secret(directory / "app.secret", APP_SECRET)
    document = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls_cert": str(tls.cert_file),
            "tls_key": str(tls.key_file),
        },
        "audit": {"file": "gateway-audit.jsonl"},
        "subaccounts": {
            "acme": {
                # relative to the config file's folder
                "connector_token_file": "connector.token",
                "apps": {"crm": {"secret_file": "app.secret"}},
            }
        },
        "plugins": {
            "tcp": {
                "socks5_listen": "127.0.0.1:0",
                "forwards": [
                    {"listen": "127.0.0.1:0", "subaccount": "acme", "target": "redis.virtual:6379"}
                ],
            }
        },
    }
    return write_toml(directory / "gateway.toml", document)


def _connector_toml(directory: Path, tunnel_port: int, http_port: int, redis_port: int) -> Path:
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
                        "virtual": "hello.virtual:80",
                        "internal": f"127.0.0.1:{http_port}",
                        "protocol": "tcp",
                    },
                    {
                        "virtual": "redis.virtual:6379",
                        "internal": f"127.0.0.1:{redis_port}",
                        "protocol": "tcp",
                    },
                ],
            }
        },
    }
    return write_toml(directory / "connector.toml", document)


@contextmanager
def running_system(directory: Path) -> Iterator[System]:
    """Backends, then the gateway, then the connector; everything killed on exit."""
    with ExitStack() as stack:
        hello = stack.enter_context(hello_server())
        redis_port = stack.enter_context(redis_server())
        gateway_config = _gateway_toml(directory)
        gateway = stack.enter_context(
            running([*BACKCHANNEL, "gateway", "-c", gateway_config, "--log-json"])
        )
        gateway.wait_for_message(r"^backchannel gateway \S+ running")
        tunnel_port = int(
            gateway.wait_for_message(r"^tunnel endpoint on wss://127\.0\.0\.1:(\d+)/")[1]
        )
        socks_port = int(
            gateway.wait_for_message(r"^front door tcp\.socks5 on 127\.0\.0\.1:(\d+)$")[1]
        )
        forward_port = int(
            gateway.wait_for_message(r"^front door tcp\.forward\[.*\] on 127\.0\.0\.1:(\d+)$")[1]
        )
        connector_config = _connector_toml(directory, tunnel_port, hello.port, redis_port)
        connector = stack.enter_context(
            running([*BACKCHANNEL, "connector", "-c", connector_config, "--log-json"])
        )
        connector.wait_for_message(r"^tunnel acme/- → wss://127\.0\.0\.1:\d+/tunnel up$")
        gateway.wait_for_message(r"^connector acme/-@127\.0\.0\.1:\d+ connected")
        yield System(
            gateway,
            connector,
            tunnel_port,
            socks_port,
            forward_port,
            directory / "gateway-audit.jsonl",
            directory / "connector-audit.jsonl",
            hello,
            redis_port,
        )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """One gateway + connector pair shared by the read-only tests of this module."""
    require_tool("redis-server")
    with running_system(tmp_path_factory.mktemp("processes")) as running_pair:
        yield running_pair
        running_pair.assert_no_secret_leaked()


def _curl(system: System, url: str) -> subprocess.CompletedProcess[str]:
    curl = require_tool("curl")
    return subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--max-time",
            str(TIMEOUT),
            "--socks5-hostname",
            f"127.0.0.1:{system.socks_port}",
            "--proxy-user",
            f"acme/crm:{APP_SECRET}",
            "--write-out",
            "\n%{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 5,
        check=False,
    )


def _redis_cli(port: int, *command: str) -> str:
    redis_cli = require_tool("redis-cli")
    result = subprocess.run(
        [redis_cli, "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return result.stdout.strip()


def _socks(system: System, host: str, port: int) -> socket.socket:
    proxy = Proxy(
        ProxyType.SOCKS5,
        "127.0.0.1",
        system.socks_port,
        username="acme/crm",
        password=APP_SECRET,
        rdns=True,
    )
    sock: socket.socket = proxy.connect(dest_host=host, dest_port=port, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def _request(sock: socket.socket, data: bytes, *, lines: int) -> list[bytes]:
    """Send ``data`` and read ``lines`` CRLF-terminated lines of the answer."""
    sock.sendall(data)
    with sock.makefile("rb") as reader:
        answer = [reader.readline() for _ in range(lines)]
    assert all(line.endswith(b"\r\n") for line in answer), answer
    return answer


def test_curl_through_socks5_reaches_the_http_server(system: System) -> None:
    result = _curl(system, "http://hello.virtual/")
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200"
    assert body.encode() == HELLO_BODY


def test_redis_cli_through_a_port_forward(system: System) -> None:
    assert _redis_cli(system.forward_port, "SET", "greeting", "through the tunnel") == "OK"
    assert _redis_cli(system.forward_port, "GET", "greeting") == "through the tunnel"
    # The value really is in the on-premise redis, not somewhere on the way.
    assert _redis_cli(system.redis_port, "GET", "greeting") == "through the tunnel"


def test_redis_through_socks5_with_python_socks(system: System) -> None:
    with _socks(system, "redis.virtual", 6379) as sock:
        set_command = b"*3\r\n$3\r\nSET\r\n$5\r\nsocks\r\n$3\r\nyes\r\n"
        assert _request(sock, set_command, lines=1) == [b"+OK\r\n"]
        get_command = b"*2\r\n$3\r\nGET\r\n$5\r\nsocks\r\n"
        assert _request(sock, get_command, lines=2) == [b"$3\r\n", b"yes\r\n"]
    assert _redis_cli(system.redis_port, "GET", "socks") == "yes"


def _client_ports_of_backend(sockets: list[TcpSocket], backend_port: int) -> set[int]:
    return {s.local_port for s in sockets if s.remote_port == backend_port and s.state == 0x01}


def test_only_the_connector_opens_connections(system: System) -> None:
    """The gateway never dials out: all its connected sockets are accepted ones, on its
    tunnel or front-door ports; the backends are dialled by the connector process only."""
    with _socks(system, "redis.virtual", 6379) as sock:
        assert _request(sock, PING, lines=1) == [b"+PONG\r\n"]
        # The stream is open end to end now: look at both processes' sockets.
        gateway_sockets = tcp_sockets(system.gateway.pid)
        connector_sockets = tcp_sockets(system.connector.pid)
        own_ports = {system.tunnel_port, system.socks_port, system.forward_port}
        assert {s.local_port for s in gateway_sockets if s.listening} == own_ports
        connected = [s for s in gateway_sockets if not s.listening]
        assert connected, "expected the tunnel and the SOCKS5 client connection"
        for sock_info in connected:
            assert sock_info.local_port in own_ports, f"gateway dialled out: {sock_info}"
        assert any(s.local_port == system.tunnel_port and s.state == 0x01 for s in gateway_sockets)
        assert any(s.local_port == system.socks_port and s.state == 0x01 for s in gateway_sockets)
        # The connector: no listening socket at all, one tunnel to the gateway, one to redis.
        assert not [s for s in connector_sockets if s.listening]
        assert [
            s for s in connector_sockets if s.remote_port == system.tunnel_port and s.state == 1
        ]
        assert _client_ports_of_backend(connector_sockets, system.redis_port)
    # The HTTP backend saw its request come from a socket the connector held.
    before = len(system.hello.clients)
    with _socks(system, "hello.virtual", 80) as sock:
        request = b"GET / HTTP/1.1\r\nHost: hello.virtual\r\n\r\n"
        assert _request(sock, request, lines=1) == [b"HTTP/1.1 200 OK\r\n"]
        wait_until(lambda: len(system.hello.clients) > before, "the HTTP request to arrive")
        client_port = system.hello.clients[-1][1]
        connector_ports = _client_ports_of_backend(
            tcp_sockets(system.connector.pid), system.hello.port
        )
        assert client_port in connector_ports
        assert not _client_ports_of_backend(tcp_sockets(system.gateway.pid), system.hello.port)


def test_denied_target_gives_curl_a_socks_error_and_an_audit_line(system: System) -> None:
    result = _curl(system, "http://secret.virtual:22/")
    assert result.returncode == 97, (result.returncode, result.stderr)  # CURLE_PROXY
    assert "SOCKS5" in result.stderr
    assert "(2)" in result.stderr  # the SOCKS5 reply code: connection not allowed by ruleset
    assert APP_SECRET not in result.stderr

    def denial() -> bool:
        return any(
            line["decision"] == "deny" and line["target"] == "secret.virtual:22"
            for line in audit_lines(system.connector_audit)
        )

    wait_until(denial, "the connector's audit line")
    line = next(
        x for x in audit_lines(system.connector_audit) if x["target"] == "secret.virtual:22"
    )
    assert line["subaccount"] == "acme"
    assert line["app"] == "crm"
    assert line["role"] == "connector"
    assert "no system mapping" in line["reason"]
    assert "127.0.0.1" not in line["reason"]  # internal names never leave the connector


def test_sigterm_drains_open_streams_then_stops(tmp_path: Path) -> None:
    require_tool("redis-server")
    with running_system(tmp_path) as system, _socks(system, "redis.virtual", 6379) as sock:
        assert _request(sock, PING, lines=1) == [b"+PONG\r\n"]
        system.connector.popen.send_signal(signal.SIGTERM)
        system.connector.wait_for_message(r"^received SIGTERM: draining open streams")
        system.gateway.wait_for_message(
            r"peer is going away \(NO_ERROR: connector is shutting down"
        )
        # The stream that was open goes on; new ones are refused cleanly (not connected).
        assert _request(sock, PING, lines=1) == [b"+PONG\r\n"]
        with pytest.raises(ProxyError) as refused:
            _socks(system, "redis.virtual", 6379)
        assert refused.value.error_code == 0x03
        assert system.connector.popen.poll() is None
        sock.close()
        # Once the last stream is done the connector exits by itself, cleanly.
        assert system.connector.popen.wait(timeout=TIMEOUT) == 0
        system.gateway.wait_for_message(r"^connector acme/-@\S+ disconnected: ")
        assert system.gateway.popen.poll() is None
        assert system.gateway.terminate_and_wait(timeout=5) == 0
        assert "backchannel connector stopped" in system.connector.log_messages()
        assert "backchannel gateway stopped" in system.gateway.log_messages()
        system.assert_no_secret_leaked()


def test_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    require_tool("redis-server")
    with running_system(tmp_path) as system, _socks(system, "redis.virtual", 6379) as sock:
        assert _request(sock, PING, lines=1) == [b"+PONG\r\n"]
        system.gateway.popen.send_signal(signal.SIGTERM)
        system.gateway.wait_for_message(r"^received SIGTERM: draining open streams")
        system.gateway.popen.send_signal(signal.SIGTERM)
        assert system.gateway.popen.wait(timeout=5) == 0
        assert "received SIGTERM: stopping now" in system.gateway.log_messages()
        # The connector notices and keeps trying to reconnect (it is not the one stopping).
        system.connector.wait_for_message(r"^tunnel acme/- \S+ wss://\S+ lost: ")
        assert system.connector.popen.poll() is None
