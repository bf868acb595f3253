"""The splice's direct socket path: one ``os.read``/``os.write`` per ready socket, the tunnel
stream's credit taken without waiting, trio's calls only when something must wait.

Real sockets on 127.0.0.1 (port 0) and the in-memory tunnel pair.
"""

from __future__ import annotations

import os
import socket as socket_module
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from backchannel import close_forcefully, splice_streams
from backchannel._proto._mux import MuxSettings
from backchannel._splice import MOVED_SLICE
from backchannel._tunnel import TunnelSettings

from .tunnel_pair import tunnel_pair

GUARD = 20  # seconds: a guard against hangs, never a synchronisation


@asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        assert isinstance(server, trio.SocketStream)
    finally:
        await listener.aclose()
    async with client, server:
        yield client, server


async def send_then_end(stream: trio.abc.HalfCloseableStream, payload: bytes) -> None:
    await stream.send_all(payload)
    await stream.send_eof()


async def read_all(stream: trio.abc.ReceiveStream, chunk: int = 1 << 16) -> bytes:
    parts = []
    while data := await stream.receive_some(chunk):
        parts.append(data)
    return b"".join(parts)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        assert more, "the stream ended early"
        data += more
    return data


async def test_a_small_exchange_between_sockets_uses_no_trio_socket_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spliced sockets are read and written directly (no trio call, no checkpoint)."""
    spliced: set[int] = set()
    calls: list[str] = []
    for name in ("receive_some", "send_all"):
        original = getattr(trio.SocketStream, name)

        def counting(
            self: trio.SocketStream, *args: Any, _original: Any = original, _name: str = name
        ) -> Any:
            if id(self) in spliced:
                calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(trio.SocketStream, name, counting)
    with trio.fail_after(GUARD):
        async with socket_pair() as (client, a), socket_pair() as (b, backend):
            spliced.update((id(a), id(b)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, b)
                for _ in range(3):
                    await client.send_all(b"ping")
                    assert await receive_exactly(backend, 4) == b"ping"
                    await backend.send_all(b"pong")
                    assert await receive_exactly(client, 4) == b"pong"
                await client.send_eof()
                assert await backend.receive_some(10) == b""
                await backend.send_eof()
                assert await client.receive_some(10) == b""
    assert calls == []


async def test_socket_to_socket_keeps_every_byte_in_order_behind_a_slow_reader() -> None:
    payload = os.urandom(12 << 20)  # more than the loopback buffers hold: writes fall back
    with trio.fail_after(GUARD):
        async with socket_pair() as (client, a), socket_pair() as (b, backend):
            received: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, b)
                nursery.start_soon(send_then_end, client, payload)
                await trio.testing.wait_all_tasks_blocked()  # the far end has not read yet
                received.append(await read_all(backend, 4096))
                await backend.send_eof()
                assert await read_all(client) == b""
            assert received[0] == payload


async def test_socket_to_tunnel_stream_without_credit_waits_and_loses_nothing() -> None:
    window = 64 * 1024
    settings = TunnelSettings(mux=MuxSettings(initial_window=window, max_window=window))
    payload = os.urandom(1 << 20)  # sixteen windows
    with trio.fail_after(GUARD):
        async with tunnel_pair(settings, settings) as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, opener)
                nursery.start_soon(send_then_end, client, payload)
                await trio.testing.wait_all_tasks_blocked()  # the window is used up
                assert acceptor.buffered == window
                assert await read_all(acceptor, 1000) == payload
                await acceptor.send_eof()
                assert await read_all(client) == b""


# --------------------------------------------------------------------------- the stream's sink


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


@pytest.mark.parametrize("with_moved", [False, True], ids=["plain", "moved"])
async def test_data_for_a_waiting_splice_goes_to_its_socket_without_waking_it(
    with_moved: bool,
) -> None:
    """The tunnel's reader writes to the splice's socket itself: the splice task (which pumps
    socket → tunnel; tunnel → socket stands by, tests/test_splice_standby.py) takes no step for
    data the socket takes at once. An idle timer's ``moved`` does not cost that path: the
    reader calls it for each write."""
    calls: list[None] = []
    moved = (lambda: calls.append(None)) if with_moved else None
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                splicer: list[trio.lowlevel.Task] = []

                async def run_splice() -> None:
                    splicer.append(trio.lowlevel.current_task())
                    await splice_streams(a, acceptor, moved=moved)

                nursery.start_soon(run_splice)
                await trio.testing.wait_all_tasks_blocked()
                counter = StepCounter(splicer[0])
                trio.lowlevel.add_instrument(counter)
                try:
                    for n in range(5):
                        message = b"answer %d" % n
                        await opener.send_all(message)
                        assert await receive_exactly(client, len(message)) == message
                finally:
                    trio.lowlevel.remove_instrument(counter)
                assert counter.steps == 0
                assert acceptor.buffered == 0
                assert len(calls) == (5 if with_moved else 0)
                await client.send_all(b"the other way")  # read by the splice: moved too
                assert await receive_exactly(opener, 13) == b"the other way"
                assert len(calls) == (6 if with_moved else 0)
                await opener.send_eof()  # the reader half-closes the socket (the standby)
                assert await client.receive_some(10) == b""
                nursery.cancel_scope.cancel()


async def test_tunnel_to_socket_keeps_every_byte_in_order_behind_a_slow_reader() -> None:
    payload = os.urandom(12 << 20)  # more than the socket takes: the splice writes the rest
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                nursery.start_soon(send_then_end, opener, payload)
                await trio.testing.wait_all_tasks_blocked()  # socket and window are full
                assert await read_all(client, 4096) == payload
                nursery.cancel_scope.cancel()


async def test_a_broken_socket_under_the_sink_ends_the_splice_naming_it() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            outcome: list[str | None] = []

            async def run_splice() -> None:
                outcome.append(await splice_streams(a, acceptor, a_name="client", b_name="tunnel"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_splice)
                await trio.testing.wait_all_tasks_blocked()
                client.socket.setsockopt(
                    socket_module.SOL_SOCKET, socket_module.SO_LINGER, struct.pack("ii", 1, 0)
                )
                client.socket.close()  # RST: the next write to `a` fails
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(3):  # the first write may still be taken
                    if outcome:
                        break
                    await opener.send_all(b"x" * 1000)
                    await trio.testing.wait_all_tasks_blocked()
            assert outcome == ["client"]


async def test_close_forcefully_closes_a_plain_socket_without_a_scheduler_pass() -> None:
    with trio.fail_after(GUARD):
        async with socket_pair() as (client, a):
            counter = StepCounter(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(counter)
            try:
                await close_forcefully(a)
            finally:
                trio.lowlevel.remove_instrument(counter)
            assert counter.steps == 0  # trio.aclose_forcefully takes one (its cancelled scope)
            assert a.socket.fileno() == -1
            assert await client.receive_some(10) == b""


async def test_close_forcefully_closes_other_streams_as_trio_does() -> None:
    left, right = trio.testing.memory_stream_pair()
    await close_forcefully(left)
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    assert await right.receive_some(10) == b""


async def test_with_a_moved_callback_a_slow_reader_gets_it_called_while_it_drains() -> None:
    """What the socket does not take goes out in MOVED_SLICE pieces, ``moved`` after each:
    a slow but steady reader is traffic, not idleness."""
    calls: list[None] = []
    payload = os.urandom(12 << 20)
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(splice_streams, a, acceptor, moved=lambda: calls.append(None))
                )
                nursery.start_soon(send_then_end, opener, payload)
                await trio.testing.wait_all_tasks_blocked()
                assert await read_all(client, 4096) == payload
                nursery.cancel_scope.cancel()
    # At least one call per slice of what had to wait for the reader.
    assert len(calls) > len(payload) // (4 * MOVED_SLICE)


async def test_the_forward_formats_its_log_label_only_when_a_line_is_written() -> None:
    """The port forward holds no strings per connection for its log lines (memory per idle
    stream): the label names client and target when formatted."""
    from backchannel import HostPort
    from backchannel_tcp._front_doors import _ForwardLabel

    async with socket_pair() as (client, a):
        label = _ForwardLabel(a, HostPort("db.virtual", 5432))
        host, port = client.socket.getsockname()[:2]
        assert str(label) == f"forward {host}:{port} → db.virtual:5432"
        assert not any(isinstance(value, str) for value in (label._client, label._target))
