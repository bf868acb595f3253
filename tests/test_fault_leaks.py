"""Fault injection with leak counting: what tests/test_tunnel_faults.py does not already cover.

- The tunnel's TCP connection cut (both sockets reset by a relay between connector and gateway,
  as a broken network path or a killed peer would), several times, while uploads and downloads
  run on several streams: every stream ends with an error or EOF on both sides (client and
  backend), the connector reconnects each time, nothing hangs; afterwards the open file
  descriptors (/proc/self/fd) and trio tasks are back to the baseline.
- Half-open tunnel in one direction only (bytes still flow one way): heartbeats detect it on
  both sides, the gateway frees the registration and the connector gets back in.
- Backends that reset mid-stream, stall (never read), and trickle their answer: the client sees
  the reset / gets every trickled byte intact, the stalled upload is held back by the credit
  window (the stream's send blocks, the backend's buffers do not grow past it), and another
  stream on the same tunnel goes on meanwhile. No descriptor or task left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from backchannel import ConnectorConfig, GatewayConfig, open_connector, open_gateway
from tests.harness import (
    Pair,
    connector_document,
    echo_server,
    gateway_document,
    receive_exactly,
    socks_connect,
    tls_material,
)

LINGER_ZERO = struct.pack("ii", 1, 0)

# ------------------------------------------------------------------------------ counting


def open_fds() -> list[str]:
    """Targets of this process's open descriptors (sockets, pipes, files), sorted."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir used is gone already
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(targets)


def task_names() -> list[str]:
    """Names of every task under the root task."""
    names = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        assert task is not None
        names.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return sorted(names)


@dataclass
class Baseline:
    fds: list[str]
    tasks: list[str]


async def settled() -> None:
    """Let tasks that are already finishing finish (no timer: until all are blocked)."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()


async def baseline() -> Baseline:
    await settled()
    return Baseline(open_fds(), task_names())


async def assert_back_to(before: Baseline) -> None:
    await settled()
    fds, tasks = open_fds(), task_names()
    assert len(fds) == len(before.fds), _diff(before.fds, fds)
    assert len(tasks) == len(before.tasks), _diff(before.tasks, tasks)


def _diff(before: list[str], after: list[str]) -> str:
    gone = [x for x in before if x not in after]
    new = [x for x in after if x not in before]
    return f"new: {new[:20]}, gone: {gone[:20]}"


# ------------------------------------------------------------------------------ the relay


class CuttableRelay:
    """A TCP relay between connector and gateway. :meth:`cut` resets every connection it carries
    (RST both ways); :meth:`freeze` silently drops the bytes of one direction of the current
    connections ("to_gateway" or "to_connector"), leaving the other flowing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._live: set[trio.SocketStream] = set()
        self._frozen: set[tuple[int, str]] = set()
        self._scopes: dict[int, trio.CancelScope] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    def cut(self, only: set[int] | None = None) -> int:
        """Reset every live connection (or those numbered ``only``); returns how many."""
        chosen = [scope for n, scope in self._scopes.items() if only is None or n in only]
        for scope in chosen:
            scope.cancel()
        return len(chosen)

    def live(self) -> set[int]:
        """Numbers of the connections the relay still carries."""
        return set(self._scopes)

    def freeze(self, direction: str) -> set[int]:
        """Freeze one direction of the live connections; returns their numbers."""
        numbers = set(self._scopes)
        self._frozen.update((number, direction) for number in numbers)
        return numbers

    async def _relay(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        upstream: trio.SocketStream | None = None
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            with trio.CancelScope() as scope:
                self._scopes[number] = scope
                try:
                    async with trio.open_nursery() as nursery:
                        pump = partial(self._pump, number=number, scope=nursery.cancel_scope)
                        nursery.start_soon(pump, downstream, upstream, "to_gateway")
                        nursery.start_soon(pump, upstream, downstream, "to_connector")
                finally:
                    del self._scopes[number]
        finally:
            # Also when the relay itself is cancelled (the test ending before a pump saw EOF):
            # shielded, since in a cancelled task the first close's checkpoint would raise
            # Cancelled and skip the second.
            with trio.CancelScope(shield=True):
                for stream in (downstream, upstream):
                    if stream is None:
                        continue
                    # SO_LINGER 0: close() sends RST, as a dead peer's kernel or a middlebox
                    # would.
                    with contextlib.suppress(OSError):  # a socket the peer reset already
                        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                    await trio.aclose_forcefully(stream)

    async def _pump(
        self,
        source: trio.SocketStream,
        destination: trio.SocketStream,
        direction: str,
        *,
        number: int,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if (number, direction) not in self._frozen:
                    await destination.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def pair_through(
    tmp_path: Path, mappings: list[dict[str, Any]], tunnel: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Pair, CuttableRelay]]:
    tls = tls_material(tmp_path / "tls")
    gateway_audit, connector_audit = tmp_path / "gw.jsonl", tmp_path / "conn.jsonl"
    forward = {"listen": "127.0.0.1:0", "subaccount": "acme", "target": "source.virtual:9"}
    gateway_config = GatewayConfig.from_mapping(
        gateway_document(tls, gateway_audit, forwards=[forward], tunnel=tunnel),
        source="gateway.toml",
    )
    async with open_gateway(gateway_config) as gateway, trio.open_nursery() as nursery:
        assert gateway.tunnel_address is not None
        relay = CuttableRelay(gateway.tunnel_address.port)
        await nursery.start(relay.serve)
        connector_tunnel = {
            **(tunnel or {}),
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.2,
        }
        connector_config = ConnectorConfig.from_mapping(
            connector_document(tls, relay.port, connector_audit, mappings, tunnel=connector_tunnel),
            source="connector.toml",
        )
        async with open_connector(connector_config) as connector:
            with trio.fail_after(10):
                await connector.wait_connected()
            yield Pair(gateway, connector, gateway_audit, connector_audit), relay
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ backends


@dataclass
class Backends:
    """TCP backends on 127.0.0.1 that record how each connection ended."""

    ports: dict[str, int] = field(default_factory=dict)
    endings: list[str] = field(default_factory=list)
    received: int = 0
    flowing: trio.Event = field(default_factory=trio.Event)
    stalled_accepted: trio.Event = field(default_factory=trio.Event)
    release_stalled: trio.Event = field(default_factory=trio.Event)

    async def sink(self, stream: trio.SocketStream) -> None:
        """Swallow an upload."""
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    self.received += len(data)
                    if self.received >= 1024 * 1024:
                        self.flowing.set()
            self.endings.append("sink: eof")
        except trio.BrokenResourceError:
            self.endings.append("sink: reset")

    async def source(self, stream: trio.SocketStream) -> None:
        """Send random bytes until the connection breaks."""
        chunk = os.urandom(64 * 1024)
        try:
            async with stream:
                while True:
                    await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.endings.append("source: broken")

    async def resetter(self, stream: trio.SocketStream) -> None:
        """Read 1000 bytes, answer 1000 bytes, then reset the connection (RST)."""
        data = await receive_exactly(stream, 1000)
        await stream.send_all(data)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)
        self.endings.append("resetter: reset sent")

    async def staller(self, stream: trio.SocketStream) -> None:
        """Accept, then neither read nor write until released; then drain to the end."""
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.stalled_accepted.set()
        async with stream:
            await self.release_stalled.wait()
            await drain(stream)
        self.endings.append("staller: closed")

    async def trickler(self, stream: trio.SocketStream) -> None:
        """Send TRICKLE one byte per write (a checkpoint between them), then EOF."""
        async with stream:
            for byte in TRICKLE:
                await stream.send_all(bytes([byte]))
                await trio.lowlevel.checkpoint()
            await stream.send_eof()
            await drain(stream)

    def mappings(self) -> list[dict[str, Any]]:
        return [
            {"virtual": f"{name}.virtual:9", "internal": f"127.0.0.1:{port}", "protocol": "tcp"}
            for name, port in self.ports.items()
        ]


async def drain(stream: trio.SocketStream) -> None:
    """Read until EOF or a reset."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


TRICKLE = hashlib.sha256(b"trickle").digest() * 8


@asynccontextmanager
async def backends(*names: str) -> AsyncIterator[Backends]:
    result = Backends()
    async with trio.open_nursery() as nursery:
        for name in names:
            handler = getattr(result, name)
            [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            result.ports[name] = listener.socket.getsockname()[1]
        yield result
        nursery.cancel_scope.cancel()


async def reconnected(pair: Pair, connects: int) -> None:
    """Wait for connection no. ``connects`` of the connector to be up."""
    await pair.connector.wait_status(lambda s: s.connected and s.connects == connects)


async def echo_once(pair: Pair, size: int = 100_000) -> None:
    payload = os.urandom(size)
    stream = await socks_connect(pair.socks, "echo.virtual", 9)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        assert await receive_exactly(stream, size) == payload


# ------------------------------------------------------------------------------ tunnel cut


async def client_ending(stream: trio.SocketStream, *, upload: bool) -> str:
    """Upload (or download) until the stream ends; how it ended."""
    try:
        if upload:
            chunk = os.urandom(64 * 1024)
            while True:
                await stream.send_all(chunk)
        while await stream.receive_some(65536):
            pass
        return "eof"
    except trio.BrokenResourceError:
        return "broken"


async def run_client(stream: trio.SocketStream, upload: bool, endings: list[str]) -> None:
    async with stream:
        endings.append(await client_ending(stream, upload=upload))


async def test_tunnel_cut_mid_transfer_three_times_leaks_nothing(tmp_path: Path) -> None:
    async with backends("sink", "source") as be, echo_server() as echo_port:
        mappings = [
            *be.mappings(),
            {"virtual": "echo.virtual:9", "internal": f"127.0.0.1:{echo_port}", "protocol": "tcp"},
        ]
        async with pair_through(tmp_path, mappings) as (pair, relay):
            with trio.fail_after(60):
                await echo_once(pair)  # warm-up: lazy set-up done before counting
                before = await baseline()
                for cut in range(1, 4):
                    be.flowing = trio.Event()
                    endings: list[str] = []
                    be.endings.clear()

                    async with trio.open_nursery() as nursery:
                        for _ in range(2):
                            up = await socks_connect(pair.socks, "sink.virtual", 9)
                            nursery.start_soon(run_client, up, True, endings)
                        forward = pair.forward()
                        down = await trio.open_tcp_stream(forward.host, forward.port)
                        assert await down.receive_some(1)  # the download is flowing too
                        nursery.start_soon(run_client, down, False, endings)
                        await be.flowing.wait()
                        assert relay.cut() == 1
                    # Every client stream ended (none hangs), and every backend connection too.
                    assert len(endings) == 3
                    await reconnected(pair, cut + 1)
                    await echo_once(pair)
                    await settled()
                    assert sorted(e.split(":")[0] for e in be.endings) == ["sink", "sink", "source"]
                    assert all(
                        e in ("sink: eof", "sink: reset", "source: broken") for e in be.endings
                    )
                await assert_back_to(before)


# ------------------------------------------------------------------------------ half-open


@pytest.mark.parametrize("direction", ["to_gateway", "to_connector"])
async def test_one_way_silent_tunnel_is_detected_by_heartbeats(
    tmp_path: Path, direction: str
) -> None:
    heartbeat = {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.6}
    async with echo_server() as echo_port:
        mapping = {
            "virtual": "echo.virtual:9",
            "internal": f"127.0.0.1:{echo_port}",
            "protocol": "tcp",
        }
        async with pair_through(tmp_path, [mapping], tunnel=heartbeat) as (pair, relay):
            with trio.fail_after(30):
                await echo_once(pair)
                before = await baseline()
                entry = pair.gateway.registry.lookup("acme", "")
                assert entry is not None
                first_gateway_side = entry.tunnel
                first = await pair.connector.wait_connected()
                frozen = relay.freeze(direction)
                assert first_gateway_side is not None
                await first.wait_closed()
                await first_gateway_side.wait_closed()
                # The side that hears nothing any more declares the peer dead; the other side
                # learns it from the close (or its own heartbeat).
                deaf = first_gateway_side if direction == "to_gateway" else first
                assert "heartbeat" in deaf.close_reason, deaf.close_reason
                await reconnected(pair, 2)
                await echo_once(pair)
                # Both ends closed the frozen connection themselves: the relay let it go.
                assert relay.live() == relay.live() - frozen
                await assert_back_to(before)


# ------------------------------------------------------------------------------ bad backends


async def test_backend_reset_stall_and_trickle_leave_other_streams_and_nothing_behind(
    tmp_path: Path,
) -> None:
    async with backends("resetter", "staller", "trickler") as be, echo_server() as echo_port:
        mappings = [
            *be.mappings(),
            {"virtual": "echo.virtual:9", "internal": f"127.0.0.1:{echo_port}", "protocol": "tcp"},
        ]
        async with pair_through(tmp_path, mappings) as (pair, _):
            with trio.fail_after(60):
                await echo_once(pair)
                before = await baseline()

                # Reset mid-stream: the 1000 bytes, then EOF or a reset; never a hang.
                stream = await socks_connect(pair.socks, "resetter.virtual", 9)
                async with stream:
                    await stream.send_all(b"r" * 1000)
                    assert await receive_exactly(stream, 1000) == b"r" * 1000
                    assert await client_ending(stream, upload=False) in ("eof", "broken")

                # Trickle: every byte arrives, in order.
                stream = await socks_connect(pair.socks, "trickler.virtual", 9)
                async with stream:
                    assert await receive_exactly(stream, len(TRICKLE)) == TRICKLE
                    assert await stream.receive_some(10) == b""

                # Stall: the upload is held back by the window while another stream flows.
                stalled = await socks_connect(pair.socks, "staller.virtual", 9)
                async with stalled:
                    await be.stalled_accepted.wait()
                    sent = 0

                    async def upload() -> None:
                        nonlocal sent
                        chunk = b"s" * 65536
                        while True:
                            await stalled.send_all(chunk)
                            sent += len(chunk)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(upload)
                        # Every task blocked (the uploader included): the upload stopped. An
                        # ever-growing buffer would keep tasks busy, and fail_after would end it.
                        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                        held = sent
                        # Kernel buffers of both legs plus one credit window, not the upload.
                        assert held < 32 * 1024 * 1024
                        # Meanwhile another stream on the same tunnel flows.
                        await echo_once(pair, 1_000_000)
                        assert sent < 32 * 1024 * 1024
                        nursery.cancel_scope.cancel()
                be.release_stalled.set()
                await assert_back_to(before)
