"""Least served first: the order in which streams waiting for room in a tunnel's output queue
get it (backchannel._room_waiters), and what that does on a real tunnel: a new stream's bytes
are not queued behind bulk transfers that were waiting before it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backchannel import _tunnel
from backchannel._proto._events import DataReceived, Event
from backchannel._room_waiters import SERVED_LIMIT, RoomWaiters
from backchannel._stream import TunnelStream

from .test_eager_send_review import read_to_eof, tls_tunnels
from .test_wslink_review import GUARD, Pki, pki

__all__ = ["pki"]  # the fixture, imported for the tests below

#: The send step of the tunnel scenario below (the default is 256 KiB, one splice read): the
#: order of waking is the same at any step size; the scenario needs several steps per stream.
STEP = 64 * 1024


@pytest.fixture(autouse=True)
def _small_send_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tunnel, "MAX_SEND_CHUNK", STEP)


BULK_REST = 512 * 1024


def drain(waiters: RoomWaiters[str]) -> list[str]:
    order = []
    while (waiter := waiters.pop()) is not None:
        order.append(waiter)
    return order


def test_the_least_served_waiter_is_woken_first() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    waiters.add("bulk", 200_000)
    waiters.add("new", 0)
    waiters.add("middle", 70_000)
    assert waiters.least_served() == 0
    assert drain(waiters) == ["new", "middle", "bulk"]
    assert waiters.least_served() is None
    assert len(waiters) == 0


def test_equals_and_everyone_past_the_limit_take_turns_in_arrival_order() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    waiters.add("first", SERVED_LIMIT * 40)
    waiters.add("second", SERVED_LIMIT)
    waiters.add("third", SERVED_LIMIT * 2)
    waiters.add("fourth", 5)
    waiters.add("fifth", 5)
    assert drain(waiters) == ["fourth", "fifth", "first", "second", "third"]


def test_a_waiter_is_queued_once_and_a_discarded_one_is_never_woken() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    waiters.add("a", 10)
    waiters.add("a", 0)  # already waiting: keeps its place
    waiters.add("b", 5)
    waiters.add("c", 1)
    assert len(waiters) == 3
    assert "a" in waiters
    waiters.discard("c")
    waiters.discard("never added")
    assert "c" not in waiters
    assert len(waiters) == 2
    assert waiters.least_served() == 5
    assert drain(waiters) == ["b", "a"]
    waiters.add("c", 0)  # back after being discarded: queued anew, its old entry is stale
    assert drain(waiters) == ["c"]


def test_a_stream_gives_way_only_to_waiters_served_less_than_it() -> None:
    waiters: RoomWaiters[str] = RoomWaiters()
    assert not waiters.any_served_less_than(10**9)
    waiters.add("waiting", 64 * 1024)
    assert not waiters.any_served_less_than(64 * 1024)  # equal: no
    assert waiters.any_served_less_than(64 * 1024 + 1)
    waiters.add("past the limit", SERVED_LIMIT * 3)
    waiters.pop()
    # Past the limit everyone counts as served SERVED_LIMIT: nobody gives way to the other.
    assert not waiters.any_served_less_than(SERVED_LIMIT * 100)


async def test_a_new_stream_is_not_queued_behind_bulk_transfers_waiting_for_room(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk streams past SERVED_LIMIT keep the gateway's output queue full while the connector
    does not read; most wait for room. A new stream then sends three send steps: the first is
    queued at once (it has nothing queued), the others wait. Once the connector reads again,
    the new stream is woken before every bulk stream each time, so its last byte arrives after
    at most two rounds of bulk steps (about 2 MiB each); woken in the order they began waiting,
    it would follow every waiting bulk stream's step twice (80 x 64 KiB each time)."""
    bulk_count = 80
    newcomer_size = 3 * STEP
    with trio.fail_after(GUARD):
        async with tls_tunnels(pki) as tunnels:
            gateway, connector = tunnels.gateway, tunnels.connector
            bulk = [await tunnels.open_pair() for _ in range(bulk_count)]
            newcomer, newcomer_peer = await tunnels.open_pair()
            arrivals: list[tuple[int, int]] = []
            dispatch = connector._dispatch

            def recording_dispatch(event: Event) -> None:
                if isinstance(event, DataReceived):
                    arrivals.append((event.stream_id, len(event.data)))
                dispatch(event)

            monkeypatch.setattr(connector, "_dispatch", recording_dispatch)
            received: dict[int, int] = {}

            async def read_all(stream: TunnelStream) -> None:
                received[stream.stream_id] = len(await read_to_eof(stream))

            async def send(stream: TunnelStream, size: int) -> None:
                await stream.send_all(b"x" * size)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                for _, acceptor in [*bulk, (newcomer, newcomer_peer)]:
                    nursery.start_soon(read_all, acceptor)
                for opener, _ in bulk:  # each past the limit while the connector reads
                    await opener.send_all(b"x" * (SERVED_LIMIT + 1))
                await trio.testing.wait_all_tasks_blocked()
                tunnels.connector_reads.pause()
                for opener, _ in bulk:
                    nursery.start_soon(send, opener, BULK_REST)
                await trio.testing.wait_all_tasks_blocked()
                assert len(gateway._output_blocked) >= bulk_count // 2
                nursery.start_soon(send, newcomer, newcomer_size)
                await trio.testing.wait_all_tasks_blocked()
                assert newcomer in gateway._output_blocked
                bulk_handed_over = sum(opener._sent for opener, _ in bulk)
                tunnels.connector_reads.resume()
            ids = [stream_id for stream_id, _ in arrivals]
            last = len(ids) - 1 - ids[::-1].index(newcomer.stream_id)
            bulk_before_last = sum(size for _, size in arrivals[:last])
            assert bulk_before_last - bulk_handed_over <= 2 * gateway._settings.output_high_water
            assert received[newcomer.stream_id] == newcomer_size
            assert all(received[o.stream_id] == SERVED_LIMIT + 1 + BULK_REST for o, _ in bulk)
