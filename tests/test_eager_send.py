"""Eager sends: while the tunnel's writer is idle, the task that queues frames sends them.

Over real TLS on 127.0.0.1: ``WebSocketLink.send_message_now`` writes at once, keeps what the
socket does not take for ``flush`` (which sends it before anything else) and reports a broken
connection as 1006. Over the in-memory tunnel pair with a transport that records how it was
used: a stream's data leaves from the task that wrote it while the writer is idle; the writer
sends it when the transport cannot, and flushes what a stream left unsent.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket

from backchannel._tunnel import EagerTransport
from backchannel._wslink import CLOSE_ABNORMAL, WebSocketClosed, WebSocketLink

from .test_wslink_review import GUARD, FrameReader, Pki, pki, tls_pair
from .tunnel_pair import GatedTransport, TunnelPair, tunnel_pair

__all__ = ["pki"]  # the fixture, imported for the tests below

BIG = 24 << 20  # more than the loopback socket buffers hold


# --------------------------------------------------------------------------- the link


def pending_and_ready(link: WebSocketLink) -> tuple[bool, bool]:
    """(something waits for flush, send_message_now would take a message)."""
    return link.send_pending, link.can_send_now


async def test_a_message_sent_now_is_on_the_wire_before_any_other_task_runs(pki: Pki) -> None:
    async with tls_pair(pki) as (client_tls, server_tls):
        ours = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
        theirs = WebSocketLink(client_tls, client=True, max_message_size=1 << 20)
        assert ours.can_send_now
        ours.send_message_now(b"first")
        ours.send_message_now(b"second")
        # Synchronous: the socket took both (no await in between, nothing left to flush).
        assert not ours.send_pending
        with trio.fail_after(GUARD):
            assert await theirs.get_message() == b"first"
            assert await theirs.get_message() == b"second"


async def test_what_the_socket_does_not_take_leaves_first_on_the_next_send(pki: Pki) -> None:
    async with tls_pair(pki) as (client_tls, server_tls):
        ours = WebSocketLink(server_tls, client=False, max_message_size=1 << 26)
        peer = FrameReader(client_tls, link_is_client=False)
        ours.send_message_now(b"b" * BIG)
        # The peer has not read: most of it is still ours, and another message sent now
        # would overtake the rest.
        assert pending_and_ready(ours) == (True, False)
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.send_message, b"after")
                first = await peer.next_frame()
                second = await peer.next_frame()
        assert len(first.payload) == BIG
        assert set(first.payload) == {ord("b")}
        assert second.payload == b"after"
        assert pending_and_ready(ours) == (False, True)


async def test_flush_sends_the_rest_and_then_the_link_can_send_now_again(pki: Pki) -> None:
    async with tls_pair(pki) as (client_tls, server_tls):
        ours = WebSocketLink(server_tls, client=False, max_message_size=1 << 26)
        peer = FrameReader(client_tls, link_is_client=False)
        ours.send_message_now(b"c" * BIG)
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.flush)
                frame = await peer.next_frame()
        assert len(frame.payload) == BIG
        assert pending_and_ready(ours) == (False, True)


async def test_a_broken_connection_is_a_1006_from_send_message_now(pki: Pki) -> None:
    async with tls_pair(pki) as (client_tls, server_tls):
        ours = WebSocketLink(server_tls, client=False, max_message_size=1 << 20)
        await trio.aclose_forcefully(client_tls)
        await trio.testing.wait_all_tasks_blocked()
        failure: WebSocketClosed | None = None
        for _ in range(100):  # the first writes may still succeed, until the peer's RST
            assert ours.can_send_now
            try:
                ours.send_message_now(b"x" * 1024)
            except WebSocketClosed as exc:
                failure = exc
                break
            await trio.sleep(0)
        assert failure is not None
        assert failure.code == CLOSE_ABNORMAL
        assert not ours.can_send_now
        with pytest.raises(WebSocketClosed):
            await ours.send_message(b"later")


# --------------------------------------------------------------------------- the tunnel


class EagerGatedTransport(GatedTransport):
    """The pair's transport, able to take messages at once (:class:`EagerTransport`): they
    queue in order and a forwarder task writes them; it records who sent what, and how."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__(ws)
        self.accepting_now = True
        self.now_senders: list[trio.lowlevel.Task] = []
        self.writer_messages = 0
        self.flushes = 0
        self._queue: deque[bytes] = deque()
        self._queued = trio.Event()
        self._drained = trio.Event()
        self._drained.set()

    @property
    def can_send_now(self) -> bool:
        return self.accepting_now

    @property
    def send_pending(self) -> bool:
        # Like a socket that took everything unless the test holds sends: queued messages
        # are the forwarder's, the tunnel need not flush them.
        return bool(self._queue) and not self._open.is_set()

    def send_message_now(self, message: bytes) -> None:
        self.now_senders.append(trio.lowlevel.current_task())
        self._queue.append(message)
        self._drained = trio.Event()
        self._queued.set()

    async def flush(self) -> None:
        self.flushes += 1
        await self._drained.wait()

    async def send_message(self, message: bytes) -> None:
        self.writer_messages += 1
        await self._drained.wait()  # what was sent now goes first
        await super().send_message(message)

    async def forward(self) -> None:
        while True:
            await self._queued.wait()
            while self._queue:
                await super().send_message(self._queue[0])
                self._queue.popleft()
            self._queued = trio.Event()
            self._drained.set()


@asynccontextmanager
async def eager_pair() -> AsyncIterator[tuple[TunnelPair, EagerGatedTransport]]:
    async with tunnel_pair() as pair, trio.open_nursery() as nursery:
        eager = EagerGatedTransport(pair.gateway_transport.ws)
        assert isinstance(eager, EagerTransport)
        pair.gateway._transport = eager
        pair.gateway._eager = eager  # type: ignore[assignment]  # the pair's own transport
        nursery.start_soon(eager.forward)
        yield pair, eager
        nursery.cancel_scope.cancel()


async def test_a_stream_sends_from_its_own_task_while_the_writer_is_idle() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()  # the writer is parked
            before = (len(eager.now_senders), eager.writer_messages)
            await opener.send_all(b"request")
            assert len(eager.now_senders) == before[0] + 1
            assert eager.now_senders[-1] is trio.lowlevel.current_task()
            assert eager.writer_messages == before[1]
            assert await acceptor.receive_some() == b"request"


async def test_the_writer_sends_when_the_transport_cannot_send_now() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            eager.accepting_now = False
            before = (len(eager.now_senders), eager.writer_messages)
            await opener.send_all(b"request")
            assert await acceptor.receive_some() == b"request"
            assert len(eager.now_senders) == before[0]
            assert eager.writer_messages == before[1] + 1


async def test_the_writer_flushes_what_a_stream_left_unsent() -> None:
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            eager.hold_sends()  # the forwarder cannot write: the message stays pending
            await opener.send_all(b"request")
            await trio.testing.wait_all_tasks_blocked()
            assert eager.send_pending
            assert eager.flushes == 1  # the writer was woken to finish it
            eager.release_sends()
            assert await acceptor.receive_some() == b"request"
            await trio.testing.wait_all_tasks_blocked()
            assert not eager.send_pending


async def test_what_a_splice_read_queues_at_once_leaves_as_one_message() -> None:
    """A splice hands a stream up to 256 KiB at once (``_send_now``): four 64 KiB send steps,
    one eager message for all of them (not one per step)."""
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, eager):
            opener, acceptor = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            before = len(eager.now_senders)
            data = os.urandom(200 * 1024)
            assert opener._send_now(data) == len(data)
            assert len(eager.now_senders) == before + 1
            received = b""
            while len(received) < len(data):
                received += await acceptor.receive_some()
            assert received == data
