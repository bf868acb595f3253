"""Tunnel failures over real TLS/WebSocket on 127.0.0.1: loss, dead peers, refusals, go-away."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from python_socks import ProxyError

from backchannel import (
    AppIdentity,
    ConnectorConfig,
    GatewayConfig,
    HostPort,
    ResetCode,
    StreamError,
    TunnelError,
    open_connector,
    open_gateway,
)
from backchannel._transport import GatewayAddress, client_ssl_context, dial_gateway
from backchannel._tunnel import TunnelSettings
from tests.harness import (
    CONNECTOR_TOKEN,
    Pair,
    audit_lines,
    connector_document,
    echo_server,
    gateway_document,
    receive_exactly,
    running_pair,
    socks_connect,
    tls_material,
)


def echo_mapping(port: int) -> dict[str, Any]:
    return {"virtual": "echo.virtual:7", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}


async def assert_echo_works(pair: Pair, payload: bytes = b"still there?") -> None:
    stream = await socks_connect(pair.socks, "echo.virtual", 7)
    async with stream:
        await stream.send_all(payload)
        assert await receive_exactly(stream, len(payload)) == payload


async def wait_reconnected(pair: Pair, connects: int) -> None:
    """Wait until the connector's tunnel is down, then up again as connection no. ``connects``."""
    await pair.connector.wait_disconnected()
    await pair.connector.wait_connected()
    assert pair.connector.status["acme"].connects == connects


class Sink:
    """A backend that swallows bytes; says when it has seen enough and when it was closed."""

    def __init__(self, enough: int) -> None:
        self.enough = enough
        self.received = 0
        self.flowing = trio.Event()
        self.closed = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    self.received += len(data)
                    if self.received >= self.enough:
                        self.flowing.set()
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed.set()


# ------------------------------------------------------------------------------- (a) tunnel loss


async def test_tunnel_killed_mid_transfer_ends_both_sides_and_reconnects(tmp_path: Path) -> None:
    sink = Sink(enough=4 * 1024 * 1024)
    async with trio.open_nursery() as servers, echo_server() as echo_port:
        listeners = await servers.start(partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1"))
        sink_port = listeners[0].socket.getsockname()[1]
        mappings = [
            echo_mapping(echo_port),
            {"virtual": "sink.virtual:9", "internal": f"127.0.0.1:{sink_port}", "protocol": "tcp"},
        ]
        async with running_pair(tmp_path, mappings) as pair:
            with trio.fail_after(30):
                client = await socks_connect(pair.socks, "sink.virtual", 9)
                outcome: dict[str, str] = {}
                async with client:

                    async def send_forever() -> None:
                        chunk = os.urandom(64 * 1024)
                        try:
                            while True:
                                await client.send_all(chunk)
                        except trio.BrokenResourceError as exc:
                            outcome["send"] = f"error: {exc!r}"

                    async def receive_end() -> None:
                        try:
                            data = await client.receive_some(1024)
                        except trio.BrokenResourceError as exc:
                            outcome["receive"] = f"error: {exc!r}"
                        else:
                            outcome["receive"] = "EOF" if data == b"" else f"data {data!r}"

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send_forever)
                        nursery.start_soon(receive_end)
                        await sink.flowing.wait()
                        tunnel = pair.connector.status["acme"].tunnel
                        assert tunnel is not None
                        tunnel.abort("killed by the test")
                        # The SOCKS client learns it: EOF or a reset, not a hang.
                        await sink.closed.wait()
                    assert outcome["receive"] in ("EOF",) or outcome["receive"].startswith("error")
                    assert outcome["send"].startswith("error")
                assert sink.received >= sink.enough
                assert tunnel.close_reason == "killed by the test"

                await wait_reconnected(pair, connects=2)
                await assert_echo_works(pair)
        servers.cancel_scope.cancel()


async def test_gateway_side_loss_fails_open_streams_with_not_connected(tmp_path: Path) -> None:
    """The gateway's tunnel dies: its streams fail with NOT_CONNECTED, the next open is refused."""
    async with echo_server() as port, running_pair(tmp_path, [echo_mapping(port)]) as pair:
        with trio.fail_after(30):
            entry = pair.gateway.registry.lookup("acme", "")
            assert entry is not None
            assert entry.tunnel is not None
            app = AppIdentity("acme", "crm")
            stream = await pair.gateway.open_stream(
                app, protocol="tcp", target=HostPort("echo.virtual", 7)
            )
            async with stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                entry.tunnel.abort("gateway lost the tunnel")
                with pytest.raises(trio.BrokenResourceError) as info:
                    await stream.receive_some(1)
                cause = info.value.__cause__
                assert isinstance(cause, StreamError)
                assert cause.code is ResetCode.NOT_CONNECTED
                assert "gateway lost the tunnel" in cause.reason
            with pytest.raises(StreamError) as refused:
                await entry.tunnel.open_stream({"protocol": "tcp"})
            assert refused.value.code is ResetCode.NOT_CONNECTED
            await wait_reconnected(pair, connects=2)
            await assert_echo_works(pair)


# ---------------------------------------------------------------------------- (b) dead peer


class FreezableRelay:
    """A TCP relay between connector and gateway that can go silent like a broken network
    path: after :meth:`freeze`, existing connections forward nothing in either direction and
    are not closed either. New connections flow normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._frozen_generation = 0
        self.connections = 0

    def freeze(self) -> None:
        self._frozen_generation += 1

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    async def _relay(self, downstream: trio.SocketStream) -> None:
        generation = self._frozen_generation
        self.connections += 1
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, generation, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, downstream, generation, nursery.cancel_scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        destination: trio.SocketStream,
        generation: int,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if self._frozen_generation > generation:
                    await trio.sleep_forever()
                if not data:
                    break
                await destination.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def pair_through_relay(
    tmp_path: Path,
    mappings: list[dict[str, Any]],
    *,
    tunnel: dict[str, Any],
) -> AsyncIterator[tuple[Pair, FreezableRelay]]:
    """Like ``running_pair``, but the connector reaches the gateway through a FreezableRelay."""
    tls = tls_material(tmp_path / "tls")
    gateway_audit, connector_audit = tmp_path / "gw.jsonl", tmp_path / "conn.jsonl"
    gateway_config = GatewayConfig.from_mapping(
        gateway_document(tls, gateway_audit, tunnel=tunnel), source="gateway.toml"
    )
    async with open_gateway(gateway_config) as gateway, trio.open_nursery() as nursery:
        assert gateway.tunnel_address is not None
        relay = FreezableRelay(gateway.tunnel_address.port)
        await nursery.start(relay.serve)
        connector_tunnel = {**tunnel, "reconnect_min_delay": 0.05, "reconnect_max_delay": 0.2}
        connector_config = ConnectorConfig.from_mapping(
            connector_document(tls, relay.port, connector_audit, mappings, tunnel=connector_tunnel),
            source="connector.toml",
        )
        async with open_connector(connector_config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            yield Pair(gateway, connector, gateway_audit, connector_audit), relay
        nursery.cancel_scope.cancel()


async def test_heartbeat_declares_a_silent_gateway_dead(tmp_path: Path) -> None:
    interval, timeout = 0.1, 0.5
    heartbeat = {"heartbeat_interval": interval, "heartbeat_timeout": timeout}
    async with (
        echo_server() as port,
        pair_through_relay(tmp_path, [echo_mapping(port)], tunnel=heartbeat) as (pair, relay),
    ):
        first = await pair.connector.wait_connected()
        # An idle but healthy tunnel survives several timeouts: pings keep it alive.
        await trio.sleep(3 * timeout)
        assert not first.closed, first.close_reason
        assert pair.connector.status["acme"].connects == 1

        relay.freeze()
        frozen_at = trio.current_time()
        with trio.fail_after(timeout + 2 * interval + 0.5):
            await first.wait_closed()
            elapsed = trio.current_time() - frozen_at
            # ...and lets go at once: a silent peer would not answer the WebSocket close either.
            await pair.connector.wait_disconnected()
        assert "heartbeat" in first.close_reason
        assert elapsed >= timeout - 2 * interval

        # The gateway's own heartbeat frees the registration, and the connector gets back in.
        with trio.fail_after(10):
            await wait_reconnected(pair, connects=2)
            assert relay.connections >= 2
            await assert_echo_works(pair)


# ------------------------------------------------------------------------------ (c), (d) refusals


async def dial(pair: Pair, tmp_path: Path, **hello: Any) -> None:
    """Dial the pair's gateway directly with a HELLO (defaults: acme, right token)."""
    assert pair.gateway.tunnel_address is not None
    document = {
        "role": "connector",
        "subaccount": "acme",
        "location": "",
        "token": CONNECTOR_TOKEN,
        "software": "test",
        **hello,
    }
    address = GatewayAddress.parse(f"wss://127.0.0.1:{pair.gateway.tunnel_address.port}/tunnel")
    refusal: TunnelError | None = None
    async with trio.open_nursery() as nursery:
        try:
            ws, _, _ = await dial_gateway(
                nursery,
                address,
                ssl_context=client_ssl_context(tls_material(tmp_path / "tls").ca_file),
                proxy=None,
                hello=document,
                settings=TunnelSettings(),
            )
        except TunnelError as exc:
            refusal = exc  # raised outside the nursery, so not inside an ExceptionGroup
        else:
            await ws.aclose()
    if refusal is not None:
        raise refusal


async def test_second_connector_for_same_location_is_refused(tmp_path: Path) -> None:
    async with echo_server() as port, running_pair(tmp_path, [echo_mapping(port)]) as pair:
        with trio.fail_after(20):
            first = pair.connector.status["acme"].tunnel
            with pytest.raises(TunnelError) as info:
                await dial(pair, tmp_path)
            assert info.value.code is ResetCode.REFUSED
            assert "already connected" in str(info.value)
            line = audit_lines(pair.gateway_audit)[-1]
            assert (line["event"], line["decision"], line["reason"]) == (
                "connector_register",
                "deny",
                "already connected",
            )
            # The first connector keeps its tunnel and keeps working.
            assert pair.connector.status["acme"].tunnel is first
            assert first is not None
            assert not first.closed
            assert pair.connector.status["acme"].connects == 1
            await assert_echo_works(pair)
            # Another location id of the same subaccount is a different registration.
            await dial(pair, tmp_path, location="second-site")


class LogEvent(logging.Handler):
    """Sets a trio Event when a log record contains ``text`` (records come from trio tasks)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_second_connector_process_reports_already_connected(tmp_path: Path) -> None:
    """The same refusal seen through a whole second Connector: it records why and retries."""
    async with echo_server() as port, running_pair(tmp_path, [echo_mapping(port)]) as pair:
        assert pair.gateway.tunnel_address is not None
        config = ConnectorConfig.from_mapping(
            connector_document(
                tls_material(tmp_path / "tls"),
                pair.gateway.tunnel_address.port,
                tmp_path / "second-audit.jsonl",
                [echo_mapping(port)],
            ),
            source="second-connector.toml",
        )
        refused = LogEvent("already connected")
        logger = logging.getLogger("backchannel.connector")
        logger.addHandler(refused)
        try:
            with trio.fail_after(20):
                async with open_connector(config) as second:
                    await refused.seen.wait()
                    status = second.status["acme"]
                    assert not status.connected
                    assert status.connects == 0
                    assert "already connected" in status.last_error
                assert pair.connector.status["acme"].connects == 1
                await assert_echo_works(pair)
        finally:
            logger.removeHandler(refused)


async def test_wrong_connector_token_is_refused_and_audited(tmp_path: Path) -> None:
    async with running_pair(tmp_path, []) as pair:
        with trio.fail_after(20):
            with pytest.raises(TunnelError) as info:
                await dial(pair, tmp_path, token="not-the-token", location="elsewhere")
            assert info.value.code is ResetCode.UNAUTHENTICATED
            assert "authentication failed" in str(info.value)
            assert "not-the-token" not in str(info.value)
            line = audit_lines(pair.gateway_audit)[-1]
            assert line["event"] == "connector_register"
            assert line["decision"] == "deny"
            assert line["reason"] == "wrong connector token"
            assert line["subaccount"] == "acme"
            assert "not-the-token" not in pair.gateway_audit.read_text()

            with pytest.raises(TunnelError) as unknown:
                await dial(pair, tmp_path, subaccount="nobody")
            assert unknown.value.code is ResetCode.UNAUTHENTICATED
            # Same message for an unknown subaccount: no oracle for which ones exist.
            assert str(unknown.value).replace("'nobody'", "'acme'") == str(info.value)
            assert audit_lines(pair.gateway_audit)[-1]["reason"] == "unknown subaccount"


# ------------------------------------------------------------------------------ (e) go-away


async def test_gateway_go_away_drains_streams_then_connector_reconnects(tmp_path: Path) -> None:
    async with echo_server() as port, running_pair(tmp_path, [echo_mapping(port)]) as pair:
        with trio.fail_after(30):
            entry = pair.gateway.registry.lookup("acme", "")
            assert entry is not None
            assert entry.tunnel is not None
            old = entry.tunnel
            in_flight = await socks_connect(pair.socks, "echo.virtual", 7)
            async with in_flight:
                await in_flight.send_all(b"before")
                assert await receive_exactly(in_flight, 6) == b"before"

                old.go_away(ResetCode.NO_ERROR, "gateway maintenance")
                # New opens fail cleanly (SOCKS "network unreachable"), nothing hangs.
                with pytest.raises(ProxyError) as info:
                    await socks_connect(pair.socks, "echo.virtual", 7)
                assert info.value.error_code == 0x03
                with pytest.raises(StreamError) as direct:
                    await old.open_stream({"protocol": "tcp"})
                assert direct.value.code is ResetCode.REFUSED

                # The stream in flight still carries data both ways, to the end.
                payload = os.urandom(3 * 1024 * 1024)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(in_flight.send_all, payload)
                    assert await receive_exactly(in_flight, len(payload)) == payload
                await in_flight.send_eof()
                assert await in_flight.receive_some(10) == b""
                assert not old.closed

            # Drained: both sides close, and the connector dials again.
            await old.wait_closed()
            assert "went away" in old.close_reason
            await wait_reconnected(pair, connects=2)
            await assert_echo_works(pair)


# ------------------------------------------------------------------------------ (f) leaks


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        assert task is not None
        yield task
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)


async def one_cycle(tmp_path: Path) -> None:
    async with echo_server() as port, running_pair(tmp_path, [echo_mapping(port)]) as pair:
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(assert_echo_works, pair, os.urandom(50_000 + index))
        tunnel = pair.connector.status["acme"].tunnel
        assert tunnel is not None
        tunnel.abort("leak test")
        await wait_reconnected(pair, connects=2)
        await assert_echo_works(pair)


async def test_start_stop_cycle_leaks_no_fds_or_tasks(tmp_path: Path) -> None:
    with trio.fail_after(60):
        await one_cycle(tmp_path / "warm-up")
        fds_before = open_fds()
        tasks_before = len(list(all_tasks()))
        await one_cycle(tmp_path / "measured")
        assert open_fds() == fds_before
        assert len(list(all_tasks())) == tasks_before
