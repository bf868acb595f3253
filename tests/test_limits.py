"""Configurable limits: connections per front door (``max_connections``) and streams per
cloud app (``[gateway] max_streams_per_app``). Past a limit the newcomer is refused, the ones
already served carry on, and a freed place is usable again."""

from __future__ import annotations

import base64
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from python_socks import ProxyError

from backchannel import (
    ConnectionLimit,
    ConnectorConfig,
    Gateway,
    GatewayConfig,
    open_connector,
    open_gateway,
)
from tests.harness import (
    APP_SECRET,
    audit_lines,
    connector_document,
    echo_server,
    gateway_document,
    socks_connect,
    tls_material,
)

ECHO = "echo.virtual"


@asynccontextmanager
async def limited_pair(
    tmp_path: Path,
    *,
    gateway: dict[str, Any],
    plugins: dict[str, Any],
    extra_mappings: list[dict[str, Any]] | None = None,
) -> AsyncIterator[Gateway]:
    tls = tls_material(tmp_path / "tls")
    document = gateway_document(tls, tmp_path / "gateway-audit.jsonl")
    document["gateway"].update(gateway)
    document["subaccounts"]["acme"]["apps"]["hr"] = {"secret": APP_SECRET}
    for name, table in plugins.items():
        document["plugins"].setdefault(name, {}).update(table)
    async with echo_server() as port, open_gateway(GatewayConfig.from_mapping(document)) as gw:
        assert gw.tunnel_address is not None
        mapping = {"protocol": "tcp", "virtual": f"{ECHO}:7", "internal": f"127.0.0.1:{port}"}
        connector = connector_document(
            tls,
            gw.tunnel_address.port,
            tmp_path / "connector-audit.jsonl",
            [mapping, *(extra_mappings or [])],
        )
        async with open_connector(ConnectorConfig.from_mapping(connector)) as running:
            with trio.fail_after(10):
                await running.wait_connected()
            yield gw


async def test_socks5_front_door_serves_at_most_max_connections(tmp_path: Path) -> None:
    async with limited_pair(
        tmp_path, gateway={}, plugins={"tcp": {"max_connections": 2}}
    ) as gateway:
        socks = gateway.front_door_addresses["tcp.socks5"][0]
        first = await trio.open_tcp_stream(socks.host, socks.port)
        second = await trio.open_tcp_stream(socks.host, socks.port)
        await trio.testing.wait_all_tasks_blocked()
        third = await trio.open_tcp_stream(socks.host, socks.port)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            assert await third.receive_some(1) == b""  # closed at once, nothing read
        # The two served ones still work end to end once one place is free again.
        await first.aclose()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            stream = await socks_connect(socks, ECHO, 7)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"
        await second.aclose()
        await third.aclose()


async def test_a_port_forward_serves_at_most_max_connections(tmp_path: Path) -> None:
    forward = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": f"{ECHO}:7"}
    plugins = {"tcp": {"max_connections": 2, "forwards": [forward]}}
    async with limited_pair(tmp_path, gateway={}, plugins=plugins) as gateway:
        (door,) = [k for k in gateway.front_door_addresses if k.startswith("tcp.forward")]
        address = gateway.front_door_addresses[door][0]
        first = await trio.open_tcp_stream(address.host, address.port)
        second = await trio.open_tcp_stream(address.host, address.port)
        for stream in (first, second):  # both served end to end
            await stream.send_all(b"ping")
            with trio.fail_after(10):
                assert await stream.receive_some(4) == b"ping"
        third = await trio.open_tcp_stream(address.host, address.port)
        with trio.fail_after(5):
            assert await third.receive_some(1) == b""  # closed at once, nothing read
        await first.aclose()
        await trio.testing.wait_all_tasks_blocked()
        fourth = await trio.open_tcp_stream(address.host, address.port)  # a place is free
        await fourth.send_all(b"pong")
        with trio.fail_after(10):
            assert await fourth.receive_some(4) == b"pong"
        await second.send_all(b"more")  # the one served all along carries on
        with trio.fail_after(10):
            assert await second.receive_some(4) == b"more"
        for stream in (second, third, fourth):
            await stream.aclose()


async def test_try_admit_counts_refuses_and_reports_above_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = ConnectionLimit(2, "test door")
    assert limit.try_admit()
    assert limit.try_admit()
    assert limit.active == 2
    assert not limit.try_admit()
    assert limit.active == 2
    assert limit.refused == 1
    assert "test door: 2 connections open (max_connections)" in caplog.text
    limit.release()
    assert limit.active == 1
    assert limit.try_admit()
    assert limit.active == 2


async def test_http_proxy_serves_at_most_max_connections(tmp_path: Path) -> None:
    plugins = {"http": {"proxy_listen": "127.0.0.1:0", "max_connections": 1}}
    async with limited_pair(tmp_path, gateway={}, plugins=plugins) as gateway:
        (proxy,) = [v[0] for k, v in gateway.front_door_addresses.items() if k.startswith("http")]
        held = await trio.open_tcp_stream(proxy.host, proxy.port)
        await trio.testing.wait_all_tasks_blocked()
        refused = await trio.open_tcp_stream(proxy.host, proxy.port)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            assert await refused.receive_some(1) == b""
        await held.send_all(
            b"GET http://nowhere.virtual/ HTTP/1.1\r\nHost: nowhere.virtual\r\n\r\n"
        )
        with trio.fail_after(10):
            answer = await held.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 407")  # served: asks for credentials
        await held.aclose()
        await refused.aclose()


async def test_streams_per_app_are_capped_and_other_apps_carry_on(tmp_path: Path) -> None:
    async with limited_pair(tmp_path, gateway={"max_streams_per_app": 2}, plugins={}) as gateway:
        socks = gateway.front_door_addresses["tcp.socks5"][0]
        with trio.fail_after(10):
            one = await socks_connect(socks, ECHO, 7)
            two = await socks_connect(socks, ECHO, 7)
        # crm's third stream is refused with a SOCKS5 error...
        with pytest.raises(ProxyError, match="General SOCKS server failure"), trio.fail_after(10):
            await socks_connect(socks, ECHO, 7)
        # ...while another app of the same subaccount is served.
        with trio.fail_after(10):
            other = await socks_connect(socks, ECHO, 7, user="acme/hr")
        async with other:
            await other.send_all(b"hr")
            assert await other.receive_some(2) == b"hr"
        # The streams crm has keep working; closing one frees a place.
        await one.send_all(b"one")
        assert await one.receive_some(3) == b"one"
        await one.aclose()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            again = await socks_connect(socks, ECHO, 7)
        await again.aclose()
        await two.aclose()
    refusals = [
        line
        for line in audit_lines(tmp_path / "gateway-audit.jsonl")
        if line["event"] == "open_stream" and "max_streams_per_app" in line.get("reason", "")
    ]
    assert len(refusals) == 1
    assert refusals[0]["app"] == "crm"


async def _sink(stream: trio.SocketStream) -> None:
    """A backend that reads everything and never answers."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(65536):
                pass


async def test_idle_tcp_connections_are_closed_after_idle_timeout(tmp_path: Path) -> None:
    forwards = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": f"{ECHO}:7"}
    plugins = {"tcp": {"idle_timeout": 0.3, "forwards": [forwards]}}
    async with limited_pair(tmp_path, gateway={}, plugins=plugins) as gateway:
        (forward,) = [v[0] for k, v in gateway.front_door_addresses.items() if "forward" in k]
        busy = await trio.open_tcp_stream(forward.host, forward.port)
        idle = await trio.open_tcp_stream(forward.host, forward.port)
        # The busy one keeps talking for longer than the idle timeout and stays up...
        for _ in range(8):
            await busy.send_all(b"x")
            with trio.fail_after(5):
                assert await busy.receive_some(1) == b"x"
            await trio.sleep(0.1)  # the traffic pattern under test, not a synchronisation
        # ...while the idle one was closed.
        with trio.fail_after(5):
            assert await idle.receive_some(1) == b""
        await busy.aclose()
        await idle.aclose()


async def test_a_trickled_http_request_body_gets_408(tmp_path: Path) -> None:
    plugins = {"http": {"proxy_listen": "127.0.0.1:0", "body_timeout": 0.3, "min_body_rate": 1000}}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _sink, 0, host="127.0.0.1"))
        sink_port = listeners[0].socket.getsockname()[1]
        web = {
            "protocol": "http",
            "virtual": "web.virtual:80",
            "internal": f"127.0.0.1:{sink_port}",
        }
        async with limited_pair(
            tmp_path,
            gateway={},
            plugins=plugins,
            extra_mappings=[{**web, "resources": [{"path": "/"}]}],
        ) as gateway:
            (proxy,) = [v[0] for k, v in gateway.front_door_addresses.items() if "proxy" in k]
            client = await trio.open_tcp_stream(proxy.host, proxy.port)
            credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
            await client.send_all(
                b"POST http://web.virtual/upload HTTP/1.1\r\nHost: web.virtual\r\n"
                + f"Proxy-Authorization: Basic {credentials}\r\n".encode()
                + b"Content-Length: 100000\r\n\r\n"
            )
            answer = b""
            with trio.fail_after(10):
                while not answer.endswith(b"\n") or b"\r\n\r\n" not in answer:
                    with trio.move_on_after(0.05):  # one body byte every 50 ms: too slow
                        data = await client.receive_some(4096)
                        if not data:
                            break
                        answer += data
                        continue
                    await client.send_all(b"a")
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"min_body_rate" in answer
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_concurrent_opens_cannot_overrun_max_streams_per_app(tmp_path: Path) -> None:
    async with limited_pair(tmp_path, gateway={"max_streams_per_app": 2}, plugins={}) as gw:
        socks = gw.front_door_addresses["tcp.socks5"][0]
        opened: list[trio.SocketStream] = []
        refused = [0]

        async def one() -> None:
            try:
                opened.append(await socks_connect(socks, ECHO, 7))
            except ProxyError:
                refused[0] += 1

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(20):  # all at once: the slot is taken before the ACCEPT
                    nursery.start_soon(one)
        assert (len(opened), refused[0]) == (2, 18)
        for stream in opened:
            await stream.aclose()


async def _bulk_backend(stream: trio.SocketStream) -> None:
    """Sends 768 KiB as fast as the reader takes it."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(12):
                await stream.send_all(b"d" * 65536)


async def test_idle_timeout_spares_a_slow_but_steady_download(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _bulk_backend, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        bulk = [{"protocol": "tcp", "virtual": "bulk.virtual:9", "internal": f"127.0.0.1:{port}"}]
        forward = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": "bulk.virtual:9"}
        plugins = {"tcp": {"idle_timeout": 0.5, "forwards": [forward]}}
        async with limited_pair(
            tmp_path, gateway={}, plugins=plugins, extra_mappings=bulk
        ) as gateway:
            (address,) = [v[0] for k, v in gateway.front_door_addresses.items() if "forward" in k]
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((address.host, address.port))
            client = trio.SocketStream(sock)
            received = 0
            with trio.fail_after(60):
                # ~200 KiB/s: a 256 KiB splice chunk takes longer than idle_timeout to drain.
                while received < 768 * 1024:
                    data = await client.receive_some(4096)
                    if not data:
                        break
                    received += len(data)
                    await trio.sleep(0.02)  # the slow reader under test
            await client.aclose()
            assert received == 768 * 1024
        nursery.cancel_scope.cancel()


async def _slow_continue_backend(stream: trio.SocketStream) -> None:
    """Reads the head; answers 100 Continue only after a while; then 200 for the body."""
    buffer = b""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            body = buffer.partition(b"\r\n\r\n")[2]
            await trio.sleep(1.0)  # deciding (a quota check, say): longer than body_timeout
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            while len(body) < 10:
                body += await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await stream.receive_some(1)


async def test_waiting_for_100_continue_is_not_a_slow_body(tmp_path: Path) -> None:
    plugins = {"http": {"proxy_listen": "127.0.0.1:0", "body_timeout": 0.3}}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, _slow_continue_backend, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        web = {
            "protocol": "http",
            "virtual": "web.virtual:80",
            "internal": f"127.0.0.1:{port}",
            "resources": [{"path": "/"}],
        }
        async with limited_pair(
            tmp_path, gateway={}, plugins=plugins, extra_mappings=[web]
        ) as gateway:
            (proxy,) = [v[0] for k, v in gateway.front_door_addresses.items() if "proxy" in k]
            client = await trio.open_tcp_stream(proxy.host, proxy.port)
            credentials = base64.b64encode(f"acme/crm:{APP_SECRET}".encode()).decode()
            await client.send_all(
                b"PUT http://web.virtual/up HTTP/1.1\r\nHost: web.virtual\r\n"
                + f"Proxy-Authorization: Basic {credentials}\r\n".encode()
                + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n"
            )
            with trio.fail_after(10):
                interim = await _head(client)
                assert interim.startswith(b"HTTP/1.1 100"), interim
                await client.send_all(b"0123456789")
                final = await _head(client)
            assert final.startswith(b"HTTP/1.1 200"), final
            await client.aclose()
        nursery.cancel_scope.cancel()


async def _head(stream: trio.SocketStream) -> bytes:
    """One response head, read byte by byte (nothing of what follows is taken)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        data = await stream.receive_some(1)
        if not data:
            break
        head += data
    return head
