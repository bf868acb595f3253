"""Regressions from the code review: hostile or broken peers must not stop a gateway or a
connector, nor grow their memory without bound."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import struct
from functools import partial
from pathlib import Path

import pytest
import trio

from backchannel import (
    ConnectorConfig,
    ResetCode,
    StreamError,
    TunnelSettings,
    open_connector,
)
from backchannel._proto._errors import ProtocolError
from backchannel._proto._events import Event, PingReceived
from backchannel._proto._frames import FrameType, encode_frame
from backchannel._proto._mux import Mux, MuxSettings
from tests.harness import (
    connector_document,
    echo_server,
    receive_exactly,
    running_pair,
    socks_connect,
    tls_material,
)
from tests.tunnel_pair import tunnel_pair


def _bad_upgrade_then_reset(port: int, ca_file: Path) -> None:
    """TLS, an upgrade request without Upgrade header, then a TCP reset (RST)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()


async def test_gateway_survives_broken_upgrades_and_resets(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        async with running_pair(tmp_path, mappings) as pair:
            assert pair.gateway.tunnel_address is not None
            tls = tls_material(tmp_path / "tls")
            with trio.fail_after(20):
                for _ in range(10):
                    await trio.to_thread.run_sync(
                        _bad_upgrade_then_reset, pair.gateway.tunnel_address.port, tls.ca_file
                    )
                # The gateway is still there, and so is the existing tunnel.
                stream = await socks_connect(pair.socks, "echo.virtual", 7)
                async with stream:
                    await stream.send_all(b"still here")
                    assert await receive_exactly(stream, 10) == b"still here"


async def test_connector_keeps_retrying_when_dropped_right_after_the_upgrade(
    tmp_path: Path,
) -> None:
    tls = tls_material(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    attempts = 0
    enough = trio.Event()

    async def accept_upgrade_then_reset(tcp: trio.SocketStream) -> None:
        nonlocal attempts
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tcp.socket.close()
        attempts += 1
        if attempts >= 3:
            enough.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, accept_upgrade_then_reset, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        config = ConnectorConfig.from_mapping(
            connector_document(tls, port, tmp_path / "audit.jsonl", []), source="connector.toml"
        )
        with trio.fail_after(20):
            async with open_connector(config) as connector:
                await enough.wait()
                assert "dropped the connection" in connector.status["acme"].last_error
        nursery.cancel_scope.cancel()
    assert attempts >= 3


async def test_a_peer_that_pings_without_reading_is_cut_off() -> None:
    # A ping rate the flood limit allows (test_mux_limits.py covers that limit): the output
    # limit must catch a peer that does not read on its own.
    settings = TunnelSettings(
        mux=MuxSettings(max_pings_per_second=10**6), output_high_water=64 * 1024
    )
    async with tunnel_pair(gateway_settings=settings) as pair:
        pair.gateway_transport.hold_sends()  # the gateway's output stays queued: no one reads
        ping = encode_frame(FrameType.PING, 0, b"12345678")
        limit = settings.output_limit
        with trio.fail_after(10):
            # Each PING makes the gateway queue a 20-byte PONG; inject well past the limit.
            for _ in range(limit // (20 * 5000) + 2):
                try:
                    await pair.connector_transport.inject(ping * 5000)
                except Exception:
                    break
            await pair.gateway.wait_closed()
        assert "peer does not read" in pair.gateway.close_reason


async def test_stream_open_times_out_when_the_peer_never_answers() -> None:
    settings = TunnelSettings(stream_open_timeout=0.2)
    async with tunnel_pair(gateway_settings=settings, accept=False) as pair:
        with trio.fail_after(5), pytest.raises(StreamError) as info:
            await pair.gateway.open_stream({"protocol": "test"})
        assert info.value.code == ResetCode.BACKEND_TIMEOUT
        assert "did not answer the stream open within 0.2 s" in info.value.reason


async def test_go_away_and_aclose_after_the_tunnel_closed_are_quiet() -> None:
    async with tunnel_pair() as pair:
        opener, _ = await pair.open_pair()
        pair.gateway.go_away(ResetCode.NO_ERROR, "stopping")
        pair.gateway.abort("test: the tunnel dies")
        with trio.fail_after(5):
            await pair.gateway.wait_closed()
        pair.gateway.go_away(ResetCode.NO_ERROR, "again")  # no RuntimeError
        await opener.aclose()  # no RuntimeError either


def test_hello_with_a_lone_surrogate_is_a_protocol_error() -> None:
    gateway = Mux(initiator=False)
    hello = json.dumps(
        {
            "protocol": "backchannel/1",
            "initial_window": 65536,
            "max_frame_size": 65536,
            "max_concurrent_streams": 10,
            "subaccount": "\ud800x",
            "token": "t",
        },
        ensure_ascii=True,
    ).encode()
    with pytest.raises(ProtocolError, match="not valid Unicode"):
        gateway.receive_data(encode_frame(FrameType.HELLO, 0, hello))


async def test_gateway_keeps_no_connector_token(tmp_path: Path) -> None:
    async with running_pair(tmp_path, []) as pair:
        entries = pair.gateway.connected()
        assert len(entries) == 1
        assert entries[0].tunnel is not None
        assert "token" not in entries[0].tunnel.peer_info


async def test_heartbeat_keeps_one_ping_in_flight_while_the_peer_is_silent() -> None:
    # A stall: the gateway's answers are held back. The connector must not pile up a PING
    # per interval (they would reach the gateway as a burst when the path recovers).
    settings = TunnelSettings(heartbeat_interval=0.05, heartbeat_timeout=30)
    async with tunnel_pair(connector_settings=settings) as pair:
        pings: list[object] = []
        receive = pair.gateway._mux.receive_data

        def counting(data: bytes | bytearray | memoryview) -> list[Event]:
            events = receive(data)
            pings.extend(e for e in events if isinstance(e, PingReceived))
            return events

        pair.gateway._mux.receive_data = counting  # type: ignore[method-assign]
        pair.gateway_transport.hold_sends()
        await trio.sleep(0.6)  # the stall under test: a dozen heartbeat intervals
        assert len(pings) == 1
