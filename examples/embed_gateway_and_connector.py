"""Embed a backchannel gateway and connector in your own trio program (docs/embedding.md).

Everything runs in this one process on 127.0.0.1: a throwaway CA and gateway certificate, a
TCP echo server standing in for an on-premise system, the gateway with its SOCKS5 front door,
and a connector that dials the gateway and maps ``echo.internal:7`` to the echo server. A SOCKS5
client written with plain trio then sends one message through the tunnel and reads it back.

Run it with ``python examples/embed_gateway_and_connector.py``.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import trio

import backchannel

APP_SECRET = "example-app-secret-0123456789"  # noqa: S105  (a throwaway example value)
CONNECTOR_TOKEN = "example-connector-token-0123456789"  # noqa: S105
MESSAGE = b"hello from an embedded program"


async def echo(stream: trio.SocketStream) -> None:
    """The "on-premise system": sends back whatever it receives."""
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


def gateway_config(tls: backchannel.TlsMaterial) -> backchannel.GatewayConfig:
    """Subaccount ``acme`` with app ``crm``; SOCKS5 front door on a free port."""
    return backchannel.GatewayConfig.from_mapping(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls_cert": str(tls.cert_file),
                "tls_key": str(tls.key_file),
            },
            "subaccounts": {
                "acme": {
                    "connector_token": CONNECTOR_TOKEN,
                    "apps": {"crm": {"secret": APP_SECRET}},
                }
            },
            "plugins": {"tcp": {"socks5_listen": "127.0.0.1:0"}},
        },
        source="embedded gateway config",
    )


def connector_config(
    tls: backchannel.TlsMaterial, tunnel: backchannel.HostPort, echo_port: int
) -> backchannel.ConnectorConfig:
    """Dial the gateway for ``acme``; allow exactly one system: echo.internal:7."""
    return backchannel.ConnectorConfig.from_mapping(
        {
            "subaccounts": {
                "acme": {
                    "gateway": f"wss://{tunnel.host}:{tunnel.port}/tunnel",
                    "token": CONNECTOR_TOKEN,
                    "ca_file": str(tls.ca_file),
                    "use_environment_proxy": False,
                    "mappings": [
                        {
                            "protocol": "tcp",
                            "virtual": "echo.internal:7",
                            "internal": f"127.0.0.1:{echo_port}",
                        }
                    ],
                }
            }
        },
        source="embedded connector config",
    )


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    """Read exactly ``count`` bytes or fail."""
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


async def socks5_connect(
    proxy: backchannel.HostPort, user: str, password: str, host: str, port: int
) -> trio.SocketStream:
    """RFC 1928 CONNECT with RFC 1929 username/password, the host name resolved remotely."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        await stream.send_all(b"\x05\x01\x02")  # version 5, one method: username/password
        if await receive_exactly(stream, 2) != b"\x05\x02":
            raise ConnectionError("the proxy refused username/password authentication")
        name, secret = user.encode(), password.encode()
        await stream.send_all(bytes([1, len(name)]) + name + bytes([len(secret)]) + secret)
        if await receive_exactly(stream, 2) != b"\x01\x00":
            raise ConnectionError("the proxy refused the credentials")
        target = host.encode()
        await stream.send_all(
            b"\x05\x01\x00\x03" + bytes([len(target)]) + target + port.to_bytes(2, "big")
        )
        _, reply, _, address_type = await receive_exactly(stream, 4)
        address_length = {1: 4, 4: 16}.get(address_type) or (await receive_exactly(stream, 1))[0]
        await receive_exactly(stream, address_length + 2)  # bound address and port: unused
        if reply != 0:
            raise ConnectionError(f"SOCKS5 reply {reply:#04x}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def main() -> None:
    """Start everything, make one round trip through the tunnel, shut down."""
    with tempfile.TemporaryDirectory() as scratch:
        # A CA and a gateway certificate for 127.0.0.1; the connector trusts the CA (ca_file).
        tls = backchannel.write_throwaway_tls_material(Path(scratch))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            echo_port = listeners[0].socket.getsockname()[1]

            async with backchannel.open_gateway(gateway_config(tls)) as gateway:
                assert gateway.tunnel_address is not None
                socks = gateway.front_door_addresses["tcp.socks5"][0]
                print(f"gateway: tunnels on {gateway.tunnel_address}, SOCKS5 on {socks}")

                config = connector_config(tls, gateway.tunnel_address, echo_port)
                async with backchannel.open_connector(config) as connector:
                    with trio.fail_after(10):
                        await connector.wait_connected()
                    print("connector: tunnel up")

                    with trio.fail_after(10):
                        client = await socks5_connect(
                            socks, "acme/crm", APP_SECRET, "echo.internal", 7
                        )
                        async with client:
                            await client.send_all(MESSAGE)
                            answer = await receive_exactly(client, len(MESSAGE))
                    print(f"echo through the tunnel: {answer.decode()}")
            nursery.cancel_scope.cancel()  # stop the echo server
    print("stopped")


if __name__ == "__main__":
    trio.run(main)
