"""Review of "least served first" (1bcfcd6): backchannel._room_waiters and its use by the tunnel.

Four were written failing (strict xfail), each for a defect the review found: a splice stalled
for good with a small output_high_water (its own stale entry, the writer idle), stranding other
streams; _send_now queued its stream with the served count from before the call; entries of
streams discarded while waiting piled up without bound. They pass since the fixes. The others
pin down properties the review checked and found correct.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import trio
import trio.testing

from backchannel import _tunnel
from backchannel._room_waiters import SERVED_LIMIT, RoomWaiters
from backchannel._sockio import write_now
from backchannel._splice import splice_streams
from backchannel._stream import TunnelStream
from backchannel._tunnel import Tunnel, TunnelSettings

from .test_eager_send import eager_pair
from .test_eager_send_review import read_to_eof, tls_tunnels
from .test_wslink_review import GUARD, Pki, pki
from .tunnel_pair import tunnel_pair

__all__ = ["pki"]  # the fixture, imported for the tests below

#: The send step of these scenarios (the tunnel's default is 256 KiB, one splice read): the
#: waiting logic is the same at any step size, and several steps per splice read are what
#: these scenarios need.
STEP = 64 * 1024


@pytest.fixture(autouse=True)
def _small_send_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tunnel, "MAX_SEND_CHUNK", STEP)


#: A configurable high-water mark (16 KiB-256 MiB) below what one splice read hands a stream
#: (256 KiB): one `_send_now` call reaches it.
SMALL_HIGH_WATER = 64 * 1024


def with_high_water(tunnel: Tunnel, high_water: int) -> None:
    tunnel._settings = dataclasses.replace(tunnel._settings, output_high_water=high_water)


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair on 127.0.0.1 with the system's socket buffers."""
    listening = trio.socket.socket()
    with listening:
        await listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        client = trio.socket.socket()
        await client.connect(listening.getsockname())
        server, _ = await listening.accept()
    return trio.SocketStream(client), trio.SocketStream(server)


# =========================================================================== findings


async def test_a_spliced_upload_finishes_with_a_small_output_high_water_mark(pki: Pki) -> None:
    """A client socket spliced into a tunnel stream (the TCP forward, SOCKS) uploads 1 MiB
    through a gateway whose ``output_high_water`` is 64 KiB (a valid setting). The splice reads
    up to 256 KiB and hands it to ``_send_now``: the first 64 KiB step reaches the mark, so the
    stream is queued in ``_output_blocked`` (with ``_sent`` as it was before this call) and the
    call returns; ``_wake_writer`` sends the step eagerly, the queue is empty again and the
    writer stays parked. The splice sends the rest with ``send_all``: nothing is queued, but
    ``any_served_less_than`` finds the stream's own entry (served 0 < 64 KiB), so it gives way
    to itself and parks; only the writer wakes waiters, and it is idle. The upload stops after
    64 KiB for good (window updates wake the task, which parks again). Before 1bcfcd6 the
    leftover entry did not hold anyone back (one send step queued per stream only)."""
    size = 1 << 20
    with trio.fail_after(GUARD):
        async with tls_tunnels(pki, small_buffers=False) as tunnels:
            gateway = tunnels.gateway
            with_high_water(gateway, SMALL_HIGH_WATER)
            opener, acceptor = await tunnels.open_pair()
            client, server = await tcp_pair()
            payload = memoryview(b"u" * size)
            # In the socket before the splice reads: its first read takes more than a step.
            prefilled = 0
            while prefilled < size and (taken := write_now(client.socket, payload[prefilled:])):
                prefilled += taken
            assert prefilled > STEP
            received: list[int] = []

            async def upload() -> None:
                await client.send_all(payload[prefilled:])
                await client.send_eof()

            async def read() -> None:
                received.append(len(await read_to_eof(acceptor)))

            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(splice_streams, server, opener)
                nursery.start_soon(read)
                nursery.start_soon(upload)
                await trio.testing.wait_all_tasks_blocked()
                stranded = bool(gateway._output_blocked) and len(gateway._writer_waiters) == 1
                nursery.cancel_scope.cancel()
            assert not stranded, "a stream waits for room while the writer is idle"
            assert received == [size]


async def test_nobody_waits_for_room_while_the_writer_is_idle() -> None:
    """The invariant ``_wake_writer`` states ("nobody waits for room while the writer is
    idle"), with an eager transport and a 64 KiB high-water mark: stream A hands
    ``_send_now`` 64 KiB + 1 byte, as a splice read does, and sends the byte it did not take
    with ``send_all``; then stream B sends 256 KiB. Both must finish, and once every task is
    blocked no stream may be left in ``_output_blocked``. As it is, A gives way to its own
    entry (served 0) and so does B once it has sent one step: every stream of the tunnel
    that sends after its first step stops behind the entry, until something makes the writer
    run. Fixing only A's served count (or only letting A ignore its own entry) is not enough:
    A's leftover entry (64 KiB) still holds back B after two steps."""
    step = STEP
    with trio.fail_after(GUARD):
        async with eager_pair() as (pair, _):
            gateway = pair.gateway
            with_high_water(gateway, SMALL_HIGH_WATER)
            a, a_peer = await pair.open_pair()
            b, b_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            assert len(gateway._writer_waiters) == 1  # idle
            received: dict[int, int] = {}
            finished: list[str] = []

            async def read(stream: TunnelStream, size: int) -> None:
                total = 0
                while total < size:
                    total += len(await stream.receive_some())
                received[stream.stream_id] = total

            async def splice_like(data: bytes) -> None:
                taken = a._send_now(data)
                assert taken == step  # the second step found the queue at the mark
                await a.send_all(memoryview(data)[taken:])
                finished.append("a")

            async def bulk(size: int) -> None:
                await b.send_all(b"b" * size)
                finished.append("b")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, a_peer, step + 1)
                nursery.start_soon(read, b_peer, 4 * step)
                nursery.start_soon(splice_like, b"a" * (step + 1))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(bulk, 4 * step)
                await trio.testing.wait_all_tasks_blocked()
                waiting = len(gateway._output_blocked)
                nursery.cancel_scope.cancel()
            assert finished == ["a", "b"]
            assert waiting == 0
            assert received == {a.stream_id: step + 1, b.stream_id: 4 * step}


async def test_a_stream_queued_by_the_splice_path_waits_with_what_it_has_sent() -> None:
    """The writer is busy (its send held), the high-water mark 64 KiB. Stream N has sent
    32 KiB and waits for room. A splice read hands stream S (nothing sent yet) 256 KiB:
    ``_send_now`` queues one 64 KiB step, the next finds the queue at the mark and queues S
    with ``_sent`` = 0, although S has now handed over 64 KiB. Least served first must wake N
    (32 KiB) before S (64 KiB); the queue wakes S first."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            n, _ = await pair.open_pair()
            s, _ = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            pair.gateway_transport.hold_sends()
            await n.send_all(b"n" * (32 * 1024))
            await trio.testing.wait_all_tasks_blocked()  # the writer holds N's bytes
            assert gateway._mux.pending_bytes == 0
            assert s._send_now(b"s" * (256 * 1024)) == STEP
            assert s._sent == STEP
            async with trio.open_nursery() as nursery:
                nursery.start_soon(n.send_all, b"n")
                await trio.testing.wait_all_tasks_blocked()
                assert n in gateway._output_blocked
                assert s in gateway._output_blocked
                least = gateway._output_blocked.least_served()
                first = gateway._output_blocked.pop()
                nursery.cancel_scope.cancel()
            assert least == 32 * 1024
            assert first is n


def test_entries_of_discarded_waiters_do_not_pile_up_while_newer_ones_are_served() -> None:
    """A busy tunnel under a steady flow of new streams: at every wake-up a stream that has
    sent nothing yet waits, so it is woken first; meanwhile streams that have sent 128 KiB wait
    and are closed (a client gives up) before their turn comes. Each leaves its heap entry
    (and keeps its TunnelStream alive); none reaches the top, so the heap grows by one entry
    per closed stream for as long as the flow lasts, although at most two streams are queued
    at any time. A rebuild once stale entries outnumber live ones keeps it bounded
    (amortised O(1) per discard)."""
    waiters: RoomWaiters[object] = RoomWaiters()
    newcomer = object()
    waiters.add(newcomer, 0)
    for _ in range(10_000):
        gives_up = object()
        waiters.add(gives_up, 128 * 1024)
        waiters.discard(gives_up)
        newcomer = object()
        waiters.add(newcomer, 0)
        assert waiters.pop() is not None
        assert len(waiters) == 1
    assert len(waiters._waiting._heap) <= 2 * len(waiters) + 64


# =========================================================================== checked, correct


def test_a_bulk_waiter_past_the_limit_waits_at_most_four_steps_per_newcomer() -> None:
    """The bound by design: a stream past SERVED_LIMIT gives way to a newer stream only until
    that one has sent SERVED_LIMIT (four 64 KiB steps), however they interleave. Each woken
    stream sends one step and queues again with what it has sent."""
    waiters: RoomWaiters[str] = RoomWaiters()
    sent = {"bulk": 10 * SERVED_LIMIT}
    waiters.add("bulk", sent["bulk"])
    newcomers = 7
    for index in range(newcomers):
        sent[f"new{index}"] = 0
        waiters.add(f"new{index}", 0)
    steps_before_bulk = 0
    while (woken := waiters.pop()) != "bulk":
        assert woken is not None
        steps_before_bulk += 1
        sent[woken] += STEP
        waiters.add(woken, sent[woken])
    assert steps_before_bulk == newcomers * SERVED_LIMIT // STEP
    # Then it takes turns with them: next is the newcomer that reached the limit first.
    waiters.add("bulk", sent["bulk"] + STEP)
    assert waiters.pop() == "new0"


def test_the_woken_waiter_never_gives_way_to_those_still_waiting() -> None:
    """No two streams can keep giving way to each other: the one popped has the least
    (capped) count, so ``any_served_less_than`` with its own count is False for the rest, and
    a stream gives way only to a strictly smaller count (a strict order, no cycle)."""
    rng = random.Random(6)
    waiters: RoomWaiters[int] = RoomWaiters()
    served: dict[int, int] = {}
    for waiter in range(500):
        served[waiter] = rng.choice([0, 1, 65_536, 131_072, SERVED_LIMIT, rng.randrange(1 << 24)])
        waiters.add(waiter, served[waiter])
        if rng.random() < 0.2:
            waiters.discard(rng.randrange(waiter + 1))
    while (woken := waiters.pop()) is not None:
        assert not waiters.any_served_less_than(served[woken])


def test_stale_entries_go_once_the_queue_is_drained() -> None:
    """Memory after the busy period: the writer wakes everyone when its queue is empty (pop
    until None); that leaves no entry behind, stale or live, and discarding everyone is enough
    for the next look (least_served) to drop them all."""
    waiters: RoomWaiters[int] = RoomWaiters()
    for waiter in range(1000):
        waiters.add(waiter, waiter * 1000)
    for waiter in range(0, 1000, 2):
        waiters.discard(waiter)
    for waiter in range(0, 1000, 4):
        waiters.add(waiter, 0)  # back after being discarded: a new entry, the old one stale
    woken: list[int] = []
    while (popped := waiters.pop()) is not None:
        woken.append(popped)
    assert sorted(woken) == sorted([*range(1, 1000, 2), *range(0, 1000, 4)])
    assert woken[:250] == list(range(0, 1000, 4))  # served 0, in the order they came back
    assert waiters._waiting._heap == []
    for waiter in range(100):
        waiters.add(waiter, 5)
    for waiter in range(100):
        waiters.discard(waiter)
    assert not waiters
    assert waiters.least_served() is None
    assert waiters._waiting._heap == []


async def test_a_stream_closed_while_it_waits_for_room_holds_nobody_back() -> None:
    """Streams C (nothing sent) and D (128 KiB sent) wait for room behind a held writer. C is
    closed from another task: it leaves ``_output_blocked`` at once (its sender fails with
    ClosedResourceError instead of waiting for a wake-up), D no longer gives way to it, and
    when the writer sends again D finishes."""
    with trio.fail_after(GUARD):
        async with tunnel_pair(TunnelSettings(output_high_water=SMALL_HIGH_WATER)) as pair:
            gateway = pair.gateway
            c, _ = await pair.open_pair()
            d, d_peer = await pair.open_pair()
            await trio.testing.wait_all_tasks_blocked()
            pair.gateway_transport.hold_sends()
            await d.send_all(b"d" * STEP)
            await trio.testing.wait_all_tasks_blocked()  # the writer took it and holds it
            await d.send_all(b"d" * STEP)  # queued: the mark is reached
            assert gateway._mux.pending_bytes >= SMALL_HIGH_WATER
            outcome: dict[str, str] = {}

            async def send(stream: TunnelStream, name: str) -> None:
                try:
                    await stream.send_all(b"x" * STEP)
                except trio.ClosedResourceError:
                    outcome[name] = "closed"
                else:
                    outcome[name] = "sent"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, c, "c")
                nursery.start_soon(send, d, "d")
                await trio.testing.wait_all_tasks_blocked()
                assert c in gateway._output_blocked
                assert d in gateway._output_blocked
                assert gateway._output_blocked.least_served() == 0  # C's
                await c.aclose()
                assert c not in gateway._output_blocked
                assert gateway._output_blocked.least_served() == 2 * STEP  # D's
                pair.gateway_transport.release_sends()
                assert len(await read_exactly(d_peer, 3 * STEP)) == 3 * STEP
            assert outcome == {"c": "closed", "d": "sent"}
            assert not gateway._output_blocked


async def read_exactly(stream: TunnelStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        received += await stream.receive_some()
    return bytes(received)
