"""The splice's standby direction: tunnel stream → plain socket without a task of its own.

The tunnel's reader writes what arrives to the socket and half-closes it at the peer's FIN;
only what it cannot do (data the socket did not take, a reset, a close) starts the usual pump
task, and when the splice's own task is done with the other direction first it runs this one
itself. Real sockets on 127.0.0.1 (port 0) and the in-memory tunnel pair.
"""

from __future__ import annotations

import os
import socket as socket_module
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from backchannel import ResetCode, TunnelStream, splice_streams

from .test_splice_direct import read_all, receive_exactly, socket_pair
from .tunnel_pair import tunnel_pair

GUARD = 20  # seconds: a guard against hangs, never a synchronisation
PUMP = "backchannel splice"


class PumpTasks(trio.abc.Instrument):
    """Counts the splice pump tasks spawned, and those alive."""

    def __init__(self) -> None:
        self.spawned = 0
        self.alive: set[trio.lowlevel.Task] = set()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name == PUMP:
            self.spawned += 1
            self.alive.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.alive.discard(task)


def standing_by(stream: TunnelStream) -> bool:
    """Whether a splice's standby runs the stream's receiving side (read anew each time)."""
    return stream._standby is not None


@contextmanager
def counting() -> Iterator[PumpTasks]:
    """The pump tasks spawned while the block runs."""
    counter = PumpTasks()
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)


async def test_a_spliced_stream_lives_a_whole_exchange_with_one_task() -> None:
    """Data both ways, the peer's FIN (the socket half-closes), then the client's end: no
    pump task is ever started, and every byte and both ends arrive."""
    with counting() as counter:
        with trio.fail_after(GUARD):
            async with tunnel_pair() as pair, socket_pair() as (client, a):
                opener, acceptor = await pair.open_pair()
                outcome: list[str | None] = []

                async def run_splice() -> None:
                    outcome.append(await splice_streams(a, acceptor))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_splice)
                    await trio.testing.wait_all_tasks_blocked()
                    for n in range(3):
                        await opener.send_all(b"greeting %d" % n)
                        assert await receive_exactly(client, 10) == b"greeting %d" % n
                        await client.send_all(b"answer %d" % n)
                        assert await receive_exactly(opener, 8) == b"answer %d" % n
                    await opener.send_eof()
                    assert await client.receive_some(10) == b""  # half-closed by the reader
                    await client.send_all(b"after the peer's end")  # the other way still runs
                    assert await receive_exactly(opener, 20) == b"after the peer's end"
                    await client.send_eof()
                    assert await opener.receive_some(10) == b""
                assert outcome == [None]
                assert counter.spawned == 0


async def test_when_the_socket_side_ends_first_the_splice_task_takes_the_other_way() -> None:
    with counting() as counter:
        with trio.fail_after(GUARD):
            async with tunnel_pair() as pair, socket_pair() as (client, a):
                opener, acceptor = await pair.open_pair()
                outcome: list[str | None] = []

                async def run_splice() -> None:
                    outcome.append(await splice_streams(acceptor, a))  # the tunnel as `a` too

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_splice)
                    await trio.testing.wait_all_tasks_blocked()
                    await client.send_eof()
                    assert await opener.receive_some(10) == b""
                    await trio.testing.wait_all_tasks_blocked()
                    assert not standing_by(acceptor)  # the splice's task receives now
                    await opener.send_all(b"late answer")
                    await opener.send_eof()
                    assert await read_all(client) == b"late answer"
                assert outcome == [None]
                assert counter.spawned == 0


async def test_data_that_came_before_the_splice_goes_first_then_the_reader_writes() -> None:
    with counting() as counter:
        with trio.fail_after(GUARD):
            async with tunnel_pair() as pair, socket_pair() as (client, a):
                opener, acceptor = await pair.open_pair()
                await opener.send_all(b"early ")
                await opener.send_all(b"bytes ")
                await trio.testing.wait_all_tasks_blocked()
                assert acceptor.buffered == 12
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice_streams, a, acceptor)
                    await trio.testing.wait_all_tasks_blocked()
                    assert acceptor.buffered == 0
                    await opener.send_all(b"and later ones")
                    await opener.send_eof()
                    assert await read_all(client) == b"early bytes and later ones"
                    nursery.cancel_scope.cancel()
                assert counter.spawned == 0


async def test_what_the_socket_does_not_take_starts_the_pump_and_nothing_is_lost() -> None:
    payload = os.urandom(8 << 20)  # far more than a socket buffer and the stream's window
    with counting() as counter:
        with trio.fail_after(GUARD):
            async with tunnel_pair() as pair, socket_pair() as (client, a):
                opener, acceptor = await pair.open_pair()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice_streams, a, acceptor)
                    await trio.testing.wait_all_tasks_blocked()
                    assert counter.spawned == 0

                    async def send_then_end() -> None:
                        await opener.send_all(payload)
                        await opener.send_eof()

                    nursery.start_soon(send_then_end)
                    await trio.testing.wait_all_tasks_blocked()  # the socket is full
                    assert counter.spawned == 1
                    assert await read_all(client, 4096) == payload
                    await client.send_eof()
                assert not counter.alive


async def give_up(opener: TunnelStream, a: trio.SocketStream) -> None:
    """Nothing ever arrives on the socket: the peer's reset alone must end the splice."""
    await opener.reset(ResetCode.CANCELLED, "the peer gave up")


async def lose_the_socket(opener: TunnelStream, a: trio.SocketStream) -> None:
    """The splice's socket is gone under the standby when the peer's FIN comes."""
    a.socket.close()
    await opener.send_eof()


@pytest.mark.parametrize(
    ("event", "broken"), [(give_up, "tunnel"), (lose_the_socket, "client")], ids=["reset", "fin"]
)
async def test_what_ends_a_standing_by_splice_is_named(
    event: Callable[[TunnelStream, trio.SocketStream], Awaitable[None]], broken: str
) -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (_client, a):
            opener, acceptor = await pair.open_pair()
            outcome: list[str | None] = []

            async def run_splice() -> None:
                outcome.append(await splice_streams(a, acceptor, a_name="client", b_name="tunnel"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_splice)
                await trio.testing.wait_all_tasks_blocked()
                await event(opener, a)
            assert outcome == [broken]


async def test_a_cancelled_splice_gives_the_receiving_side_back() -> None:
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                await trio.testing.wait_all_tasks_blocked()
                assert standing_by(acceptor)
                nursery.cancel_scope.cancel()
            assert not standing_by(acceptor)
            assert acceptor._sink is None
            await opener.send_all(b"for whoever reads next")
            assert await receive_exactly(acceptor, 22) == b"for whoever reads next"
            try:
                leaked = os.read(client.socket.fileno(), 100)  # trio's sockets do not block
            except BlockingIOError:
                leaked = b""
            assert leaked == b""


async def test_a_half_closed_socket_is_not_shut_down_twice() -> None:
    """The reader's half-close records itself as trio's send_eof does (the flag the socket
    stream checks), so a later send_eof on the socket is the no-op it is after trio's own."""
    with trio.fail_after(GUARD):
        async with tunnel_pair() as pair, socket_pair() as (client, a):
            opener, acceptor = await pair.open_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, a, acceptor)
                await trio.testing.wait_all_tasks_blocked()
                await opener.send_eof()
                assert await client.receive_some(10) == b""
                assert a.socket.did_shutdown_SHUT_WR
                await a.send_eof()  # no error: already done
                assert a.socket.getsockopt(socket_module.SOL_SOCKET, socket_module.SO_ERROR) == 0
                nursery.cancel_scope.cancel()
