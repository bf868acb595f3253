"""TCP through the tunnel: SOCKS5 and port forwards to a real TCP server, in one process."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from python_socks import ProxyError

from tests.harness import audit_lines, echo_server, receive_exactly, running_pair, socks_connect


async def test_socks5_round_trip(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(10):
                stream = await socks_connect(pair.socks, "echo.virtual", 7)
                async with stream:
                    await stream.send_all(b"hello through the tunnel")
                    assert await receive_exactly(stream, 24) == b"hello through the tunnel"
                    await stream.send_eof()
                    assert await stream.receive_some(10) == b""


async def test_socks5_denied_target_gets_0x02_and_audit_line(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(10), pytest.raises(ProxyError) as info:
                await socks_connect(pair.socks, "other.virtual", 7)
            assert info.value.error_code == 0x02
            lines = [x for x in audit_lines(pair.connector_audit) if x["decision"] == "deny"]
            assert lines[-1]["target"] == "other.virtual:7"
            assert "no system mapping" in lines[-1]["reason"]
            assert lines[-1]["subaccount"] == "acme"
            assert lines[-1]["app"] == "crm"


async def test_socks5_unknown_location_gets_0x03(tmp_path: Path) -> None:
    async with running_pair(tmp_path, []) as pair:
        with trio.fail_after(10), pytest.raises(ProxyError) as info:
            await socks_connect(pair.socks, "echo.virtual", 7, user="acme/crm/elsewhere")
        assert info.value.error_code == 0x03
        line = audit_lines(pair.gateway_audit)[-1]
        assert line["decision"] == "deny"
        assert line["location"] == "elsewhere"
        assert "not connected" in line["reason"] or "no connector" in line["reason"]


async def test_socks5_wrong_credentials_get_0x05(tmp_path: Path) -> None:
    async with running_pair(tmp_path, []) as pair:
        with trio.fail_after(10), pytest.raises(ProxyError) as info:
            await socks_connect(pair.socks, "echo.virtual", 7, password="wrong")
        assert info.value.error_code == 0x05
        line = audit_lines(pair.gateway_audit)[-1]
        assert line["event"] == "socks5_auth"
        assert line["decision"] == "deny"
        assert "wrong" not in line["reason"].replace("wrong connector", "")


async def test_backend_down_gets_0x04(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    mappings = [
        {"virtual": "dead.virtual:7", "internal": f"127.0.0.1:{dead_port}", "protocol": "tcp"}
    ]
    async with running_pair(tmp_path, mappings) as pair:
        with trio.fail_after(10), pytest.raises(ProxyError) as info:
            await socks_connect(pair.socks, "dead.virtual", 7)
        assert info.value.error_code == 0x04


async def test_port_forward(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        forwards = [{"listen": "127.0.0.1:0", "subaccount": "acme", "target": "echo.virtual:7"}]
        async with running_pair(tmp_path, mappings, forwards=forwards) as pair:
            address = pair.forward()
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream(address.host, address.port)
                async with stream:
                    await stream.send_all(b"ping")
                    assert await receive_exactly(stream, 4) == b"ping"


async def test_200_concurrent_streams_each_intact(tmp_path: Path) -> None:
    async with echo_server() as port:
        mappings = [
            {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
        ]
        async with running_pair(tmp_path, mappings) as pair:
            results: dict[int, bool] = {}

            async def one(index: int) -> None:
                payload = os.urandom(20_000 + index * 97)
                stream = await socks_connect(pair.socks, "echo.virtual", 7)
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(stream.send_all, payload)
                    echoed = await receive_exactly(stream, len(payload))
                results[index] = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for index in range(200):
                        nursery.start_soon(one, index)
            assert len(results) == 200
            assert all(results.values())
